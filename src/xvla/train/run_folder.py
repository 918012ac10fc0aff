"""The output folder of a run: its config, training history, validation results, checkpoints, and resuming
from them. `checkpointing.py` below makes each checkpoint crash-safe (atomic folder, per-rank state, RNG).

    train_config.json          the config of the run (a second run into the same folder is refused)
    adaptation.json            what `xvla adapt` did (adapted runs only)
    checkpoints/step_XXXXXXXX/ servable model + training_state/ (see checkpointing.py)
    history.json               training loss per logged step: overall, per term, per source, LR per group
    validation.json            flow loss and L1 of sampled chunks per source and overall, per validation
    tensorboard/               scalars (when enabled)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim.swa_utils import AveragedModel

from xvla.config import XVLAConfig
from xvla.configio import save_config, to_dict
from xvla.data.mixture import MixtureDataset
from xvla.model.checkpoint import SOURCES_NAME, read_checkpoint
from xvla.model.xvla import XVLA
from xvla.train import checkpointing as ckpt
from xvla.train.config import TrainConfig
from xvla.train.distributed import is_fsdp
from xvla.train.job import Job

# Files a run writes into its output folder (read back by the demo and by users' scripts).
HISTORY_FILE = "history.json"
VALIDATION_FILE = "validation.json"
ADAPTATION_FILE = "adaptation.json"


def claim_output_dir(cfg: TrainConfig, job: Job, accelerator: Accelerator, resume: bool) -> None:
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


# ---------------------------------------------------------------------------------------------------- history
def new_history(job: Job) -> dict[str, Any]:
    """An empty history (`history.json`): steps, losses, per-source losses, other scalars; `record` fills it."""
    return {"step": [], "loss": [], "per_source": {s.name: [] for s in job.mixture.sources}, "scalars": {}}


def record(history: dict[str, Any], step: int, scalars: dict[str, float]) -> None:
    """Append one logged step; per-source entries are None for a source absent from the interval."""
    history["step"].append(step)
    history["loss"].append(scalars["train/loss"])
    for name, values in history["per_source"].items():
        values.append(scalars.get(f"source/{name}"))
    for key, value in scalars.items():
        if not key.startswith("source/"):
            history["scalars"].setdefault(key, []).append(value)


def write_history(out: Path, history: dict[str, Any]) -> None:
    """`history` (as `new_history` and `record` keep it) to <out>/history.json."""
    _write_json(out / HISTORY_FILE, history)


def write_validation(out: Path, results: list[dict[str, Any]]) -> None:
    """Every validation so far (`{"step": ..., **validate(...)}` each) to <out>/validation.json."""
    _write_json(out / VALIDATION_FILE, results)


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
    # collective under FSDP; full_state_dict gathers plain tensors
    model_state = cast(dict[str, Tensor], get_model_state_dict(model, options=options))
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    with ckpt.atomic_checkpoint(accelerator, folder) as tmp:
        if accelerator.is_main_process:
            if job.export is not None:
                job.export(ema.module.state_dict() if ema is not None else model_state, tmp)
            else:  # without an export hook the trained model is an XVLA (and so is its EMA copy)
                servable = (
                    cast(XVLA, ema.module)
                    if ema is not None
                    else _exportable(job, accelerator, model, model_state)
                )
                servable.save_pretrained(tmp)
            job.tokenizer.save_pretrained(str(tmp))
            _write_json(tmp / SOURCES_NAME, job.sources)
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


def _exportable(job: Job, accelerator: Accelerator, model: nn.Module, model_state: dict[str, Tensor]) -> XVLA:
    """The module to export. Under FSDP the full weights exist only in `model_state`: load them into a copy."""
    if not is_fsdp(accelerator):
        return accelerator.unwrap_model(model)
    with torch.random.fork_rng(devices=[]):  # initialising the copy must not move the training RNG stream
        copy = XVLA(job.xvla.config)
    copy.load_state_dict(model_state)
    return copy


# ----------------------------------------------------------------------------------------------------- resume
def check_architecture(folder: Path, config: XVLAConfig) -> None:
    """Refuse to resume from `folder` when its model differs from this run's `config` (names the differences)."""
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


def load_checkpoint(
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


def trained_groups(job: Job, cfg: TrainConfig, step: int) -> set[str]:
    """The parameter groups that took at least one optimiser step before `step`."""
    warmup = cfg.optim.prompt_warmup_steps
    return (set(job.prompt_groups) if min(step, warmup) > 0 else set()) | (
        set(job.main_groups) if step > warmup else set()
    )


def drop_untrained_state(optimizer: torch.optim.Optimizer, trained: set[str]) -> None:
    """Loading an optimiser state (torch.distributed.checkpoint) first runs a zero-gradient step that gives
    every parameter AdamW state at step 1. Groups that had not trained yet must start without state, as in an
    uninterrupted run: otherwise their first update is bias-corrected as a second one (0.73x its size)."""
    for group in optimizer.param_groups:
        if group["name"] not in trained:
            for p in group["params"]:
                optimizer.state.pop(p, None)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
