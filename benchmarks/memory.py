"""Peak training memory of a preset in the three ways users train it: full fine-tune, LoRA (the authors' r=8,
alpha=16 on every linear layer, prompts and heads trained) and prompts + heads only; each with and without
activation checkpointing, at several batch sizes.

    PYTHONPATH=src python benchmarks/memory.py --preset xvla-0.9b --device cuda --batch-sizes 8,16,32,64  # GPU
    PYTHONPATH=src python benchmarks/memory.py --preset xvla-0.9b --device cpu --batch-sizes 1,2          # anywhere

A measured step is the trainer's step: bf16 autocast, forward (flow loss) on a random full batch (every view
present), backward, grad clip 1.0, AdamW (the trainer's parameter groups and optimiser, fused on CUDA), gradients
set to None. Two steps run; the peak covers both, so the optimiser state is included.

Two meters, both on every device:
- torch's MemTracker: the live tensor storages (rounded up to the CUDA allocator's 512 B blocks) at the peak,
  split into parameters, gradients, optimiser state, activations and temporaries. On CPU this is the measurement.
- on CUDA, also `torch.cuda.max_memory_allocated` / `max_memory_reserved` (what the caching allocator handed out
  and held, workspaces and fragmentation included), measured in a second pass without the tracker.

The activation slope (GiB per sample) is the difference between the two largest batch sizes, so larger batches
can be read off as `peak(b) ~ peak(b_max) + slope x (b - b_max)`. Prints a table; writes
benchmarks/results/memory_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

import _common as C
from xvla.config import get_preset
from xvla.model.fast.training import prepare_training
from xvla.train.adapt import lora_groups, wrap_lora
from xvla.train.config import LoraSettings, OptimConfig
from xvla.train.optim import PROMPT_PHASE_GROUPS, build_optimizer, set_trainable

MODES = ("full", "lora", "prompt")
GIB = 2**30
# MemTracker's categories, named as in the table.
CATEGORIES = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Optstate": "optim",
    "Activation": "acts",
    "Temp": "temp",
}


def build(preset: str, mode: str, checkpointing: bool, device: torch.device) -> tuple[nn.Module, dict]:
    """The model as the trainer holds it in `mode`: (module to run, its trained parameter groups)."""
    model = C.build_model(preset, device).train()
    groups = model.parameter_groups()
    trained: nn.Module = model
    if mode == "lora":
        trained = wrap_lora(model, LoraSettings())  # peft freezes every base weight, prompts and heads too
        groups = lora_groups(groups, trained)
    set_trainable(groups, PROMPT_PHASE_GROUPS if mode == "prompt" else tuple(groups))
    if mode == "prompt":
        groups = {g: groups[g] for g in PROMPT_PHASE_GROUPS}
    prepare_training(trained, compile_layers=False, activation_checkpointing=checkpointing)
    return trained, groups


def train_steps(
    model: nn.Module,
    groups: dict,
    batch: dict,
    device: torch.device,
    after_step: Callable[[], None] = lambda: None,
) -> None:
    """Two optimiser steps (the second with optimiser state allocated)."""
    params = [p for ps in groups.values() for p in ps]
    optimizer = build_optimizer(groups, OptimConfig(), device_type=device.type)
    for _ in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step()
    C.synchronize(device)


class _NoHook:
    def remove(self) -> None:
        pass


def tracked_peak(model: nn.Module, groups: dict, batch: dict, device: torch.device) -> dict[str, float]:
    """MemTracker's split at the peak, in GiB, and the total."""
    tracker = MemTracker()
    tracker.track_external(model, *batch.values())
    # MemTracker hooks every parameter's gradient, and torch refuses hooks on frozen parameters (which never
    # get one): mark those as hooked already.
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    with tracker:
        train_steps(model, groups, batch, device, after_step=tracker.reset_mod_stats)
    (peak,) = (v for k, v in tracker.get_tracker_snapshot("peak").items() if k.type == device.type)
    out = {CATEGORIES[k.value]: v / GIB for k, v in peak.items() if getattr(k, "value", None) in CATEGORIES}
    out["peak_gib"] = peak["Total"] / GIB
    return out


def allocator_peak(model: nn.Module, groups: dict, batch: dict, device: torch.device) -> dict[str, float]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    train_steps(model, groups, batch, device)
    return {
        "cuda_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "cuda_max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        "cuda_before_gib": base / GIB,
    }


def measure(args: argparse.Namespace, device: torch.device, mode: str, ckpt: bool, b: int) -> dict[str, Any]:
    row: dict[str, Any] = {"mode": mode, "ckpt": ckpt, "batch": b}
    model = groups = batch = None
    try:
        model, groups = build(args.preset, mode, ckpt, device)
        cfg = get_preset(args.preset)
        row["trainable_m"] = sum(p.numel() for ps in groups.values() for p in ps) / 1e6
        batch = C.random_batch(cfg, b, args.views or cfg.num_views, device, seed=b, actions=True)
        t0 = time.perf_counter()
        row.update(tracked_peak(model, groups, batch, device))
        row["seconds"] = time.perf_counter() - t0
        if device.type == "cuda":
            model.zero_grad(set_to_none=True)
            row.update(allocator_peak(model, groups, batch, device))
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        del model, groups, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_slopes(rows: list[dict[str, Any]]) -> None:
    """GiB per extra sample between the two largest measured batch sizes of each (mode, ckpt)."""
    for mode in MODES:
        for ckpt in (False, True):
            done = [r for r in rows if r["mode"] == mode and r["ckpt"] == ckpt and "peak_gib" in r]
            if len(done) >= 2:
                a, b = done[-2], done[-1]
                b["gib_per_sample"] = (b["peak_gib"] - a["peak_gib"]) / (b["batch"] - a["batch"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="xvla-0.9b")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--batch-sizes", default=None, help="comma list, increasing (default 8,16,32,64 on CUDA; 1,2)"
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--ckpt", choices=("both", "on", "off"), default="both", help="activation checkpointing")
    p.add_argument("--views", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.pick_device(args.device)
    sizes = [
        int(s) for s in (args.batch_sizes or ("8,16,32,64" if device.type == "cuda" else "1,2")).split(",")
    ]
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)} (choose from {', '.join(MODES)})")
    ckpts = {"both": (False, True), "on": (True,), "off": (False,)}[args.ckpt]
    env = C.environment(device)
    rows: list[dict[str, Any]] = []
    for mode in modes:
        for ckpt in ckpts:
            for b in sizes:
                row = measure(args, device, mode, ckpt, b)
                rows.append(row)
                shown = "OOM" if row.get("oom") else f"{row['peak_gib']:.2f} GiB ({row['seconds']:.0f} s)"
                print(f"{mode:6} ckpt={'on ' if ckpt else 'off'} batch {b:3}: {shown}", flush=True)
                if row.get("oom"):
                    break
    add_slopes(rows)
    columns = ["mode", "ckpt", "batch", "trainable_m", "peak_gib", "params", "grads", "optim", "acts", "temp"]
    columns += ["gib_per_sample"]
    if device.type == "cuda":
        columns += ["cuda_max_allocated_gib", "cuda_max_reserved_gib"]
    C.print_table(rows, columns)
    C.write_json(
        f"memory_{args.preset}_{device.type}.json",
        {"benchmark": "memory", "preset": args.preset, "env": env, "rows": rows},
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
