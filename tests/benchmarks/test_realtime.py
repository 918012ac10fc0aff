"""benchmarks/realtime.py: latency in ticks, jerk and boundary jumps by hand, the table."""

from __future__ import annotations

import numpy as np

from .scripts import load_script

rt = load_script("realtime")


def test_latency_ticks_round_up() -> None:
    assert [rt.latency_ticks(ms, 10.0) for ms in (0, 100, 300, 101)] == [0, 1, 3, 2]
    assert rt.latency_ticks(300, 40.0) == 12


def test_smoothness_by_hand() -> None:
    # x moves 0, 0, 0, 1 (cm): one third difference of 1 cm; a boundary between ticks 2 and 3 (chunk 0 -> 1)
    # and one between a hold (-1) and chunk 0
    episode = {
        "commanded": [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0.01, 0, 0]],
        "chunk": [-1, 0, 0, 1],
    }
    m = rt.smoothness(episode, hz=10.0)
    np.testing.assert_allclose(m["mean_jerk"], 0.01 * 10.0**3)
    np.testing.assert_allclose(m["max_boundary_jump"], 0.01)


def test_table_lists_every_cell() -> None:
    cell = {
        "name": "rtc",
        "latency_ms": 100.0,
        "latency_ticks": 1,
        "successes": 3,
        "episodes": 4,
        "ci95": [0.3, 0.95],
        "mean_steps": 50.0,
        "mean_jerk": 2.5,
        "boundary_jump_mean_of_max": 0.012,
        "boundary_jump_max": 0.02,
    }
    text = rt.table({"cells": [cell]})
    assert "| rtc | 100 ms (d=1) | 3/4 (30%-95%) | 50.0 | 2.50 | 1.20 / 2.00 |" in text
