"""Shared pieces of the model benchmarks: environment, random batches, synchronised timers, table, JSON.

Only torch, transformers, numpy and the project's source are needed (a CUDA box without internet must run the
benchmarks unchanged): no tokenizer, random token ids.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
RESULTS = REPO / "benchmarks" / "results"

import torch  # noqa: E402
import transformers  # noqa: E402

from xvla.config import XVLAConfig, get_preset  # noqa: E402
from xvla.model import XVLA  # noqa: E402

# Dense bf16 peak (no sparsity) used for MFU; override with --peak-tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def environment(device: torch.device) -> dict[str, Any]:
    """What a result was measured on."""
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build_model(preset: str, device: torch.device, seed: int = 0) -> XVLA:
    """Random weights (seeded), fp32, on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        return XVLA(get_preset(preset))


def random_batch(
    cfg: XVLAConfig,
    batch_size: int,
    views: int,
    device: torch.device,
    *,
    seed: int = 0,
    actions: bool = False,
) -> dict[str, torch.Tensor]:
    """A model batch of random inputs (all views present, full-length random token ids)."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size
    batch = {
        "pixel_values": torch.randn(b, views, 3, cfg.image_size, cfg.image_size, generator=g),
        "image_mask": torch.ones(b, views, dtype=torch.bool),
        "input_ids": torch.randint(3, cfg.text.vocab_size, (b, cfg.max_text_len), generator=g),
        "attention_mask": torch.ones(b, cfg.max_text_len, dtype=torch.long),
        "domain_id": torch.randint(0, cfg.head.num_domains, (b,), generator=g),
        "proprio": torch.randn(b, cfg.proprio_dim, generator=g),
    }
    if actions:
        act = torch.randn(b, cfg.num_actions, 20, generator=g)
        act[..., [9, 19]] = (act[..., [9, 19]] > 0).float()
        batch["action"] = act
    return {k: v.to(device) for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events around it on GPU, a synchronised perf_counter elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def time_calls(fn: Callable[[], Any], device: torch.device, *, iters: int, warmup: int) -> list[float]:
    """Milliseconds per call over `iters` calls after `warmup` excluded ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return [time_once(fn, device) for _ in range(iters)]


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, *, iters: int, warmup: int
) -> dict[str, list[float]]:
    """Like `time_calls` for several variants, taking turns call by call, so that load from other processes
    (a shared CPU) or clock changes hit every variant alike and their ratio stays meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    return times


def summary(times_ms: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(times_ms, n=10) if len(times_ms) > 1 else [times_ms[0]] * 9
    return {
        "p50_ms": statistics.median(times_ms),
        "p90_ms": q[8],
        "min_ms": min(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "n": len(times_ms),
    }


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """||fast - ref|| / ||ref|| in fp32."""
    return float((fast.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.2f}"
        return "" if v is None else str(v)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")


def write_json(name: str, payload: dict[str, Any], out: str | None) -> Path:
    """Write `payload` to `out`, or to benchmarks/results/`name` (a `.json` file name)."""
    if not name.endswith(".json"):
        raise ValueError(f"write_json: expected a .json file name, got {name!r}")
    path = Path(out) if out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
