"""The training loop, on Hugging Face `accelerate`: the same code on CPU, one GPU, DDP and FSDP, one or many nodes.

`train(cfg)` builds the model (a preset or a checkpoint) and the data mixture, then `run(...)` trains it.
`xvla.train.adapt` builds a different `Job` (a grown checkpoint, maybe LoRA-wrapped) and reuses `run`.

Output folder:
    train_config.json          the config of the run (a second run into the same folder is refused)
    checkpoints/step_XXXXXXXX/ servable model + training_state/ (see checkpointing.py)
    history.json               training loss per logged step: overall, per term, per source, LR per group
    validation.json            flow loss and L1 of sampled chunks per source and overall, per validation
    tensorboard/               scalars (when enabled)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType, ProjectConfiguration, send_to_device, set_seed
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from xvla.config import XVLAConfig, get_preset
from xvla.data.mixture import MixtureDataset
from xvla.data.sources import Mixture
from xvla.data.transforms import ObservationTransform, collate
from xvla.model.checkpoint import read_checkpoint
from xvla.model.fast.training import (  # the repeated layers: FSDP units, recompute, compile
    LAYER_CLASSES,
    prepare_training,
)
from xvla.model.tokenizer import build_tokenizer, check_fits, load_tokenizer
from xvla.model.xvla import XVLA
from xvla.train import checkpointing as ckpt
from xvla.train.config import ConfigError, TrainConfig, save_config, to_dict
from xvla.train.optim import (
    PROMPT_PHASE_GROUPS,
    build_optimizer,
    build_scheduler,
    check_groups,
    set_trainable,
)

log = logging.getLogger(__name__)

ALL_GROUPS = ("vlm", "transformer", "soft_prompts", "action_heads")
# Files a run writes into its output folder (read back by the demo and by users' scripts).
HISTORY_FILE = "history.json"
VALIDATION_FILE = "validation.json"
ADAPTATION_FILE = "adaptation.json"
BART_VOCAB = 50265  # facebook/bart-large's tokenizer size (Florence-2 adds tokens on top)
BUILTIN_VOCAB = 4096  # upper bound for the offline BPE (its small built-in corpus yields far fewer merges)


@dataclass
class Job:
    """What `run` trains. `train` makes one from a preset or checkpoint; `adapt` from a grown checkpoint."""

    model: nn.Module  # the module optimised: an XVLA, or a peft model around one
    xvla: XVLA  # the XVLA inside `model` (config, action space, generate)
    groups: dict[str, list[nn.Parameter]]  # optimiser groups, disjoint, covering every trainable parameter
    tokenizer: Any
    mixture: Mixture  # the training data
    sources: dict[str, dict[str, Any]]  # every source the model serves (written as sources.json)
    prompt_groups: tuple[str, ...] = PROMPT_PHASE_GROUPS  # trainable during optim.prompt_warmup_steps
    main_groups: tuple[str, ...] = ALL_GROUPS  # trainable afterwards
    # Writes the servable model from a full state dict of `model` into a folder (None: XVLA.save_pretrained).
    export: Callable[[dict[str, Tensor], Path], None] | None = None
    adaptation: dict[str, Any] | None = None  # what `adapt` did (written to <output_dir>/adaptation.json)


# ------------------------------------------------------------------------------------------------ public API
def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train as `cfg` says; returns the final checkpoint folder. `resume` continues the run in
    `cfg.output_dir` from its latest checkpoint (or starts it when there is none)."""
    cfg.validate()
    accelerator = make_accelerator(cfg, partial_training=cfg.optim.prompt_warmup_steps > 0)
    set_seed(cfg.seed)  # identical initial weights on every rank
    job = build_job(cfg)
    return run(cfg, job, accelerator, resume=resume)


def load_mixture(cfg: TrainConfig) -> Mixture:
    spec = cfg.data.mixture
    if spec is None:
        raise ConfigError("data.mixture: required (a mixture JSON/YAML file, or the mixture inline)")
    return Mixture.from_dict(spec) if isinstance(spec, dict) else Mixture.load(spec)


def build_job(cfg: TrainConfig) -> Job:
    """Model from `cfg.model` (checkpoint, else preset + overrides), its tokenizer, and the mixture."""
    mixture = load_mixture(cfg)
    sources: dict[str, dict[str, Any]] = {}
    if cfg.model.checkpoint is not None:
        if cfg.model.overrides:
            raise ConfigError("model.overrides: only for presets; a checkpoint fixes the architecture")
        model = XVLA.from_pretrained(cfg.model.checkpoint).train()
        tokenizer = load_tokenizer(cfg.model.checkpoint)
        sources = read_sources(Path(cfg.model.checkpoint))
    else:
        model = XVLA(preset_config(cfg.model.preset, cfg.model.overrides)).train()
        tokenizer = preset_tokenizer(cfg.model.tokenizer, model.config)
    check_fits(tokenizer, model.config.text.vocab_size)
    check_mixture(mixture, model)
    sources = merge_sources(sources, mixture)
    groups = model.parameter_groups()
    check_groups(model, groups)
    return Job(model=model, xvla=model, groups=groups, tokenizer=tokenizer, mixture=mixture, sources=sources)


def preset_config(name: str, overrides: dict[str, Any]) -> XVLAConfig:
    """A preset with field overrides, dotted or nested ({"image_size": 64, "head.num_domains": 4})."""
    data = get_preset(name).to_dict()
    for key, value in _flat(overrides, keep_types=True).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"model.overrides: {key!r}: {part!r} is not a section of XVLAConfig")
            node = node[part]
        if leaf not in node:
            raise ConfigError(
                f"model.overrides: {key!r} is not an XVLAConfig field (known here: {sorted(node)})"
            )
        node[leaf] = value
    return XVLAConfig.from_dict(data)


def preset_tokenizer(name: str | None, config: XVLAConfig) -> Any:
    """`name` (folder or hub id); "builtin" = a byte-level BPE trained offline; None = BART's tokenizer for a
    BART-sized vocabulary, else the builtin one."""
    if name == "builtin" or (name is None and config.text.vocab_size < BART_VOCAB):
        return build_tokenizer(vocab_size=min(config.text.vocab_size, BUILTIN_VOCAB))
    return load_tokenizer(name or "facebook/bart-large")


def check_mixture(mixture: Mixture, model: XVLA) -> None:
    """Every source must speak the model's action space and use one of its domains."""
    space = model.config.action_space
    for s in mixture.sources:
        if s.action_space != space:
            raise ValueError(
                f"mixture source {s.name!r}: action space {s.action_space!r} conflicts with the model's {space!r}"
            )
        if s.canonical_dim != model.action_space.input_dim:
            raise ValueError(
                f"mixture source {s.name!r}: canonical dim {s.canonical_dim} != the model's action dim "
                f"{model.action_space.input_dim}"
            )
        if not 0 <= s.domain_id < model.num_domains:
            raise ValueError(
                f"mixture source {s.name!r}: domain_id {s.domain_id} is outside the model's {model.num_domains} "
                "domains (use `xvla adapt` to add a domain, or model.overrides head.num_domains for a preset)"
            )


def read_sources(folder: Path) -> dict[str, dict[str, Any]]:
    """A checkpoint's `sources.json` as {name: Source dict} (a mixture dict or a list is accepted too)."""
    path = folder / "sources.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "sources" not in data:
        return data
    return {s.name: s.to_dict() for s in Mixture.from_dict(data).sources}


def merge_sources(known: dict[str, dict[str, Any]], mixture: Mixture) -> dict[str, dict[str, Any]]:
    """`known` sources plus the mixture's; a mixture source replaces any known one with its name or domain."""
    names = {s.name for s in mixture.sources}
    ids = {s.domain_id for s in mixture.sources}
    kept = {n: d for n, d in known.items() if n not in names and d.get("domain_id") not in ids}
    return {**kept, **{s.name: s.to_dict() for s in mixture.sources}}


# ------------------------------------------------------------------------------------------------ accelerate
def make_accelerator(cfg: TrainConfig, *, partial_training: bool) -> Accelerator:
    """bf16 autocast on GPU (fp32 master weights), DDP or FSDP from the launcher's environment.

    `partial_training`: some parameters are frozen for part of the run; DDP must then skip parameters that
    get no gradient (find_unused_parameters), FSDP must keep original parameters (use_orig_params).
    """
    # Without a GPU, accelerate must be told `cpu`: otherwise it ignores the launcher and every torchrun
    # process trains alone, all writing into one output folder.
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":
        precision = "no" if on_cpu else "bf16"
    fsdp = None
    if cfg.fsdp:
        if on_cpu:
            raise ConfigError("fsdp: needs GPUs (accelerate's FSDP has no CPU backend); use DDP on CPU")
        fsdp = fsdp_plugin(cfg)
    trackers: list[str] = []
    if cfg.log.tensorboard:
        trackers.append("tensorboard")
    if cfg.log.wandb and _wandb_available():
        trackers.append("wandb")
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=partial_training)],
        fsdp_plugin=fsdp,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard")
        ),
    )
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))  # set by torchrun/accelerate
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate joined "
            f"{accelerator.num_processes}: each would train alone into {cfg.output_dir}"
        )
    return accelerator


def fsdp_plugin(cfg: TrainConfig) -> FullyShardedDataParallelPlugin:
    """FULL_SHARD with each repeated layer (vision stage block, encoder layer, head block) as one unit."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=1,
        reshard_after_forward="FULL_SHARD",
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(LAYER_CLASSES),
        use_orig_params=True,
        state_dict_type="FULL_STATE_DICT",
        activation_checkpointing=cfg.model.activation_checkpointing,
        sync_module_states=True,
    )


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        log.warning("log.wandb is set but wandb is not installed; logging to TensorBoard only")
        return False
    return True


def _is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


# ------------------------------------------------------------------------------------------------------ data
class TransformedStream(IterableDataset):
    """`MixtureDataset` raw samples -> transformed model-batch entries (in the DataLoader workers).

    Colour jitter draws from a generator seeded by the sample's `augment_seed` (a function of its position in
    the stream), so resuming is exact with or without workers.
    """

    def __init__(self, dataset: MixtureDataset, transform: ObservationTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for raw in self.dataset:
            yield self.transform(raw, torch.Generator().manual_seed(raw["augment_seed"]))


def make_loader(
    job: Job, cfg: TrainConfig, accelerator: Accelerator, *, mixture: Mixture, split: str
) -> tuple[MixtureDataset, DataLoader]:
    """Per-process loader over `mixture` (the dataset shards itself by rank x worker)."""
    train = split == "train"
    dataset = MixtureDataset(
        mixture,
        split=split,
        seed=cfg.data.seed,
        split_seed=cfg.data.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        frame_cache_bytes=int(cfg.data.frame_cache_gib * 2**30),
    )
    workers = cfg.data.num_workers if train else 0
    if train and dataset.frame_cache_bytes:
        # Decode now, not during the first steps: before workers fork, so that they share one copy, and without
        # workers so that the logged samples/s is the steady rate (the decoding is the same work either way).
        t0 = time.perf_counter()
        cached = dataset.preload_frames()
        log.info(
            "decoded %.2f GiB of frames into the cache in %.1f s", cached / 2**30, time.perf_counter() - t0
        )
    loader = DataLoader(
        TransformedStream(
            dataset,
            ObservationTransform(job.xvla.config, job.tokenizer, train=train, augment=cfg.data.augment),
        ),
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=workers > 0,
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(cfg.data.seed * 1000 + accelerator.process_index),
    )
    return dataset, loader


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    return send_to_device(
        {k: v for k, v in batch.items() if isinstance(v, Tensor)}, device, non_blocking=True
    )


# ------------------------------------------------------------------------------------------------------ loop
def run(cfg: TrainConfig, job: Job, accelerator: Accelerator, *, resume: bool) -> Path:
    """Train `job` for `cfg.steps` optimiser steps; returns the final checkpoint folder."""
    out = Path(cfg.output_dir)
    _claim_output_dir(cfg, job, accelerator, resume)
    start = ckpt.latest_checkpoint(out) if resume else None
    if start is not None:
        _check_architecture(start, job.xvla.config)

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
    state = {"step": 0, "samples": 0, "history": _new_history(job), "validation": []}
    if start is not None:
        state = _load_checkpoint(start, accelerator, model, optimizer, scheduler, dataset, ema)
        _drop_untrained_state(optimizer, _trained_groups(job, cfg, state["step"]))
    else:
        set_seed(cfg.seed + 1, device_specific=True)  # dropout and flow draws differ per rank

    # TensorBoard writes to <output_dir>/tensorboard/<project>; wandb logs to project `log.wandb_project`.
    project = cfg.log.wandb_project if cfg.log.wandb else (cfg.log.run_name or "train")
    init_kwargs = {"wandb": {"name": cfg.log.run_name}} if cfg.log.wandb and cfg.log.run_name else {}
    accelerator.init_trackers(
        project, config=_flat(to_dict(cfg)), init_kwargs=init_kwargs
    )  # main process only
    domain_names = {s.domain_id: s.name for s in job.mixture.sources}
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
            batch = _to_device(raw, accelerator.device)
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
            _record(state["history"], step, scalars)
            accelerator.log(scalars, step=step)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", sps=f"{rate:.1f}")
            if accelerator.is_main_process:
                _write_json(out / HISTORY_FILE, state["history"])

        pause_start = time.perf_counter()
        if cfg.val.every and (step % cfg.val.every == 0 or step == cfg.steps):
            result = validate(model, job, cfg, accelerator)
            if result:
                state["validation"].append({"step": step, **result})
                accelerator.log(_flat({"val": result}, sep="/"), step=step)
                accelerator.print(f"step {step}: validation {json.dumps(result['overall'])}")
                if accelerator.is_main_process:
                    _write_json(out / VALIDATION_FILE, state["validation"])

        if step % cfg.checkpoint.every == 0 or step == cfg.steps:
            state["step"] = step
            data_state = dataset.state_dict(
                batches=batches_read, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers
            )
            folder = ckpt.checkpoint_path(out, step)
            save_checkpoint(
                folder, cfg, job, accelerator, model, optimizer, scheduler, data_state, ema, state
            )
        paused += time.perf_counter() - pause_start
    bar.close()
    accelerator.end_training()
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


# ------------------------------------------------------------------------------------------------ validation
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
            batch = _to_device(raw, accelerator.device)
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
    if not _is_fsdp(accelerator):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(model, writeback=False)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(
    folder: Path,
    cfg: TrainConfig,
    job: Job,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_state: dict[str, Any],
    ema: AveragedModel | None,
    state: dict[str, Any],
) -> None:
    """Atomic checkpoint: servable model + training state of every rank; then prune to keep_last."""
    # Gathered to CPU (rank 0 only) from accelerators; on CPU "offloading" would return views of FSDP's
    # flat parameters that are freed when it reshards.
    options = StateDictOptions(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu")
    model_state = get_model_state_dict(model, options=options)  # collective under FSDP
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    with ckpt.atomic_checkpoint(accelerator, folder) as tmp:
        if accelerator.is_main_process:
            if job.export is not None:
                job.export(ema.module.state_dict() if ema is not None else model_state, tmp)
            else:
                (
                    ema.module if ema is not None else _exportable(job, accelerator, model, model_state)
                ).save_pretrained(tmp)
            job.tokenizer.save_pretrained(str(tmp))
            _write_json(tmp / "sources.json", job.sources)
            torch.save(optim_state, tmp / ckpt.STATE / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / ckpt.STATE / "scheduler.pt")
            if ema is not None or job.export is not None:  # the servable weights are not the raw ones
                torch.save(model_state, tmp / ckpt.STATE / "model.pt")
            if ema is not None:
                torch.save(ema.state_dict(), tmp / ckpt.STATE / "ema.pt")
            _write_json(tmp / ckpt.STATE / "trainer.json", {**state, "world_size": accelerator.num_processes})
            save_config(cfg, tmp / ckpt.STATE / "train_config.json")
        ckpt.save_rank_state(tmp, accelerator.process_index, {"rng": ckpt.rng_state(), "data": data_state})
    if accelerator.is_main_process:
        ckpt.prune_checkpoints(cfg.output_dir, cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()


def _exportable(
    job: Job, accelerator: Accelerator, model: nn.Module, model_state: dict[str, Tensor]
) -> nn.Module:
    """The module to export. Under FSDP the full weights exist only in `model_state`: load them into a copy."""
    if not _is_fsdp(accelerator):
        return accelerator.unwrap_model(model)
    with torch.random.fork_rng(devices=[]):  # initialising the copy must not move the training RNG stream
        copy = XVLA(job.xvla.config)
    copy.load_state_dict(model_state)
    return copy


def _load_checkpoint(
    folder: Path,
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    dataset: MixtureDataset,
    ema: AveragedModel | None,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, history, ...)."""
    state_dir = folder / ckpt.STATE
    raw = state_dir / "model.pt"
    if raw.is_file():
        model_state = ckpt.load_file(raw, map_location="cpu")
    else:
        _, model_state, _ = read_checkpoint(folder)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    optim_state = ckpt.load_file(state_dir / "optimizer.pt", map_location="cpu")
    # Not strict: parameters frozen until now (prompt warm-up) have no optimiser state yet.
    set_optimizer_state_dict(
        model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    scheduler.load_state_dict(ckpt.load_file(state_dir / "scheduler.pt"))
    if ema is not None:
        ema.load_state_dict(ckpt.load_file(state_dir / "ema.pt", map_location=accelerator.device))
    rank = ckpt.load_rank_state(folder, accelerator.process_index, accelerator.num_processes)
    dataset.load_state_dict(rank["data"])
    ckpt.set_rng_state(rank["rng"])
    state = json.loads((state_dir / "trainer.json").read_text())
    state.pop("world_size")
    accelerator.print(f"resumed from {folder} at step {state['step']}")
    return state


def _trained_groups(job: Job, cfg: TrainConfig, step: int) -> set[str]:
    """The parameter groups that took at least one optimiser step before `step`."""
    warmup = cfg.optim.prompt_warmup_steps
    return (set(job.prompt_groups) if min(step, warmup) > 0 else set()) | (
        set(job.main_groups) if step > warmup else set()
    )


def _drop_untrained_state(optimizer: torch.optim.Optimizer, trained: set[str]) -> None:
    """Loading an optimiser state (torch.distributed.checkpoint) first runs a zero-gradient step that gives
    every parameter AdamW state at step 1. Groups that had not trained yet must start without state, as in an
    uninterrupted run: otherwise their first update is bias-corrected as a second one (0.73x its size)."""
    for group in optimizer.param_groups:
        if group["name"] not in trained:
            for p in group["params"]:
                optimizer.state.pop(p, None)


def _make_ema(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    if cfg.checkpoint.ema_decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.checkpoint.ema_decay), use_buffers=True)


def _claim_output_dir(cfg: TrainConfig, job: Job, accelerator: Accelerator, resume: bool) -> None:
    """Refuse to mix two runs in one folder; record this run's config."""
    out = Path(cfg.output_dir)
    marker = out / "train_config.json"
    if marker.exists() and not resume:
        raise FileExistsError(
            f"output folder {out} holds another run ({marker.name}); pass --resume to continue it, or choose "
            "another output_dir"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(out)  # left by a run killed mid-save
        _write_json(marker, to_dict(cfg))
        if job.adaptation is not None:
            _write_json(out / ADAPTATION_FILE, job.adaptation)
    accelerator.wait_for_everyone()


def _check_architecture(folder: Path, config: XVLAConfig) -> None:
    if not (folder / "config.json").is_file():
        return  # an adapter-only checkpoint: loading its raw state checks every shape
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("format", None)
    diffs = _diff(saved, config.to_dict())
    if diffs:
        raise ValueError(
            f"checkpoint {folder} is from a different architecture than this run's model: "
            + "; ".join(diffs[:8])
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {a!r} vs run {b!r}"]


# --------------------------------------------------------------------------------------------------- metrics
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


def _new_history(job: Job) -> dict[str, Any]:
    return {"step": [], "loss": [], "per_source": {s.name: [] for s in job.mixture.sources}, "scalars": {}}


def _record(history: dict[str, Any], step: int, scalars: dict[str, float]) -> None:
    """Append one logged step; per-source entries are None for a source absent from the interval."""
    history["step"].append(step)
    history["loss"].append(scalars["train/loss"])
    for name, values in history["per_source"].items():
        values.append(scalars.get(f"source/{name}"))
    for key, value in scalars.items():
        if not key.startswith("source/"):
            history["scalars"].setdefault(key, []).append(value)


def _forever(loader: DataLoader) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def _flat(data: dict[str, Any], prefix: str = "", sep: str = ".", keep_types: bool = False) -> dict[str, Any]:
    """Nested dicts -> {"a.b": value}; values other than scalars become strings unless `keep_types`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flat(value, name, sep, keep_types))
        else:
            out[name] = value if keep_types or isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
