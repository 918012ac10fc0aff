"""`xvla sim eval CHECKPOINT`: a random tiny checkpoint driven through the serving Policy in a simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mujoco")

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xvla.config import get_preset
    from xvla.model.tokenizer import build_tokenizer
    from xvla.model.xvla import XVLA
    from xvla.sim.suite import SUITE

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("sim_ckpt") / "ckpt"
    config = get_preset("demo")
    XVLA(config).save_pretrained(folder)
    build_tokenizer(folder, vocab_size=config.text.vocab_size)
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
