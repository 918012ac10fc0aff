"""Checkpoint files: nothing is unpickled into arbitrary objects, RNG state survives a weights_only round trip,
and whatever an interrupted save leaves behind is removed on resume."""

from __future__ import annotations

import pathlib
import random
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from xvla.model import checkpoint as model_checkpoint
from xvla.train import checkpointing
from xvla.train.trainer import train

from .helpers import make_config, mixture


class _Exploit:
    """Unpickling this creates `marker`: a stand-in for any code a crafted checkpoint file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _craft(path: Path, marker: Path) -> None:
    torch.save({"state": {}, "payload": _Exploit(marker)}, path)


class Killed(Exception):
    """Stands in for the process being killed."""


def test_the_crafted_file_is_a_real_exploit_and_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _craft(tmp_path / "scheduler.pt", marker)
    torch.load(tmp_path / "scheduler.pt", weights_only=False)  # what resume used to do
    assert marker.exists()  # the exploit works when unpickled
    marker.unlink()
    with pytest.raises(ValueError, match=r"scheduler.pt: refused to load: .*Unsupported global"):
        checkpointing.load_file(tmp_path / "scheduler.pt")
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in the numpy state
    (tmp_path / checkpointing.STATE).mkdir()
    checkpointing.save_rank_state(tmp_path, 0, {"rng": checkpointing.rng_state(), "data": {"consumed": [4]}})

    def draw() -> tuple:
        return (
            random.random(),
            np.random.standard_normal(3).tolist(),
            np.random.rand(),
            torch.rand(3).tolist(),
        )

    expected = draw()
    state = checkpointing.load_rank_state(tmp_path, 0, 1)  # weights_only=True
    checkpointing.set_rng_state(state["rng"])
    assert draw() == expected and state["data"] == {"consumed": [4]}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory, datasets: dict[str, Path]) -> Path:
    """A finished 3-step run (one checkpoint) whose folder the tests copy before resuming it."""
    out = tmp_path_factory.mktemp("three") / "run"
    train(make_config(out, mixture(datasets), ("steps=3", "val.every=0")))
    return out


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rank_0.pt"])
def test_resume_never_runs_code_from_a_crafted_state_file(
    tmp_path: Path, datasets: dict[str, Path], three_steps: Path, name: str
) -> None:
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    marker = tmp_path / "pwned"
    _craft(checkpointing.checkpoint_path(out, 3) / checkpointing.STATE / name, marker)
    cfg = make_config(out, mixture(datasets), ("steps=6", "val.every=0"))
    with pytest.raises(ValueError, match=rf"{name}: refused to load"):
        train(cfg, resume=True)
    assert not marker.exists()


def test_resume_removes_every_temporary_left_by_a_killed_save(
    tmp_path: Path, datasets: dict[str, Path], three_steps: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed inside `save_pretrained` at step 6: its own `..tmp-step_00000006.<random>` folder is left next to
    the trainer's `.tmp-step_00000006` (no cleanup runs after kill -9: rmtree is disabled to stand for that)."""
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    cfg = make_config(out, mixture(datasets), ("steps=6", "val.every=0"))

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    no_cleanup = types.SimpleNamespace(
        rmtree=lambda *a, **k: None, copytree=shutil.copytree, copy2=shutil.copy2
    )
    monkeypatch.setattr(model_checkpoint, "shutil", no_cleanup)
    monkeypatch.setattr(model_checkpoint, "save_file", killed)
    with pytest.raises(Killed):
        train(cfg, resume=True)
    monkeypatch.undo()
    root = out / checkpointing.CHECKPOINTS
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert ".tmp-step_00000006" in left and any(n.startswith("..tmp-step_00000006.") for n in left), left
    (root / ".tmp-old-step_00000003").mkdir()  # a swap interrupted between its two renames

    started: list[list[str]] = []
    real_latest = checkpointing.latest_checkpoint

    def spy(
        output_dir: str | Path,
    ) -> Path | None:  # resume looks for its checkpoint after clearing the folder
        started.append(sorted(p.name for p in root.iterdir() if p.name.startswith(".")))
        return real_latest(output_dir)

    monkeypatch.setattr(checkpointing, "latest_checkpoint", spy)
    train(cfg, resume=True)
    assert started[0] == []  # removed on resume, before training
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000006"]
