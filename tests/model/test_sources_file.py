"""`xvla.model.checkpoint.read_sources`: the one reader of a checkpoint's `sources.json` (train, adapt, serve, demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xvla.model.checkpoint import SOURCES_NAME, read_sources

SPEC = {"name": "arm", "domain_id": 3, "path": "data/arm"}


def test_every_accepted_layout_gives_name_to_source_dict(tmp_path: Path) -> None:
    assert read_sources(tmp_path) == {}  # no file: no sources
    for layout in ({"arm": {"domain_id": 3, "path": "data/arm"}}, {"sources": [SPEC]}, [SPEC]):
        (tmp_path / SOURCES_NAME).write_text(json.dumps(layout))
        assert read_sources(tmp_path) == {"arm": SPEC}


@pytest.mark.parametrize(("text", "message"), [("{", "corrupt JSON"), ('[{"domain_id": 1}]', "with names")])
def test_bad_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / SOURCES_NAME).write_text(text)
    with pytest.raises(ValueError, match=rf"{SOURCES_NAME}.*{message}"):
        read_sources(tmp_path)
