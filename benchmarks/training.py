"""Training throughput: the eager model (fp32, plain AdamW) vs the fast path (bf16 autocast on CUDA, fused AdamW,
regionally compiled layers, with and without activation checkpointing), side by side in one run.

    PYTHONPATH=src python benchmarks/training.py --preset xvla-0.9b --device cuda     # H100: batch sweep to OOM
    PYTHONPATH=src python benchmarks/training.py --preset demo --device cpu --batch-sizes 4

One timed step = forward (flow loss) + backward + grad clip 1.0 + optimiser step on a fixed random batch (data
loading excluded). Before timing, the fast model's prediction and loss are checked against eager fp32 on the same
batch, t and noise (eval mode, relative error < 1e-2). Per variant the batch sizes are tried in increasing order
until one runs out of memory. MFU counts 3x the forward FLOPs (meta-device count). Prints a table and writes
benchmarks/results/training_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from typing import Any

import torch

import _common as C
from xvla.model import XVLA
from xvla.model.fast.flops import count_flops
from xvla.model.fast.training import fused_adamw, prepare_training

TOLERANCE = 1e-2


def autocast(device: torch.device, mixed: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if mixed else contextlib.nullcontext()


def check(ref: XVLA, fast: XVLA, device: torch.device, mixed: bool, views: int) -> float:
    """Relative error of the fast model's prediction (and loss) against eager fp32, eval mode, same draws."""
    cfg = ref.config
    batch = C.random_batch(cfg, 2, views, device, seed=123, actions=True)
    t = torch.tensor([0.3, 0.8], device=device)
    noise = torch.randn(2, cfg.num_actions, 20, generator=torch.Generator().manual_seed(5)).to(device)
    ref.eval(), fast.eval()
    with torch.no_grad():
        a = ref(batch, t=t, noise=noise)
        with autocast(device, mixed):
            b = fast(batch, t=t, noise=noise)
    ref.train(), fast.train()
    return max(C.relative_error(b.pred, a.pred), C.relative_error(b.loss, a.loss))


def make_step(model: XVLA, device: torch.device, b: int, views: int, *, mixed: bool, fused: bool) -> Any:
    """One optimiser step on a fixed random batch of `b` samples: forward, backward, clip 1.0, AdamW."""
    batch = C.random_batch(model.config, b, views, device, seed=b, actions=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        fused_adamw(params)
        if fused
        else torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    )

    def step() -> None:
        with autocast(device, mixed):
            loss = model(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def first_step(step: Any, device: torch.device) -> float:
    """Seconds of the first step (compiles if on, allocates the optimiser state): reported, never timed."""
    t0 = time.perf_counter()
    step()
    C.synchronize(device)
    return time.perf_counter() - t0


def time_steps(
    model: XVLA, device: torch.device, b: int, views: int, args: argparse.Namespace, **kw: Any
) -> dict[str, Any]:
    """Milliseconds per step at batch `b` and the peak memory, or {"oom": True}."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = make_step(model, device, b, views, **kw)
        first_s = first_step(step, device)
        times = C.time_calls(step, device, iters=args.iters, warmup=args.warmup)
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        model.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"first_step_s": first_s, **C.summary(times)}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="xvla-0.9b")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--batch-sizes", default=None, help="comma list, increasing (default: 8..256 on CUDA, 2 on CPU)"
    )
    p.add_argument("--views", type=int, default=None)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="regional torch.compile")
    p.add_argument("--variants", default="eager,fast,fast+ckpt")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time all variants at the first batch size, taking turns step by step (default: on CPU)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="for MFU (default: known GPUs' dense bf16)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.pick_device(args.device)
    on_cuda = device.type == "cuda"
    if args.interleave is None:
        args.interleave = not on_cuda
    env = C.environment(device)
    ref = C.build_model(args.preset, device).train()
    cfg = ref.config
    views = args.views or cfg.num_views
    default_sizes = "8,16,32,64,128,256" if on_cuda else "2"
    sizes = [int(s) for s in (args.batch_sizes or default_sizes).split(",")]
    flops = count_flops(cfg, batch_size=1, views=views)
    peak = C.peak_tflops(device, args.peak_tflops)
    compile_layers = args.compile != "off"
    print(
        f"{args.preset}: {flops['train_sample'] / 1e9:.1f} GFLOP per training sample (3x forward), peak {peak} TFLOP/s"
    )

    # 1) build and check every variant, 2) then time them.
    built: list[tuple[str, XVLA, bool, bool, str, float]] = []
    failed = False
    for name in args.variants.split(","):
        if name == "eager":
            model, mixed, fused, mode = ref, False, False, "fp32, AdamW (foreach), eager"
        elif name in ("fast", "fast+ckpt"):
            ckpt = name == "fast+ckpt"
            model = prepare_training(
                copy.deepcopy(ref), compile_layers=compile_layers, activation_checkpointing=ckpt
            )
            mixed, fused = on_cuda, on_cuda
            mode = ", ".join(
                ["bf16 autocast" if mixed else "fp32", "fused AdamW" if fused else "AdamW (foreach)"]
                + (["compiled layers"] if compile_layers else [])
                + (["activation checkpointing"] if ckpt else [])
            )
        else:
            raise SystemExit(f"--variants: unknown variant {name!r} (eager, fast, fast+ckpt)")
        t0 = time.perf_counter()
        err = 0.0 if model is ref else check(ref, model, device, mixed, views)
        failed |= err >= TOLERANCE
        print(
            f"checked {name}: rel err {err:.2e} ({mode}; {time.perf_counter() - t0:.1f} s incl. eval compile)"
        )
        built.append((name, model, mixed, fused, mode, err))

    rows: list[dict[str, Any]] = []
    for name, _, _, _, mode, err in built:
        ok = err < TOLERANCE
        rows.append(
            {
                "variant": name,
                "mode": mode,
                "batch": sizes[0],
                "rel_err": err,
                "check": "ok" if ok else f"FAILED (> {TOLERANCE})",
            }
        )
    if args.interleave:  # one batch size, all variants taking turns step by step (shared CPU)
        steps = {}
        for row, (name, model, mixed, fused, _, _) in zip(rows, built, strict=True):
            if row["check"] == "ok":
                steps[name] = make_step(model, device, sizes[0], views, mixed=mixed, fused=fused)
                row["first_step_s"] = first_step(steps[name], device)
        times = C.time_interleaved(steps, device, iters=args.iters, warmup=args.warmup)
        for row in rows:
            if row["variant"] in times:
                row.update(C.summary(times[row["variant"]]))
    else:  # each variant alone, batch sizes in increasing order until one runs out of memory
        first_rows, rows = rows, []
        for row, (name, model, mixed, fused, _, _) in zip(first_rows, built, strict=True):
            for b in sizes if row["check"] == "ok" else sizes[:1]:
                r = {**row, "batch": b}
                if row["check"] == "ok":
                    r.update(time_steps(model, device, b, views, args, mixed=mixed, fused=fused))
                rows.append(r)
                print(f"  {name} batch {b}: {r.get('p50_ms', 'OOM' if r.get('oom') else '-')} ms/step")
                if r.get("oom"):
                    break
    for row in rows:
        if "p50_ms" in row:
            row["samples_per_s"] = row["batch"] * 1000 / row["p50_ms"]
            row["tflops"] = flops["train_sample"] * row["samples_per_s"] / 1e12
            row["mfu"] = row["tflops"] / peak if peak else None
    eager = {r["batch"]: r["samples_per_s"] for r in rows if r["variant"] == "eager" and "p50_ms" in r}
    for row in rows:
        if row["batch"] in eager and "p50_ms" in row:
            row["speedup"] = row["samples_per_s"] / eager[row["batch"]]

    C.print_table(
        rows,
        [
            "variant",
            "batch",
            "p50_ms",
            "speedup",
            "samples_per_s",
            "tflops",
            "mfu",
            "peak_mem_gib",
            "first_step_s",
            "rel_err",
            "check",
        ],
    )
    C.write_json(
        f"training_{args.preset}_{device.type}.json",
        {
            "benchmark": "training",
            "preset": args.preset,
            "env": env,
            "flops": flops,
            "peak_tflops": peak,
            "tolerance": TOLERANCE,
            "rows": rows,
        },
        args.out,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
