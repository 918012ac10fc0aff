"""The analyses beyond success rates: 2-D projections of learned soft prompts (`prompts`) and the validation
error as a proxy for closed-loop success (`proxy`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xvla.demo import stages

BOOTSTRAP_RESAMPLES = 2000


def prompt_projection(checkpoint: Path, domains: Mapping[str, int]) -> dict[str, Any]:
    """PCA (`xvla.demo.stages.soft_prompt_projection`) and t-SNE of a checkpoint's soft prompts, one point per
    domain, with each suite source's robot and cameras, and `grouping` (`robot_or_view`: do prompts group by
    robot or by view?); empty for a model without prompts."""
    from sklearn.manifold import TSNE

    from xvla.sim.suite import SUITE

    prompts = stages.soft_prompts(checkpoint)  # [num_domains, len_soft_prompts * hidden]
    if prompts is None:
        return {}
    pca = stages.soft_prompt_projection(checkpoint, domains)
    n = len(prompts)
    # Exact t-SNE: a handful of points (Barnes-Hut's OpenMP threads stalled on a busy 2-core machine).
    tsne = TSNE(2, perplexity=max(1.0, min(30.0, (n - 1) / 3)), init="pca", random_state=0, method="exact")
    points = tsne.fit_transform(prompts) if n > 1 else np.zeros((n, 2))
    out = {}
    for name, entry in pca["domains"].items():
        d = entry["domain_id"]
        spec = SUITE[name].spec if name in SUITE else None
        out[name] = {
            **{k: v for k, v in entry.items() if k != "point"},
            "pca": entry["point"],
            "tsne": [round(float(x), 5) for x in points[d]],
            "robot": spec.robot if spec else None,
            "cameras": list(spec.cameras) if spec else None,
        }
    return {
        "explained_variance": pca["explained_variance"],
        "domains": out,
        "grouping": robot_or_view(prompts, out),
    }


def robot_or_view(prompts: np.ndarray, domains: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Whether prompts group by robot or by camera view, in the full prompt space.

    prompts: [num_domains, len_soft_prompts * hidden]; domains: name -> {"domain_id", "robot", "cameras"} (robot
    None for a domain that is no suite source: left out). A source's view is its first (fixed) camera; a camera
    name is one viewpoint across the suite (robosuite_env.SETUPS). Returns `median_other_robot`, the median
    Euclidean distance over pairs of prompts of different robots, and `pairs`: each pair that shares the robot
    (one robot, two views) or the view (two robots, one view), its distance and `ratio` to that median. A
    robot's two prompts at a ratio well below 1 while same-view pairs stay near 1: prompts group by robot.
    """
    named = [(n, d) for n, d in domains.items() if d.get("robot") is not None]
    other: list[float] = []
    pairs: list[dict[str, Any]] = []
    for i, (a, da) in enumerate(named):
        for b, db in named[i + 1 :]:
            if da["domain_id"] == db["domain_id"]:
                continue  # one shared domain (pretrain_domains=shared): one prompt
            distance = float(np.linalg.norm(prompts[da["domain_id"]] - prompts[db["domain_id"]]))
            if da["robot"] != db["robot"]:
                other.append(distance)
            shared = [
                key
                for key, same in (
                    ("robot", da["robot"] == db["robot"]),
                    ("view", da["cameras"][0] == db["cameras"][0]),
                )
                if same
            ]
            if shared:
                pairs.append({"sources": [a, b], "shares": shared, "distance": distance})
    median = float(np.median(other)) if other else None
    for pair in pairs:
        pair["ratio"] = pair["distance"] / median if median else None
    return {"median_other_robot": median, "pairs": pairs}


def proxy_points(cells: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """(validation error, closed-loop success) of every evaluated and validated checkpoint x source of the cells'
    results (`results.json`): one point each."""
    points = []
    for results in cells:
        for point in results["curve"]:
            for source, val in (point["validation"] or {}).items():
                success = point["success"].get(source)
                if success is None:
                    continue
                points.append(
                    {
                        "cell": f"{results['cell']['experiment']}/{results['cell']['arm']}/seed_{results['cell']['seed']}",
                        "step": point["step"],
                        "source": source,
                        "flow_loss": val["flow_loss"],
                        "l1": val["l1"],
                        "success_rate": success["success_rate"],
                        "episodes": success["episodes"],
                    }
                )
    return points


def proxy_correlations(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Spearman's rho of validation flow loss and L1 against success: pooled over every point, and within each
    source (pooling mixes sources of different difficulty, which by itself correlates error with failure)."""

    def both(subset: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        success = [p["success_rate"] for p in subset]
        return {m: rank_correlation([p[m] for p in subset], success) for m in ("flow_loss", "l1")}

    sources = sorted({p["source"] for p in points})
    return {
        **both(points),
        "per_source": {name: both([p for p in points if p["source"] == name]) for name in sources},
    }


def rank_correlation(x: Sequence[float], y: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Spearman's rho of x and y with a 95% percentile bootstrap interval over the points (resampled with
    replacement); rho is None with fewer than 3 points or when either side is constant."""
    from scipy.stats import spearmanr

    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(xs)

    def rho(idx: np.ndarray) -> float:
        a, b = xs[idx], ys[idx]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return float("nan")
        return float(spearmanr(a, b).statistic)

    if n < 3 or np.isnan(estimate := rho(np.arange(n))):
        return {"rho": None, "ci95": None, "points": n}
    rng = np.random.default_rng(seed)
    draws = np.array([rho(rng.integers(0, n, n)) for _ in range(BOOTSTRAP_RESAMPLES)])
    draws = draws[~np.isnan(draws)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"rho": estimate, "ci95": [float(low), float(high)], "points": n}
