"""Run under `torchrun --nproc_per_node 2`: train from a config file, then write what each rank ended with.

Usage: dist_worker.py CONFIG.json RESULT_DIR [--resume] [--stop-at STEP] [--fail-rank-state RANK:STEP]
Writes RESULT_DIR/rank_<i>.json: the distributed type, process count and a digest of the rank's weights. With
--fail-rank-state, rank RANK's write of its rank state at checkpoint STEP raises an I/O error; a rank that ends
with `CheckpointWriteError` writes its message to RESULT_DIR/error_<i>.txt and exits 2, as `xvla train` does.

FSDP on CPU: accelerate enables FSDP only on accelerators, but torch's FSDP itself runs on CPU over gloo. With
`fsdp: true` this worker builds the trainer's own plugin and switches accelerate's state to FSDP on the CPU,
so the trainer's FSDP code (wrapping, gathered checkpoints, resume, validation) runs unchanged in CI. The one
plugin setting changed is `sync_module_states`, which torch's FSDP allows only on GPUs (every rank here builds
identical weights from the same seed instead).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, set_seed

from xvla.configio import load_config
from xvla.train import checkpointing, run_folder, trainer
from xvla.train.config import TrainConfig
from xvla.train.distributed import fsdp_plugin, make_accelerator
from xvla.train.job import build_job


class Stopped(Exception):
    """Stands in for the job being killed right after a checkpoint."""


def fsdp_on_cpu(cfg: TrainConfig, accelerator: Accelerator) -> None:
    # The plugin asks for the current accelerator device only to place meta-initialised weights.
    with (
        mock.patch("accelerate.utils.dataclasses.is_cuda_available", return_value=True),
        mock.patch("torch.cuda.current_device", return_value="cpu"),
    ):
        plugin = fsdp_plugin(cfg)
    plugin.sync_module_states = False
    for state in (accelerator.state.__dict__, PartialState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
        state["device"] = torch.device(
            "cpu"
        )  # FSDP compares it with the parameters' device ("cpu:0" != "cpu")
    accelerator.state.fsdp_plugin = plugin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("result_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--fail-rank-state")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, args.config)
    partial = cfg.optim.prompt_warmup_steps > 0
    accelerator = make_accelerator(dataclasses.replace(cfg, fsdp=False), partial_training=partial)
    if cfg.fsdp:
        fsdp_on_cpu(cfg, accelerator)
    if args.stop_at is not None:
        save = run_folder.save_checkpoint

        def save_then_stop(folder: Path, *a: object, **kw: object) -> None:
            save(folder, *a, **kw)
            if checkpointing.checkpoint_step(folder) == args.stop_at:
                raise Stopped

        run_folder.save_checkpoint = save_then_stop
    if args.fail_rank_state is not None:
        fail_rank, fail_step = map(int, args.fail_rank_state.split(":"))
        save_rank_state = checkpointing.save_rank_state

        def failing_save(folder: Path, rank: int, state: dict[str, Any]) -> None:
            if rank == fail_rank and folder.name.endswith(f"step_{fail_step:08d}"):
                raise OSError(errno.EIO, "Input/output error (injected)")
            save_rank_state(folder, rank, state)

        checkpointing.save_rank_state = failing_save
    set_seed(cfg.seed)
    job = build_job(cfg)
    try:
        with contextlib.suppress(Stopped):
            trainer.run(cfg, job, accelerator, resume=args.resume)
    except checkpointing.CheckpointWriteError as err:
        (Path(args.result_dir) / f"error_{accelerator.process_index}.txt").write_text(str(err))
        sys.exit(2)
    flat = torch.cat(
        [p.detach().flatten().double() for p in job.model.parameters()]
    )  # FSDP: this rank's shard
    digest = [float(flat.sum()), float(flat.square().sum()), float((flat * torch.arange(len(flat))).sum())]
    out = Path(args.result_dir) / f"rank_{accelerator.process_index}.json"
    out.write_text(
        json.dumps(
            {
                "distributed_type": str(accelerator.distributed_type),
                "num_processes": accelerator.num_processes,
                "digest": digest,
            }
        )
    )


if __name__ == "__main__":
    main()
