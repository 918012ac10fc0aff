"""`xvla sim eval CHECKPOINT`: a random tiny checkpoint driven through the serving Policy in a simulator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("mujoco")

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(random_demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random checkpoint with a sources.json that describes rs_ur5e."""
    from xvla.sim.suite import SUITE

    folder = tmp_path_factory.mktemp("sim_eval") / "ckpt"
    shutil.copytree(random_demo_checkpoint, folder)
    sources = {"sources": [SUITE["rs_ur5e"].source("rs_ur5e").to_dict()]}
    (folder / "sources.json").write_text(json.dumps(sources))
    return folder


def test_sim_eval_runs_a_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    from xvla.cli import main

    out = tmp_path / "results.json"
    argv = [
        "sim",
        "eval",
        str(checkpoint),
        "--source",
        "rs_ur5e",
        "--task",
        "Lift",
        "--episodes",
        "1",
        "--replan",
        "1.0",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())["rs_ur5e"]
    lift = result["tasks"]["Lift"]
    assert lift["episodes"] == 1 and lift["outcomes"][0]["queries"] == lift["outcomes"][0]["steps"] // 10
    assert 0.0 <= result["ci95"][0] <= result["ci95"][1] <= 1.0
