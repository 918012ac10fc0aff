"""kill -9 at random points of a tiny training run, inside checkpoint writes included: each resume ends
bit-identical to an uninterrupted run (losses, validation, every weight) and leaves no temporary behind.

Half the trials kill at a write (`train_child.py`): a random one of a kind that rotates over safetensors'
save_file (inside `save_pretrained`), torch.save (optimizer, scheduler, RNG state), the renames that publish
files and folders, and fsync; before, after or in the middle of it (the file cut short). The other half kill at
a random time while the run trains. Slow: each trial starts a fresh Python process (about 10 s on a 2-core machine).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import xvla
from train.helpers import arc_datasets, make_config, mixture
from xvla.configio import to_dict
from xvla.model.xvla import XVLA
from xvla.train import checkpointing
from xvla.train.config import TrainConfig
from xvla.train.run_folder import HISTORY_FILE, VALIDATION_FILE
from xvla.train.trainer import train

TRIALS = 20
SEED = 14  # of the kill points: a failure names its trial, and the same seed replays it
KINDS = ("save_file", "torch.save", "rename", "fsync")  # what train_child.py counts as a write
CHILD = Path(__file__).with_name("train_child.py")
OVERRIDES = ("checkpoint.every=2",)  # 6 steps, 3 checkpoints: more of the run is spent writing them
SRC = Path(xvla.__file__).resolve().parents[1]  # the child imports the xvla this process tests


def _config(out: Path, datasets: dict[str, Path]) -> TrainConfig:
    return make_config(out, mixture(datasets), OVERRIDES)


def _child(config: TrainConfig, tmp: Path, *args: str) -> subprocess.Popen:
    path = tmp / "config.json"
    path.write_text(json.dumps(to_dict(config)))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _outcome(out: Path) -> dict:
    """What an uninterrupted and a resumed run must agree on, bit for bit."""
    final = checkpointing.latest_checkpoint(out)
    assert final is not None and final.name == "step_00000006"
    return {
        "history": json.loads((out / HISTORY_FILE).read_text()),
        "validation": json.loads((out / VALIDATION_FILE).read_text()),
        "weights": XVLA.from_pretrained(final).state_dict(),
    }


def _assert_same(a: dict, b: dict, trial: str) -> None:
    history = ("step", "loss", "per_source")
    assert {k: a["history"][k] for k in history} == {k: b["history"][k] for k in history}, trial
    assert a["validation"] == b["validation"], trial
    for (name, p), q in zip(a["weights"].items(), b["weights"].values(), strict=True):
        assert torch.equal(p, q), f"{trial}: {name}"


def _temporaries(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bit_identical(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    datasets = arc_datasets(tmp_path / "datasets")
    train(_config(tmp_path / "reference", datasets))
    reference = _outcome(tmp_path / "reference")

    # the same run in a child process: how many writes it makes, how long it trains; and that it agrees
    count = _child(_config(tmp_path / "count", datasets), tmp_path, "count")
    stdout, stderr = count.communicate(timeout=600)
    assert count.returncode == 0, stderr.decode()[-3000:]
    measured = json.loads(stdout.decode().splitlines()[-1])
    _assert_same(reference, _outcome(tmp_path / "count"), "child process")

    rng = random.Random(SEED)
    killed = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial_{trial:02d}"
        config = _config(out, datasets)
        if trial % 2 == 0:
            writes = measured["writes"]
            kind = KINDS[trial // 2 % len(KINDS)]
            i = rng.choice([i for i, k in enumerate(writes) if k == kind])
            n, phase = i + 1, rng.choice(["before", "mid", "after"])
            what = f"trial {trial}: SIGKILL {phase} write {n} of {len(writes)} ({writes[i]})"
            child = _child(config, tmp_path, "kill", str(n), phase)
        else:
            delay = rng.uniform(0, measured["train_s"])
            what = f"trial {trial}: SIGKILL {delay:.2f} s into training"
            child = _child(config, tmp_path, "run")
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready", what
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=600)
        assert child.returncode in (-signal.SIGKILL, 0), (
            f"{what}: rc {child.returncode}\n{stderr.decode()[-3000:]}"
        )
        killed.append(child.returncode == -signal.SIGKILL)
        print(what, "(killed)" if killed[-1] else "(finished first)")
        train(config, resume=True)
        _assert_same(reference, _outcome(out), what)
        assert not _temporaries(out), (what, _temporaries(out))
    assert sum(killed) >= TRIALS * 3 // 4, killed  # the timed kills rarely come after the run ended
