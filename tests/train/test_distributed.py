"""Two processes on CPU (gloo), launched with torchrun exactly as a multi-GPU run would be: DDP, and the
trainer's FSDP path (see dist_worker.py for how FSDP runs on CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xvla.configio import save_config
from xvla.train.checkpointing import checkpoint_path

from .helpers import make_config, mixture

REPO = Path(__file__).resolve().parents[2]
# `cpu: false` (the default) on a machine without GPUs: accelerate must still join the launcher's processes.
DEVICE = "cpu=false" if not torch.cuda.is_available() else "cpu=true"
# Activation checkpointing on: DDP recomputes through prepare_training, FSDP through accelerate's plugin.
STEPS = (
    "steps=8",
    "log.every=2",
    "checkpoint.every=4",
    "val.every=8",
    "model.activation_checkpointing=true",
    DEVICE,
)


def launch(
    tmp_path: Path, name: str, overrides: tuple[str, ...], datasets, *args: str, fails: bool = False
) -> dict:
    """torchrun 2 processes of dist_worker.py on a config written once per `name`; returns what they wrote
    (`fails`: the run must fail, every rank with a checkpoint write error: their messages)."""
    config = tmp_path / f"{name}.json"
    if not config.exists():
        save_config(make_config(tmp_path / name, mixture(datasets), STEPS + overrides), config)
    results = tmp_path / f"{name}_ranks"
    results.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    worker = str(Path(__file__).with_name("dist_worker.py"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", worker]
    proc = subprocess.run(
        [*cmd, str(config), str(results), *args], env=env, capture_output=True, text=True, timeout=300
    )
    if fails:
        assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {"errors": [(results / f"error_{i}.txt").read_text() for i in range(2)], "stderr": proc.stderr}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "ranks": [json.loads((results / f"rank_{i}.json").read_text()) for i in range(2)],
        "stdout": proc.stdout,
        "history": json.loads((tmp_path / name / "history.json").read_text()),
    }


def finished(tmp_path: Path, name: str) -> tuple[list, dict]:
    """The run's validation records and its final (step 8) weights."""
    validation = json.loads((tmp_path / name / "validation.json").read_text())
    return validation, load_file(checkpoint_path(tmp_path / name, 8) / "model.safetensors")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, datasets) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    run = launch(tmp, "ddp", (), datasets)
    run["validation"], run["weights"] = finished(tmp, "ddp")
    return run


def phase_lines(stdout: str) -> list[str]:
    return re.findall(r"step \d+: training .*", stdout)


def test_two_process_ddp_trains_in_sync(ddp):
    assert all(
        r["distributed_type"] == "DistributedType.MULTI_CPU" and r["num_processes"] == 2 for r in ddp["ranks"]
    )
    assert ddp["ranks"][0]["digest"] == ddp["ranks"][1]["digest"]  # identical weights on both ranks
    assert ddp["history"]["step"] == [2, 4, 6, 8]
    loss = ddp["history"]["loss"]
    assert loss[-1] < 0.5 * loss[0], loss
    assert ddp["validation"][-1]["overall"]["samples"] == 16  # 2 sources x 1 batch of 4 x 2 ranks
    assert [line.split(":")[1] for line in phase_lines(ddp["stdout"])] == [
        " training soft_prompts, action_heads",
        " training vlm, transformer, soft_prompts, action_heads",
    ]


def test_fsdp_matches_ddp(tmp_path, datasets, ddp):
    """Same data, same initial weights: FULL_SHARD FSDP follows DDP up to float summation order, and its
    gathered checkpoint holds the same model."""
    fsdp = launch(tmp_path, "fsdp", ("fsdp=true",), datasets)
    fsdp["validation"], fsdp["weights"] = finished(tmp_path, "fsdp")
    assert all(r["distributed_type"] == "DistributedType.FSDP" for r in fsdp["ranks"])
    assert fsdp["ranks"][0]["digest"] != fsdp["ranks"][1]["digest"]  # each rank holds its own shard
    assert phase_lines(fsdp["stdout"]) == phase_lines(ddp["stdout"])  # counted before sharding
    assert fsdp["history"]["step"] == ddp["history"]["step"]
    torch.testing.assert_close(fsdp["history"]["loss"], ddp["history"]["loss"], rtol=1e-5, atol=0)
    a, b = fsdp["validation"][-1]["overall"], ddp["validation"][-1]["overall"]
    assert a["samples"] == b["samples"]
    torch.testing.assert_close([a["flow_loss"], a["l1"]], [b["flow_loss"], b["l1"]], rtol=1e-4, atol=0)
    assert fsdp["weights"].keys() == ddp["weights"].keys()
    for name, value in fsdp["weights"].items():
        other = ddp["weights"][name]
        if name.endswith("attn.qkv.bias"):
            # The key bias has an exactly-zero gradient (softmax ignores a shift shared by all keys): AdamW
            # normalises its summation-order noise into full-size steps, so only the q and v parts compare.
            value, other = value.view(3, -1)[[0, 2]], other.view(3, -1)[[0, 2]]
        torch.testing.assert_close(value, other, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_resume_continues_exactly(tmp_path, datasets):
    """Stopped right after the step-4 checkpoint and resumed: the same losses and weights as one FSDP run."""
    whole = launch(tmp_path, "whole", ("fsdp=true",), datasets)
    cut = launch(tmp_path, "cut", ("fsdp=true",), datasets, "--stop-at", "4")
    assert cut["history"]["step"] == [2, 4]
    resumed = launch(tmp_path, "cut", ("fsdp=true",), datasets, "--resume")
    assert "resumed from" in resumed["stdout"]
    for key in ("step", "loss", "per_source"):
        assert resumed["history"][key] == whole["history"][key], key  # bit-identical
    (val_a, weights_a), (val_b, weights_b) = finished(tmp_path, "whole"), finished(tmp_path, "cut")
    assert val_a == val_b
    for name, value in weights_a.items():
        assert torch.equal(value, weights_b[name]), name


def test_one_rank_failing_a_checkpoint_write(tmp_path, datasets, ddp):
    """Rank 1 cannot write its rank state at step 8: both ranks stop with an error naming the step and rank 1,
    no step-8 folder (final or temporary) is left, and --resume continues from step 4 exactly as the
    uninterrupted run."""
    failed = launch(tmp_path, "ddp", (), datasets, "--fail-rank-state", "1:8", fails=True)
    checkpoints = tmp_path / "ddp" / "checkpoints"
    last = f"last complete checkpoint 4 ({checkpoint_path(tmp_path / 'ddp', 4)})"
    assert failed["errors"] == [
        f"rank 1 failed writing checkpoint 8 to {checkpoints}; {last}",
        f"writing checkpoint 8 to {checkpoints} failed on rank 1 ([Errno 5] Input/output error (injected)); {last}",
    ]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004"]
    resumed = launch(tmp_path, "ddp", (), datasets, "--resume")
    assert "resumed from" in resumed["stdout"] and "step_00000004" in resumed["stdout"]
    assert resumed["ranks"] == ddp["ranks"]  # the same weights on both ranks as the uninterrupted run
    for key in ("step", "loss", "per_source"):
        assert resumed["history"][key] == ddp["history"][key], key  # bit-identical
    validation, weights = finished(tmp_path, "ddp")
    assert validation == ddp["validation"]
    assert weights.keys() == ddp["weights"].keys()
    for name, value in weights.items():
        assert torch.equal(value, ddp["weights"][name]), name
