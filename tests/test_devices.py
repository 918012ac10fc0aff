"""`xvla.devices`: thread and device resolution shared by train, serve and demo."""

from __future__ import annotations

import os

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
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # AMD EPYC (Zen 4)
        ("fpu avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
        ("fpu avx2 avx512f avx512_vnni", False),  # AVX-512 without bf16 dot products
        (None, False),  # no /proc/cpuinfo (macOS, Windows)
    ],
)
def test_bf16_instructions_are_read_from_the_cpu_flags(
    monkeypatch: pytest.MonkeyPatch, flags: str | None, expected: bool
) -> None:
    monkeypatch.setattr(devices, "_cpuinfo", lambda field: flags if field == "flags" else None)
    assert devices.cpu_has_bf16() is expected
