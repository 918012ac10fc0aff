"""`xvla.experiments.analysis` (rank correlation, proxy points) and the pooling of `summary`."""

from __future__ import annotations

from typing import Any

import pytest

from xvla.experiments.analysis import proxy_points, rank_correlation
from xvla.experiments.summary import pool, seed_interval


def test_rank_correlation_signs_and_interval() -> None:
    up = rank_correlation([1, 2, 3, 4, 5], [0.1, 0.2, 0.25, 0.5, 0.9])
    assert up["rho"] == pytest.approx(1.0) and up["points"] == 5
    assert up["ci95"][1] == pytest.approx(1.0) and up["ci95"][0] <= 1.0
    down = rank_correlation([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 1, 2])
    assert down["rho"] == pytest.approx(-0.9428571) and down["ci95"][0] < down["rho"] < down["ci95"][1] + 1e-9
    noisy = rank_correlation(list(range(20)), [(7 * i) % 11 for i in range(20)])
    assert noisy["ci95"][0] < noisy["rho"] < noisy["ci95"][1]  # a real interval around a weak correlation
    assert rank_correlation([1, 2], [1, 2])["rho"] is None  # too few points
    assert rank_correlation([1, 2, 3], [0.5, 0.5, 0.5])["rho"] is None  # constant success: undefined


def _results(curve: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cell": {"experiment": "e", "arm": "a", "seed": 0}, "curve": curve}


def test_proxy_points_pair_validation_with_success_per_source() -> None:
    success = {"successes": 1, "episodes": 4, "success_rate": 0.25}
    curve = [
        {"step": 0, "success": {"s": success}, "validation": None},  # not validated: no point
        {
            "step": 2,
            "success": {"s": success},
            "validation": {"s": {"flow_loss": 3.0, "l1": 0.5}, "t": {"flow_loss": 1.0, "l1": 0.1}},
        },
    ]
    (point,) = proxy_points([_results(curve)])  # "t" has no success: no point
    assert point == {
        "cell": "e/a/seed_0",
        "step": 2,
        "source": "s",
        "flow_loss": 3.0,
        "l1": 0.5,
        "success_rate": 0.25,
        "episodes": 4,
    }


def test_pool_over_seeds() -> None:
    pooled = pool([{"successes": 3, "episodes": 10}, {"successes": 5, "episodes": 10}])
    assert (pooled["successes"], pooled["episodes"], pooled["success_rate"]) == (8, 20, 0.4)
    assert pooled["ci95"][0] < 0.4 < pooled["ci95"][1]
    assert pooled["seed_mean"] == pytest.approx(0.4)
    assert pooled["seed_ci95"] == [0.0, 1.0]  # two seeds: t(0.975, 1) = 12.7 x sem 0.1, clipped to [0, 1]
    assert seed_interval([0.5]) is None
    low, high = seed_interval([0.2, 0.4, 0.6])  # sd 0.2, t(0.975, 2) = 4.303
    assert low == 0.0 and high == pytest.approx(0.4 + 4.3027 * 0.2 / 3**0.5, abs=1e-3)
