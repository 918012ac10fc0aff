"""Two-process DDP on CPU (gloo), launched with torchrun exactly as a multi-GPU run would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from xvla.train.config import save_config

from .helpers import make_config, mixture

REPO = Path(__file__).resolve().parents[2]


def test_two_process_ddp_trains_in_sync(tmp_path, datasets):
    cfg = make_config(
        tmp_path / "run", mixture(datasets), ("steps=8", "log.every=2", "checkpoint.every=8", "val.every=8")
    )
    save_config(cfg, tmp_path / "cfg.json")
    results = tmp_path / "ranks"
    results.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(Path(__file__).with_name("ddp_worker.py")),
        str(tmp_path / "cfg.json"),
        str(results),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((results / f"rank_{i}.json").read_text()) for i in range(2)]
    assert all(
        r["distributed_type"] == "DistributedType.MULTI_CPU" and r["num_processes"] == 2 for r in ranks
    )
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical weights on both ranks
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["step"] == [2, 4, 6, 8]
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]
    validation = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert validation[-1]["overall"]["samples"] == 16  # 2 sources x 1 batch of 4 x 2 ranks
