"""`xvla sim` command wiring."""

from __future__ import annotations

import pytest

pytest.importorskip("mujoco")

from xvla.cli import main
from xvla.sim.suite import SUITE


def test_sim_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "list"]) == 0
    out = capsys.readouterr().out
    for name, e in SUITE.items():
        assert name in out and e.spec.robot in out


def test_sim_eval_needs_checkpoint_or_oracle(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "eval", "--source", "rs_panda"]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err
