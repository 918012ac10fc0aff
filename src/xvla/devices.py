"""Where a job runs: device and torch-thread resolution and a description of the machine, shared by `xvla train`,
`xvla serve` and `xvla demo` so that "auto", thread counts and the recorded machine mean the same everywhere."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def resolve_device(device: str) -> str:
    """ "auto" (cuda when visible, else cpu), "cpu" or "cuda"; a CUDA request without a visible GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return device


def default_threads() -> int:
    """Torch threads for CPU work: every core this process may run on. Judging by the load average at start
    left a core idle whenever the machine had just been busy (e.g. with data generation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_train_processes(batch_size: int, cores: int) -> int:
    """Data-parallel training processes for `cores` CPU cores: one per core, each with an equal share of the
    batch of at least 8 samples (fewer processes where that does not divide). On 2 cores two single-threaded
    processes trained the demo model 1.3x faster than one process with two threads (docs/performance.md)."""
    return max(p for p in range(1, cores + 1) if p == 1 or (batch_size % p == 0 and batch_size // p >= 8))


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the processor has bf16 dot-product instructions (`avx512_bf16` or `amx_bf16` among the Linux
    `cpuinfo` flags), where CPU training under bf16 autocast pays: 1.2-1.3x for the demo model
    (docs/performance.md); without them bf16 is emulated and slower than fp32."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, threads: int, processes: int) -> dict[str, Any]:
    """What a measured run needs recorded beside its numbers to be compared or reproduced."""
    import torch

    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({cpu_model()})",
        # The widest SIMD torch uses here: kernels differ across it, and with them float sums, so a run
        # reproduces on machines of the same CPU kind and thread count, not across kinds.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_has_bf16(),  # precision "auto" trains under bf16 autocast on such a CPU
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        "threads": threads,  # per training process
        "train_processes": processes,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
