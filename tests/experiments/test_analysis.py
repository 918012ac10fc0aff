"""`xvla.experiments.analysis` (rank correlation, proxy points, robot or view) and `summary` (pooling, prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xvla.experiments.analysis import proxy_correlations, proxy_points, rank_correlation, robot_or_view
from xvla.experiments.summary import markdown, pool, seed_interval


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


def test_proxy_correlations_pool_and_split_by_source() -> None:
    # Two sources of different difficulty: within each, lower error comes with LESS success, yet pooled the
    # hard source's high error and low success make the correlation negative: what the split is for.
    def point(source: str, loss: float, success: float) -> dict[str, Any]:
        return {"source": source, "flow_loss": loss, "l1": loss / 10, "success_rate": success}

    points = [point("easy", 0.1 * i, 0.5 + 0.1 * i) for i in range(1, 5)]
    points += [point("hard", 1 + 0.1 * i, 0.05 * i) for i in range(1, 5)]
    result = proxy_correlations(points)
    assert result["flow_loss"]["points"] == 8 and result["flow_loss"]["rho"] < 0
    assert set(result["per_source"]) == {"easy", "hard"}
    for name in ("easy", "hard"):
        assert result["per_source"][name]["flow_loss"]["rho"] == pytest.approx(1.0)
        assert result["per_source"][name]["l1"]["points"] == 4


def test_pool_over_seeds() -> None:
    pooled = pool([{"successes": 3, "episodes": 10}, {"successes": 5, "episodes": 10}])
    assert (pooled["successes"], pooled["episodes"], pooled["success_rate"]) == (8, 20, 0.4)
    assert pooled["ci95"][0] < 0.4 < pooled["ci95"][1]
    assert pooled["seed_mean"] == pytest.approx(0.4)
    assert pooled["seed_ci95"] == [0.0, 1.0]  # two seeds: t(0.975, 1) = 12.7 x sem 0.1, clipped to [0, 1]
    assert seed_interval([0.5]) is None
    low, high = seed_interval([0.2, 0.4, 0.6])  # sd 0.2, t(0.975, 2) = 4.303
    assert low == 0.0 and high == pytest.approx(0.4 + 4.3027 * 0.2 / 3**0.5, abs=1e-3)


def _domain(domain_id: int, robot: str | None, view: str) -> dict[str, Any]:
    return {
        "domain_id": domain_id,
        "robot": robot,
        "cameras": [view, "robot0_eye_in_hand"] if robot else None,
    }


# Prompts as 2-D rows: the Panda's two views 1 apart, the other robots about 10 apart, an untrained domain far off.
PROMPTS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [1.0, 0.0], [100.0, 100.0]])
DOMAINS = {
    "rs_panda": _domain(0, "Panda", "agentview"),
    "rs_ur5e": _domain(1, "UR5e", "frontview"),
    "rs_iiwa": _domain(2, "IIWA", "sideview"),
    "rs_panda_side": _domain(3, "Panda", "sideview"),
    "domain_4": _domain(4, None, ""),  # no suite source: left out
}


def test_robot_or_view_measures_pairs_against_other_robots() -> None:
    grouping = robot_or_view(PROMPTS, DOMAINS)
    # pairs of different robots: 10, 10, 14.14 (UR5e-IIWA), 9 (UR5e-Panda side), 10.05 (IIWA-Panda side)
    assert grouping["median_other_robot"] == pytest.approx(10.0)
    robot, view = grouping["pairs"]
    assert robot == {
        "sources": ["rs_panda", "rs_panda_side"],
        "shares": ["robot"],
        "distance": 1.0,
        "ratio": 0.1,
    }
    assert view["sources"] == ["rs_iiwa", "rs_panda_side"] and view["shares"] == ["view"]
    assert view["ratio"] == pytest.approx(101**0.5 / 10)
    # one shared domain (every source on domain 0) is one prompt: no pairs, no median
    shared = {n: {**d, "domain_id": 0} for n, d in DOMAINS.items() if d["robot"]}
    assert robot_or_view(PROMPTS, shared) == {"median_other_robot": None, "pairs": []}


def test_summary_labels_prompts_by_robot_and_view(tmp_path: Path) -> None:
    points = {n: {**d, "pca": [0.0, 0.0], "tsne": [0.0, 0.0]} for n, d in DOMAINS.items()}
    summary = {
        "experiment": "prompts",
        "description": "d",
        "cells": {"finished": 2, "total": 2},
        "seeds": [0],
        "arms": {},
        "prompts": {
            "prompts/xvla_two_views/seed_0": {"domains": points, "grouping": robot_or_view(PROMPTS, DOMAINS)},
            "pretraining/xvla/seed_0": {"domains": points},  # analysed before `grouping` existed
        },
    }
    text = markdown(summary, [], tmp_path)
    assert "rs_panda_side (Panda, sideview)" in text and "domain_4 (-)" in text
    assert "| prompts/xvla_two_views/seed_0 | rs_panda / rs_panda_side | robot | 1 | 10 | 0.10 |" in text
    assert "| prompts/xvla_two_views/seed_0 | rs_iiwa / rs_panda_side | view | 10.05 | 10 | 1.00 |" in text
    assert "pretraining/xvla/seed_0 |" not in text  # no pairs from the old cell


def test_prompt_projection_labels_and_measures_a_checkpoints_prompts(tmp_path: Path) -> None:
    """A random `tiny` checkpoint with the suite's ids: every point carries its robot and cameras, the unused
    ids none, and the measure is computed on the checkpoint's own prompts."""
    pytest.importorskip("sklearn")
    torch = pytest.importorskip("torch")
    from xvla.config import get_preset
    from xvla.experiments.analysis import prompt_projection
    from xvla.model.xvla import XVLA
    from xvla.sim.suite import SUITE

    torch.manual_seed(0)
    model = XVLA(get_preset("tiny"))
    model.save_pretrained(tmp_path / "ckpt")
    domains = {n: e.domain_id for n, e in SUITE.items() if not e.spec.held_out}  # ids 0-4 and 6
    result = prompt_projection(tmp_path / "ckpt", domains)
    points = result["domains"]
    assert len(points) == model.config.head.num_domains > 7 and points["domain_5"]["robot"] is None
    assert points["rs_panda_side"]["robot"] == "Panda"
    assert points["rs_panda_side"]["cameras"] == ["sideview", "robot0_eye_in_hand"]
    prompts = model.transformer.soft_prompt_hub.weight.detach().double().numpy()
    grouping = result["grouping"]
    assert [(p["sources"], p["shares"]) for p in grouping["pairs"]] == [
        (["rs_panda", "rs_panda_side"], ["robot"]),
        (["rs_iiwa", "rs_panda_side"], ["view"]),
    ]
    assert grouping["pairs"][0]["distance"] == pytest.approx(float(np.linalg.norm(prompts[1] - prompts[6])))
    other = [
        np.linalg.norm(prompts[a] - prompts[b])
        for i, a in enumerate((0, 1, 2, 3, 4, 6))
        for b in (0, 1, 2, 3, 4, 6)[i + 1 :]
        if {a, b} != {1, 6}
    ]
    assert len(other) == 14 and grouping["median_other_robot"] == pytest.approx(float(np.median(other)))
