"""A checkpoint argument is a local folder or a hub id, never a typo'd local path sent to the hub (issue 14 D16)."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import pytest

from xvla.model.checkpoint import load_pretrained, resolve_folder
from xvla.model.tokenizer import load_tokenizer


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Records hub lookups instead of making them (the tests run offline)."""
    calls: list[str] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls


@pytest.mark.parametrize(
    "name",
    [
        "runs/typo_ckpt",  # `runs/` exists here: a typo inside a local folder
        "./typo_ckpt",
        "../typo_ckpt",
        "~/typo_ckpt",
        "/no/such/ckpt",
        "runs/step_3/model",  # two separators
        "runs\\typo",
        "typo_ckpt",  # no owner
        "owner/na me",  # not a character the hub allows
        "owner/na..me",
    ],
)
def test_a_missing_path_is_not_found_and_never_downloaded(
    name: str, downloads: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="^not found: " + re.escape(name) + " "):
        resolve_folder(name)
    with pytest.raises(FileNotFoundError, match="^not found: "):
        load_pretrained(name)
    with pytest.raises(FileNotFoundError, match="^not found: .*no such tokenizer folder"):
        load_tokenizer(name)
    assert downloads == []


def test_a_path_object_is_never_a_hub_id(downloads: list[str], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_folder(Path("owner/name"))
    assert downloads == []


def test_a_hub_id_still_goes_to_the_hub(
    downloads: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_folder("2toinf/X-VLA-Pt") == tmp_path
    assert downloads == ["2toinf/X-VLA-Pt"]
