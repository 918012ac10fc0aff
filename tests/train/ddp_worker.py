"""Run under `torchrun --nproc_per_node 2`: train from a config file, then write every rank's weights checksum.

Usage: ddp_worker.py CONFIG.json RESULT_DIR (writes RESULT_DIR/rank_<i>.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from xvla.train.config import TrainConfig, load_config
from xvla.train.trainer import build_job, make_accelerator, run


def main(config_path: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, config_path)
    accelerator = make_accelerator(cfg, partial_training=cfg.optim.prompt_warmup_steps > 0)
    set_seed(cfg.seed)
    job = build_job(cfg)
    world = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
    }
    run(cfg, job, accelerator, resume=False)
    flat = torch.cat([p.detach().flatten().double() for p in job.model.parameters()])
    digest = [float(flat.sum()), float(flat.square().sum()), float((flat * torch.arange(len(flat))).sum())]
    out = Path(result_dir) / f"rank_{accelerator.process_index}.json"
    out.write_text(json.dumps({**world, "digest": digest}))


if __name__ == "__main__":
    main(*sys.argv[1:])
