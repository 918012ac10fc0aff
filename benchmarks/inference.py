"""Inference latency: the eager model (`XVLA.generate`, the path the parity fixtures check) vs the fast path
(`xvla.model.fast.sampling.FastGenerator`) and the ONNX export run by onnxruntime (`xvla.model.onnx_export` +
`xvla.serve.onnx_runtime`), side by side in one run, random weights and inputs.

    PYTHONPATH=src python benchmarks/inference.py --preset xvla-0.9b --device cuda        # H100: batch 1 and 8
    PYTHONPATH=src python benchmarks/inference.py --preset tiny --device cpu --iters 30   # CPU

Before anything is timed every fast or ONNX variant is checked against eager fp32 on the same inputs and noise
(relative error < 1e-2; a variant that fails is reported and not timed, and the exit status is 1). Then each
variant runs `--warmup` calls (excluded) and `--iters` timed calls, the variants taking turns call by call (CUDA
events on GPU, synchronised timers on CPU); setup (compile, graph capture, ONNX export) is measured on its own. The ONNX
variant runs when onnx, onnxscript and onnxruntime are installed (`pip install 'xvla[onnx]'`), on CPU, or on CUDA
with onnxruntime-gpu's CUDA provider; it gets numpy inputs prepared outside the timed call. Prints a table and writes
benchmarks/results/inference_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

import _common as C
from xvla.model.fast.flops import count_flops, weight_bytes
from xvla.model.fast.sampling import FastGenerator, FastOptions
from xvla.model.xvla import XVLA

TOLERANCE = 1e-2
PEAK_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # HBM bandwidth, TB/s


def onnx_providers(device: torch.device) -> list[str] | None:
    """onnxruntime's execution providers for `device`, None where the ONNX variant cannot run here."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        return None
    import onnxruntime

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None


def onnx_runtime(model: XVLA, providers: list[str], root: Path) -> Any:
    """`model` saved, exported (`export_onnx`) and loaded by the torch-free runtime, one intra-op thread per
    torch thread."""
    from xvla.model.onnx_export import export_onnx
    from xvla.serve.onnx_runtime import OnnxGenerator

    model.save_pretrained(root / "checkpoint")
    export_onnx(root / "checkpoint", root / "onnx")
    return OnnxGenerator(root / "onnx", providers=providers, threads=torch.get_num_threads())


def variants(device: torch.device, compile_: str, onnx: str) -> list[tuple[str, FastOptions | str]]:
    """(name, options); strings name the eager references and the ONNX runtime. The first fast variant is the
    default path."""
    with_compile = compile_ != "off"
    providers = onnx_providers(device) if onnx != "off" else None
    if onnx == "on" and providers is None:
        raise SystemExit(f"--onnx on: needs onnx, onnxscript and onnxruntime (with a provider for {device})")
    with_onnx: list[tuple[str, FastOptions | str]] = [("onnxruntime fp32", "onnx")] if providers else []
    if device.type == "cuda":
        out: list[tuple[str, FastOptions | str]] = [
            ("eager-fp32", "eager"),
            ("eager-bf16", "eager-bf16"),
            ("fast fp16+graph (default)", FastOptions()),
            ("fast-static fp16 (no graph)", FastOptions(cuda_graph=False)),
            ("fast bf16+graph", FastOptions(dtype="bfloat16")),
            ("fast pure-bf16+graph", FastOptions(dtype="bfloat16", fp32_residual=False)),
        ]
        if with_compile:
            out.append(("fast fp16+compile+graph", FastOptions(compile=True)))
        return out + with_onnx
    out = [
        ("eager-fp32", "eager"),
        ("fast-static fp32 (default)", FastOptions()),
        ("fast-static bf16", FastOptions(dtype="bfloat16")),  # fast on CPUs with AMX/AVX512-BF16
    ]
    if with_compile:
        out.append(("fast fp32+compile", FastOptions(compile=True)))
    return out + with_onnx


def profile_top(fn: Any, device: torch.device, rows: int) -> list[dict[str, Any]]:
    """The ops that take the time in one call (torch.profiler, self time)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        C.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=key, row_limit=rows))
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": getattr(e, key) / 1000,
            "self_cpu_ms": e.self_cpu_time_total / 1000,
        }
        for e in top
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="xvla-0.9b")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default=None, help="comma list (default: 1,8 on CUDA, 1 on CPU)")
    p.add_argument("--views", type=int, default=None, help="views per sample (default: config.num_views)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--compile", choices=("auto", "on", "off"), default="auto", help="include the compiled variant"
    )
    p.add_argument(
        "--onnx",
        choices=("auto", "on", "off"),
        default="auto",
        help="include the ONNX export run by onnxruntime (auto: when it is installed)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch (and onnxruntime) CPU threads")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--profile", type=int, default=0, help="print the top N ops of one call per variant")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.pick_device(args.device)
    env = C.environment(device)
    model = C.build_model(args.preset, device).eval()
    cfg = model.config
    views = args.views or cfg.num_views
    sizes = [int(s) for s in (args.batch_sizes or ("1,8" if device.type == "cuda" else "1")).split(",")]
    flops = count_flops(cfg, batch_size=1, views=views)
    wbytes = weight_bytes(cfg)["chunk_bytes"]
    peak = C.peak_tflops(device, args.peak_tflops)
    bw = next((v for k, v in PEAK_TBPS.items() if k in env.get("gpu", "")), None)
    floor_ms = None
    if peak and bw:
        floor_ms = max(flops["chunk"] / (peak * 1e12), wbytes / (bw * 1e12)) * 1000
    floor = f"{floor_ms:.2f} ms" if floor_ms else "n/a (no peak figures for this device)"
    print(
        f"{args.preset} on {env.get('gpu', device)}: {flops['chunk'] / 1e9:.1f} GFLOP and {wbytes / 1e6:.1f} MB "
        f"of 16-bit weights read per chunk at batch 1; floor {floor}"
    )

    bf16_model = None
    onnx_gen: Any = None
    onnx_dir = tempfile.TemporaryDirectory(prefix="xvla_onnx_")
    gens: dict[str, FastGenerator] = {}
    rows: list[dict[str, Any]] = []
    failed = False
    for b in sizes:
        batch = C.random_batch(cfg, b, views, device, seed=b)
        noise = torch.randn(
            b, cfg.num_actions, model.action_space.dim, generator=torch.Generator().manual_seed(1)
        ).to(device)
        ref = model.generate(batch, steps=args.steps, noise=noise)
        calls: list[tuple[Any, dict[str, Any]]] = []
        # 1) build and check every variant (setup = first call: compile, capture), 2) then time them.
        for name, opt in variants(device, args.compile, args.onnx):
            row: dict[str, Any] = {"variant": name, "batch": b, "steps": args.steps, "views": views}
            t0 = time.perf_counter()
            if opt == "eager":
                fn = partial(model.generate, batch, steps=args.steps, noise=noise)
                out, mode = ref, "eager fp32"
            elif opt == "eager-bf16":
                bf16_model = bf16_model or copy.deepcopy(model).to(torch.bfloat16)
                batch16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
                fn = partial(bf16_model.generate, batch16, steps=args.steps, noise=noise.bfloat16())
                out, mode = fn(), "eager bf16 (reference, not checked)"
            elif opt == "onnx":
                providers = onnx_providers(device) or []
                onnx_gen = onnx_gen or onnx_runtime(model, providers, Path(onnx_dir.name))
                inputs = {k: v.cpu().numpy() for k, v in batch.items()}
                fn = partial(onnx_gen.generate, inputs, noise.cpu().numpy(), steps=args.steps)
                out, mode = torch.from_numpy(fn()).to(device), f"onnxruntime {providers[0]}"
            else:
                gen = gens[name] = gens.get(name) or FastGenerator(model, opt)
                fn = partial(gen, batch, steps=args.steps, noise=noise)
                out, mode = fn(), gen.mode
                row.update(gen.stats)
            C.synchronize(device)
            row.update(mode=mode, setup_s=time.perf_counter() - t0, rel_err=C.relative_error(out, ref))
            checked = isinstance(opt, FastOptions) or opt == "onnx"
            row["check"] = "ok" if not checked or row["rel_err"] < TOLERANCE else f"FAILED (> {TOLERANCE})"
            failed |= row["check"] != "ok" and "(default)" in name
            print(
                f"checked {name} batch {b}: rel err {row['rel_err']:.2e} ({mode}, setup {row['setup_s']:.1f} s)"
            )
            calls.append((fn, row))
        timed = [(fn, row) for fn, row in calls if row["check"] == "ok"]
        times = C.time_interleaved(
            {str(i): fn for i, (fn, _) in enumerate(timed)}, device, iters=args.iters, warmup=args.warmup
        )
        for i, (fn, row) in enumerate(timed):
            row.update(C.summary(times[str(i)]))
            row["chunks_per_s"] = b * 1000 / row["p50_ms"]
            row["achieved_tflops"] = flops["chunk"] * b / (row["p50_ms"] / 1000) / 1e12
            if peak and bw:  # the floor of this batch: compute or weight bytes, whichever is larger
                floor_b = max(flops["chunk"] * b / (peak * 1e12), wbytes / (bw * 1e12)) * 1000
                row["x_floor"] = row["p50_ms"] / floor_b
            if args.profile:
                row["profile"] = profile_top(fn, device, args.profile)
        rows.extend(row for _, row in calls)
        eager_p50 = next(r["p50_ms"] for r in rows if r["batch"] == b and r["variant"] == "eager-fp32")
        for r in rows:
            if r["batch"] == b and "p50_ms" in r:
                r["speedup"] = eager_p50 / r["p50_ms"]
        del batch

    onnx_dir.cleanup()
    C.print_table(
        rows,
        [
            "variant",
            "batch",
            "p50_ms",
            "p90_ms",
            "speedup",
            "chunks_per_s",
            "achieved_tflops",
            "x_floor",
            "setup_s",
            "rel_err",
            "check",
        ],
    )
    C.write_json(
        f"inference_{args.preset}_{device.type}.json",
        {
            "benchmark": "inference",
            "preset": args.preset,
            "env": env,
            "flops": flops,
            "chunk_weight_bytes": wbytes,
            "peak_tflops": peak,
            "peak_tbps": bw,
            "floor_ms": floor_ms,
            "tolerance": TOLERANCE,
            "rows": rows,
        },
        args.out,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
