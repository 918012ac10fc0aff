"""Validation: flow loss and L1 of sampled chunks on each source's held-out episodes, during training."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from xvla.data.sources import Mixture
from xvla.train.config import TrainConfig
from xvla.train.distributed import is_fsdp, make_loader, to_device
from xvla.train.job import Job


@torch.no_grad()
def validate(model: nn.Module, job: Job, cfg: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Flow loss and L1 of sampled chunks (over the source's arms) on held-out episodes, per source and overall.

    Draws t and noise from a generator seeded by `cfg.seed`, so validation never moves the training RNG and
    every validation sees the same samples and draws.
    """
    held_out = [s for s in job.mixture.sources if s.val_fraction > 0 or s.val_count > 0]
    if not held_out:
        return {}
    xvla = job.xvla
    space = xvla.action_space
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + accelerator.process_index)
    sums = torch.zeros(len(held_out), 3, dtype=torch.float64, device=accelerator.device)  # loss, l1, count
    for i, source in enumerate(held_out):
        _, loader = make_loader(job, cfg, accelerator, mixture=Mixture((source,)), split="val")
        for n, raw in enumerate(loader):
            if n == cfg.val.batches:
                break
            batch = to_device(raw, accelerator.device)
            b = batch["proprio"].shape[0]
            t = ((torch.rand(1, generator=gen) + torch.arange(b) / b) % (1 - 1e-5)).to(accelerator.device)
            shape = (b, xvla.config.num_actions, space.dim)
            noise = torch.randn(shape, generator=gen).to(accelerator.device)
            with accelerator.autocast():
                output = model(batch, t=t, noise=noise)
                with _full_params(model, accelerator):
                    chunk = xvla.generate(
                        batch,
                        steps=cfg.val.sample_steps,
                        noise=torch.randn(shape, generator=gen).to(accelerator.device),
                    )
            # The canonical vector holds two arms; a single-arm source fills the left half, the rest is padding.
            width = chunk.shape[-1] * source.num_arms // 2
            error = chunk[..., :width].float() - batch["action"][..., :width].float()
            l1 = error.abs().flatten(1).mean(1)
            sums[i, 0] += output.per_sample.double().sum()
            sums[i, 1] += l1.double().sum()
            sums[i, 2] += b
    sums = accelerator.reduce(sums, reduction="sum")
    model.train(was_training)
    per_source = {
        s.name: {"flow_loss": float(row[0] / row[2]), "l1": float(row[1] / row[2]), "samples": int(row[2])}
        for s, row in zip(held_out, sums.tolist(), strict=True)
        if row[2] > 0
    }
    total = sums.sum(0)
    overall = {
        "flow_loss": float(total[0] / total[2]),
        "l1": float(total[1] / total[2]),
        "samples": int(total[2]),
    }
    return {"overall": overall, "per_source": per_source}


def _full_params(model: nn.Module, accelerator: Accelerator) -> contextlib.AbstractContextManager[Any]:
    """Sampling calls the inner model directly: under FSDP its weights must be gathered first."""
    if not is_fsdp(accelerator):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(model, writeback=False)
