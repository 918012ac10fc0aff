"""`xvla.devices`: thread and device resolution shared by train, serve and demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xvla import devices


def test_training_threads_use_every_core_whatever_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # The previous rule subtracted the load average, so a run right after data generation trained on 1 of 2
    # cores, and two machines of one kind could pick different thread counts (and so different float sums).
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    assert devices.default_threads() == len(os.sched_getaffinity(0))


def test_cpu_training_takes_one_process_per_core_with_an_equal_batch_share() -> None:
    assert devices.cpu_train_processes(32, 2) == 2
    assert devices.cpu_train_processes(32, 3) == 2  # 32 does not split in 3
    assert devices.cpu_train_processes(32, 16) == 4  # at least 8 samples each
    assert devices.cpu_train_processes(4, 2) == 1  # the smoke scale's batch stays in one process
    assert devices.cpu_train_processes(32, 1) == 1


def test_device_names_are_checked() -> None:
    assert devices.resolve_device("cpu") == "cpu"
    assert devices.resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device: expected auto, cpu or cuda, got 'tpu'"):
        devices.resolve_device("tpu")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx512f amx_bf16 amx_tile", True),
        ("fpu avx2 avx512f", False),
    ],
)
def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert devices.cpu_has_bf16(cpuinfo) is expected
    assert devices.cpu_has_bf16(tmp_path / "missing") is False  # not Linux: fp32
