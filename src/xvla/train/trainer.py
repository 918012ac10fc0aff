"""The training loop, on Hugging Face `accelerate`: the same code on CPU, one GPU, DDP and FSDP, one or many nodes.

`train(cfg)` builds the model (a preset or a checkpoint) and the data mixture, then `run(...)` trains it.
`xvla.train.adapt` builds a different `Job` (a grown checkpoint, maybe LoRA-wrapped) and reuses `run`.

Around the loop: `job.py` (what is trained), `distributed.py` (the accelerator and each process's loader),
`validation.py` (held-out losses) and `run_folder.py` (the output folder: history, checkpoints, resume).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xvla.configio import ConfigError, flatten, to_dict
from xvla.data.sources import Mixture
from xvla.model.fast.training import prepare_training  # recompute and compile of the repeated layers
from xvla.train import checkpointing as ckpt
from xvla.train import run_folder
from xvla.train.config import TrainConfig
from xvla.train.distributed import make_accelerator, make_loader, to_device
from xvla.train.job import Job, build_job
from xvla.train.optim import build_optimizer, build_scheduler, set_trainable
from xvla.train.validation import validate

GLOO_DRAIN_S = 0.5  # seconds a multi-process CPU run waits at its end for gloo's worker thread (see `run`)


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train as `cfg` says; returns the final checkpoint folder. `resume` continues the run in
    `cfg.output_dir` from its latest checkpoint (or starts it when there is none)."""
    cfg.validate()
    accelerator = make_accelerator(cfg, partial_training=cfg.optim.prompt_warmup_steps > 0)
    set_seed(cfg.seed)  # identical initial weights on every rank
    job = build_job(cfg)
    return run(cfg, job, accelerator, resume=resume)


def run(cfg: TrainConfig, job: Job, accelerator: Accelerator, *, resume: bool) -> Path:
    """Train `job` for `cfg.steps` optimiser steps; returns the final checkpoint folder."""
    out = Path(cfg.output_dir)
    run_folder.claim_output_dir(cfg, job, accelerator, resume)
    start = ckpt.latest_checkpoint(out) if resume else None
    if start is not None:
        run_folder.check_architecture(start, job.xvla.config)

    if not cfg.fsdp:  # under FSDP, accelerate's plugin applies activation checkpointing to the same layers
        prepare_training(
            job.model,
            compile_layers=cfg.model.compile,
            activation_checkpointing=cfg.model.activation_checkpointing,
        )
    if cfg.checkpoint.ema_decay is not None and cfg.fsdp:
        raise ConfigError("checkpoint.ema_decay: EMA of weights is not supported together with fsdp")

    # Everything is trainable when wrapped (DDP registers hooks for trainable parameters only); phases then
    # freeze parts with requires_grad, which DDP skips because find_unused_parameters is on.
    set_trainable(job.groups, tuple(job.groups))
    optimizer = build_optimizer(job.groups, cfg.optim, device_type=accelerator.device.type)
    joining = {g: cfg.optim.prompt_warmup_steps for g in job.main_groups if g not in job.prompt_groups}
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps, start_steps=joining)
    # Counted before wrapping: under FSDP each rank's parameters are shards afterwards.
    group_sizes = {name: sum(p.numel() for p in params) for name, params in job.groups.items()}
    total = sum(p.numel() for p in job.model.parameters())
    model, optimizer = accelerator.prepare(job.model, optimizer)
    ema = _make_ema(cfg, accelerator.unwrap_model(model))

    dataset, loader = make_loader(job, cfg, accelerator, mixture=job.mixture, split="train")
    state: dict[str, Any] = {
        "step": 0,
        "samples": 0,
        "history": run_folder.new_history(job),
        "validation": [],
    }
    if start is not None:
        state = run_folder.load_checkpoint(start, accelerator, model, optimizer, scheduler, dataset, ema)
        run_folder.drop_untrained_state(optimizer, run_folder.trained_groups(job, cfg, state["step"]))
    else:
        set_seed(cfg.seed + 1, device_specific=True)  # dropout and flow draws differ per rank

    # TensorBoard writes to <output_dir>/tensorboard/<project>; wandb logs to project `log.wandb_project`.
    project = cfg.log.wandb_project if cfg.log.wandb else (cfg.log.run_name or "train")
    init_kwargs = {"wandb": {"name": cfg.log.run_name}} if cfg.log.wandb and cfg.log.run_name else {}
    accelerator.init_trackers(
        project, config=flatten(to_dict(cfg)), init_kwargs=init_kwargs
    )  # main process only
    # Per-source training losses are kept by domain: a domain several sources share logs none for them.
    shared = job.mixture.shared_domains()
    domain_names = {s.domain_id: s.name for s in job.mixture.sources if s.domain_id not in shared}
    meter = _Meter(job.mixture, accelerator.device)
    batches = _forever(loader)
    bar = tqdm(
        total=cfg.steps,
        initial=state["step"],
        disable=not (cfg.log.progress and accelerator.is_main_process),
        desc="train",
        dynamic_ncols=True,
    )
    phase: tuple[str, ...] | None = None
    step = state["step"]
    batches_read = 0  # by this process since the dataset's (re)start: locates the data stream on save
    t_last, paused = time.perf_counter(), 0.0  # paused: validation/checkpoint time, left out of throughput
    final = ckpt.checkpoint_path(out, cfg.steps)
    while step < cfg.steps:
        wanted = job.prompt_groups if step < cfg.optim.prompt_warmup_steps else job.main_groups
        if wanted != phase:
            phase = wanted
            set_trainable(job.groups, phase)
            n_train = sum(group_sizes[g] for g in phase)
            accelerator.print(
                f"step {step}: training {', '.join(phase)}: {n_train:,} of {total:,} parameters "
                f"({100 * n_train / total:.2f}%)"
            )
        model.train()
        per_sample, domains = [], []  # this step's sample losses and their sources (the divergence check)
        for micro in range(cfg.grad_accum):
            raw = next(batches)
            batches_read += 1
            batch = to_device(raw, accelerator.device)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                output = model(batch)
                accelerator.backward(output.loss / cfg.grad_accum)
            meter.add(output, batch["domain_id"])
            per_sample.append(output.per_sample.detach())
            domains.append(batch["domain_id"])
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        _stop_if_diverged(
            step + 1, torch.cat(per_sample), torch.cat(domains), grad_norm, domain_names, accelerator, out
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))
        step += 1
        state["samples"] += cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        bar.update(1)

        if step % cfg.log.every == 0 or step == cfg.steps:
            now = time.perf_counter()
            scalars = meter.flush(accelerator, domain_names)
            steps_done = cfg.log.every if step % cfg.log.every == 0 else step % cfg.log.every
            samples = steps_done * cfg.batch_size * cfg.grad_accum * accelerator.num_processes
            rate = samples / max(now - t_last - paused, 1e-9)
            t_last, paused = now, 0.0
            scalars["train/samples_per_s"] = rate
            scalars["train/grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
            for group in optimizer.param_groups:
                scalars[f"lr/{group['name']}"] = group["lr"]
            if accelerator.device.type == "cuda":
                scalars["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            run_folder.record(state["history"], step, scalars)
            accelerator.log(scalars, step=step)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", sps=f"{rate:.1f}")
            if accelerator.is_main_process:
                run_folder.write_history(out, state["history"])

        pause_start = time.perf_counter()
        if cfg.val.every and (step % cfg.val.every == 0 or step == cfg.steps):
            result = validate(model, job, cfg, accelerator)
            if result:
                state["validation"].append({"step": step, **result})
                accelerator.log(flatten({"val": result}, sep="/"), step=step)
                accelerator.print(f"step {step}: validation {json.dumps(result['overall'])}")
                if accelerator.is_main_process:
                    run_folder.write_validation(out, state["validation"])

        if step % cfg.checkpoint.every == 0 or step == cfg.steps:
            state["step"] = step
            data_state = dataset.state_dict(
                batches=batches_read, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers
            )
            folder = ckpt.checkpoint_path(out, step)
            run_folder.save_checkpoint(
                folder, cfg, job, accelerator, model, optimizer, scheduler, data_state, ema, state
            )
        paused += time.perf_counter() - pause_start
    bar.close()
    accelerator.end_training()
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        # Gloo's worker thread can still hold the last reference to the final barrier's work, whose tensors are
        # Python objects, and needs the GIL to free them; DDP's reducer, freed when this returns, destroys the
        # process group and joins that thread while holding the GIL (torch 2.13: one rank of a 2-process CPU run
        # hung there after its final checkpoint; pytorch#56297). Sleeping releases the GIL so the thread ends first.
        time.sleep(GLOO_DRAIN_S)
    return final


class DivergedError(RuntimeError):
    """A non-finite loss or gradient norm: training stops before the weights (and any checkpoint) take it."""


def _stop_if_diverged(
    step: int,
    per_sample: Tensor,
    domain_ids: Tensor,
    grad_norm: Tensor | None,
    names: dict[int, str],
    accelerator: Accelerator,
    out: Path,
) -> None:
    """Raise DivergedError, naming the step and the batch's sources, when this step's loss or gradient norm is
    NaN or inf: one such optimiser step makes every weight non-finite, and every later checkpoint with it.
    Costs one tiny all-reduce (every rank stops at the same step) and one device sync per step."""
    bad_loss = ~torch.isfinite(per_sample)
    norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=per_sample.device).float()
    flags = torch.stack([bad_loss.any().float(), (~torch.isfinite(norm)).float()])
    if not bool(accelerator.reduce(flags, reduction="sum").any()):
        return

    def sources(mask: Tensor) -> str:
        ids, counts = domain_ids[mask].unique(return_counts=True)
        return ", ".join(
            f"{names.get(int(i), f'domain {int(i)}')} x{int(n)}" for i, n in zip(ids, counts, strict=True)
        )

    problems = []
    if bool(bad_loss.any()):
        problems.append(f"non-finite loss for {int(bad_loss.sum())} sample(s) from {sources(bad_loss)}")
    if not bool(torch.isfinite(norm)):
        problems.append(f"gradient norm {float(norm)}")
    where = ""
    if accelerator.num_processes > 1:
        where = f" on rank {accelerator.process_index}"
        problems = problems or ["another rank's loss was non-finite"]
    latest = ckpt.latest_checkpoint(out)
    raise DivergedError(
        f"step {step}{where}: {'; '.join(problems)} (batch: {sources(torch.ones_like(bad_loss))}); stopped before "
        f"the optimiser step, so no weights or checkpoint hold NaN; last checkpoint: {latest or 'none'}. Check "
        "those sources' actions and states for absurd magnitudes (wrong units), or lower optim.lr"
    )


def _make_ema(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    if cfg.checkpoint.ema_decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.checkpoint.ema_decay), use_buffers=True)


class _Meter:
    """Sums of loss terms and per-source losses between two logs (reduced across processes on flush)."""

    def __init__(self, mixture: Mixture, device: torch.device) -> None:
        self.num_domains = max(s.domain_id for s in mixture.sources) + 1
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, Tensor] = {}
        self.loss = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of batch losses, batches
        self.per_domain = torch.zeros(2, self.num_domains, dtype=torch.float64, device=self.device)

    def add(self, output: Any, domain_id: Tensor) -> None:
        self.loss += torch.stack(
            [output.loss.detach().double(), torch.ones((), dtype=torch.float64, device=self.device)]
        )
        for name, value in output.terms.items():
            self.terms[name] = self.terms.get(name, 0) + value.detach().double()
        per = output.per_sample.detach().double()
        self.per_domain[0].index_add_(0, domain_id, per)
        self.per_domain[1].index_add_(0, domain_id, torch.ones_like(per))

    def flush(self, accelerator: Accelerator, names: dict[int, str]) -> dict[str, float]:
        names_sorted = sorted(self.terms)
        terms = torch.stack([self.terms[n] for n in names_sorted]) if names_sorted else self.loss[:0]
        packed = torch.cat([self.loss, terms, self.per_domain.flatten()])
        packed = accelerator.reduce(packed, reduction="sum").tolist()
        loss_sum, batches = packed[0], packed[1]
        out = {"train/loss": loss_sum / batches}
        for i, name in enumerate(names_sorted):
            out[f"train/{name}"] = packed[2 + i] / batches
        dom = packed[2 + len(names_sorted) :]
        sums, counts = dom[: self.num_domains], dom[self.num_domains :]
        for d, name in names.items():
            if counts[d] > 0:
                out[f"source/{name}"] = sums[d] / counts[d]
        self.reset()
        return out


def _forever(loader: DataLoader) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader
