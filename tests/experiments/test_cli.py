"""`xvla experiments`: --list, and clear errors before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xvla.cli import main


def test_list_names_every_experiment_and_arm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiments", "--list"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "pretraining:",
        "adaptation:",
        "prompts:",
        "proxy:",
        "smoke:",
        "- shared_heads [pretrain]",
    ):
        assert needle in text, needle
    assert "- scratch-n5 [scratch]" in text and "- prompt_heads_lora-n20 [adapt]" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiments"], "NAME is required"),
        (["experiments", "nope"], "experiment: unknown 'nope'"),
        (["experiments", "smoke", "--seeds", "0,x"], "--seeds: expected comma-separated integers"),
        (["experiments", "smoke", "--workers", "0"], "--workers: expected >= 1"),
    ],
)
def test_bad_arguments_name_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        main(argv)


def test_summary_only_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exp"
    assert main(["experiments", "smoke", "--summary-only", "--out", str(out), "--no-progress"]) == 0
    assert "0 cell(s) run" in capsys.readouterr().out
    summary = json.loads((out / "smoke" / "summary.json").read_text())
    assert summary["cells"] == {"finished": 0, "total": 4}
    assert not (out / "data").exists() and not (out / "smoke" / "xvla").exists()  # no data, no cell folders
