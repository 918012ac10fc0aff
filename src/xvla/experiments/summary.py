"""The summary of an experiment from whatever cells have finished: `summary.json`, `summary.md` and plots.

Success is pooled over seeds and episodes (k/n with a 95% Wilson interval) and, with two seeds or more, also
given as the mean of the per-seed rates with a 95% t interval over seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xvla.demo.report import write_json
from xvla.experiments.analysis import proxy_correlations, proxy_points
from xvla.experiments.specs import ExperimentSpec
from xvla.sim.evaluate import wilson_interval

if TYPE_CHECKING:
    from xvla.experiments.runner import Cell

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def seed_interval(rates: Sequence[float]) -> list[float] | None:
    """95% t interval of the mean of per-seed rates (None below two seeds)."""
    from scipy.stats import t

    if len(rates) < 2:
        return None
    mean, sem = float(np.mean(rates)), float(np.std(rates, ddof=1)) / math.sqrt(len(rates))
    half = float(t.ppf(0.975, len(rates) - 1)) * sem
    return [max(0.0, mean - half), min(1.0, mean + half)]


def pool(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Evaluation summaries (`merge_evaluations`) of one arm x source, one per seed -> pooled success."""
    k = sum(int(e["successes"]) for e in per_seed)
    n = sum(int(e["episodes"]) for e in per_seed)
    rates = [e["successes"] / e["episodes"] for e in per_seed if e["episodes"]]
    return {
        "successes": k,
        "episodes": n,
        "success_rate": k / n if n else None,
        "ci95": list(wilson_interval(k, n)),
        "seeds": len(per_seed),
        "seed_rates": rates,
        "seed_mean": float(np.mean(rates)) if rates else None,
        "seed_ci95": seed_interval(rates),
    }


def arm_summary(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One arm's finished cells (their results.json) -> per source: success at every evaluated step pooled over
    seeds, final validation (mean over seeds); `final` is the last step's."""
    by_step: dict[int, dict[str, list[dict[str, Any]]]] = {}
    validation: dict[str, list[dict[str, float]]] = {}
    for results in cells:
        for point in results["curve"]:
            for source, ev in point["success"].items():
                by_step.setdefault(point["step"], {}).setdefault(source, []).append(ev)
        last = results["curve"][-1]
        for source, val in (last["validation"] or {}).items():
            validation.setdefault(source, []).append(val)
    curve = {
        step: {source: pool(evs) for source, evs in sources.items()}
        for step, sources in sorted(by_step.items())
    }
    final = curve[max(curve)] if curve else {}
    # every source together, summed within each cell (seed) first
    per_cell = [
        {k: sum(e[k] for e in r["curve"][-1]["success"].values()) for k in ("successes", "episodes")}
        for r in cells
    ]
    return {
        "cells": len(cells),
        "kind": cells[0]["cell"]["kind"],
        "description": cells[0]["cell"]["description"],
        "final": final,
        "final_all_sources": pool(per_cell),
        "curve": {str(step): value for step, value in curve.items()},
        "validation": {
            s: {m: float(np.mean([v[m] for v in vals])) for m in ("flow_loss", "l1")}
            for s, vals in validation.items()
        },
        "seconds": float(np.mean([r["seconds"] for r in cells])),
    }


def write_summary(
    spec: ExperimentSpec, cells: Sequence[Cell], out: Path, seeds: Sequence[int] | None
) -> Path:
    """Summarise the finished cells among `cells` into OUT/<experiment>/; returns summary.md's path."""
    from xvla.experiments.runner import DONE_FILE, RESULTS_FILE

    folder = out / spec.name
    done = [c for c in cells if (c.folder(out) / DONE_FILE).is_file()]
    loaded = {c.key: json.loads((c.folder(out) / RESULTS_FILE).read_text()) for c in done}
    arms: dict[str, dict[str, Any]] = {}
    for c in done:
        arms.setdefault(f"{c.experiment.name}/{c.arm.name}", {}).setdefault("cells", []).append(loaded[c.key])
    summary: dict[str, Any] = {
        "experiment": spec.name,
        "description": spec.description,
        "cells": {"finished": len(done), "total": len(cells)},
        "seeds": list(seeds if seeds is not None else spec.seeds),
        "arms": {name: arm_summary(value["cells"]) for name, value in arms.items()},
    }
    if "proxy" in spec.analyses:
        points = proxy_points(loaded.values())
        summary["proxy"] = {"points": points, **proxy_correlations(points)}
    if "prompts" in spec.analyses:
        summary["prompts"] = {key: r["prompts"] for key, r in loaded.items() if r["prompts"].get("domains")}
    write_json(folder / SUMMARY_JSON, summary)
    plots = write_plots(summary, folder / "plots")
    path = folder / SUMMARY_MD
    path.write_text(markdown(summary, plots, folder))
    return path


# ----------------------------------------------------------------------------------------------------- text
def _rate(p: Mapping[str, Any] | None) -> str:
    if not p or p["success_rate"] is None:
        return "-"
    text = f"{p['successes']}/{p['episodes']} ({100 * p['success_rate']:.0f}%, {100 * p['ci95'][0]:.0f}-{100 * p['ci95'][1]:.0f})"
    if p["seed_ci95"] is not None:
        text += f"; seeds {100 * p['seed_mean']:.0f}% ({100 * p['seed_ci95'][0]:.0f}-{100 * p['seed_ci95'][1]:.0f})"
    return text


def _label(domain: Mapping[str, Any]) -> str:
    """A prompt point's robot and view (its source's first camera); "-" for a domain that is no suite source."""
    if domain["robot"] is None:
        return "-"
    return f"{domain['robot']}, {domain['cameras'][0]}"


def markdown(summary: Mapping[str, Any], plots: Sequence[Path], folder: Path) -> str:
    lines = [
        f"# Experiment `{summary['experiment']}`",
        "",
        summary["description"],
        "",
        f"Finished cells: {summary['cells']['finished']} of {summary['cells']['total']} (seeds "
        f"{', '.join(map(str, summary['seeds']))}). Success: pooled k/n over seeds and episodes (95% Wilson), "
        "then the mean of per-seed rates (95% t interval over seeds, from two seeds).",
        "",
        "| arm | kind | cells | source | final success | val flow loss | val L1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in summary["arms"].items():
        for source, pooled in arm["final"].items():
            val = arm["validation"].get(source)
            lines.append(
                f"| {name} | {arm['kind']} | {arm['cells']} | {source} | {_rate(pooled)} | "
                f"{val['flow_loss']:.4g} | {val['l1']:.4g} |"
                if val
                else f"| {name} | {arm['kind']} | {arm['cells']} | {source} | {_rate(pooled)} | - | - |"
            )
        if len(arm["final"]) > 1:
            lines.append(f"| {name} | | | **all** | {_rate(arm['final_all_sources'])} | | |")
    curves = {n: a for n, a in summary["arms"].items() if len(a["curve"]) > 1}
    if curves:
        lines += ["", "## Success vs training steps (pooled over seeds; all sources)", ""]
        for name, arm in curves.items():
            points = []
            for step, sources in arm["curve"].items():
                k = sum(p["successes"] for p in sources.values())
                n = sum(p["episodes"] for p in sources.values())
                points.append(f"{step}: {k}/{n}")
            lines.append(f"- {name}: " + ", ".join(points))
    if "proxy" in summary:
        lines += ["", "## Validation error as a proxy for success", ""]
        for metric in ("flow_loss", "l1"):
            r = summary["proxy"][metric]
            lines.append(
                f"- validation {metric} vs success over {r['points']} checkpoint x source points: {_rho(r)}"
            )
        lines += ["", "Within each source (the pooled points mix sources of different difficulty):", ""]
        lines += ["| source | points | flow loss vs success | L1 vs success |", "|---|---|---|---|"]
        for name, r in summary["proxy"]["per_source"].items():
            lines.append(
                f"| {name} | {r['flow_loss']['points']} | {_rho(r['flow_loss'])} | {_rho(r['l1'])} |"
            )
    if "prompts" in summary:
        lines += ["", "## Soft prompts", "", "Each domain: source (robot, view: its first camera)."]
        pairs = []
        for key, value in summary["prompts"].items():
            names = ", ".join(f"{n} ({_label(d)})" for n, d in value["domains"].items())
            lines.append(f"- {key}: {names}")
            grouping = value.get("grouping") or {}  # absent in cells analysed before it existed
            pairs += [(key, grouping["median_other_robot"], p) for p in grouping.get("pairs", [])]
        if pairs:
            lines += [
                "",
                "Robot or view? Euclidean distance between two full prompts that share the robot or the view, "
                "and its ratio to the median distance between prompts of different robots (below 1: closer "
                "than a typical pair of robots).",
                "",
                "| cell | sources | share | distance | median other-robot | ratio |",
                "|---|---|---|---|---|---|",
            ]
            for key, median, p in pairs:
                ratio = "-" if p["ratio"] is None else f"{p['ratio']:.2f}"
                lines.append(
                    f"| {key} | {' / '.join(p['sources'])} | {', '.join(p['shares'])} | {p['distance']:.4g} | "
                    f"{'-' if median is None else f'{median:.4g}'} | {ratio} |"
                )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(folder)})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- plots
def write_plots(summary: Mapping[str, Any], folder: Path) -> list[Path]:
    """Final success per arm, learning curves, prompt projections and the proxy scatter (what exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    arms = summary["arms"]
    if arms:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(arms) + 2), 4))
        names = list(arms)
        rates = [a["final_all_sources"]["success_rate"] or 0.0 for a in arms.values()]
        lows = [r - a["final_all_sources"]["ci95"][0] for r, a in zip(rates, arms.values(), strict=True)]
        highs = [a["final_all_sources"]["ci95"][1] - r for r, a in zip(rates, arms.values(), strict=True)]
        ax.bar(range(len(names)), rates, yerr=[lows, highs], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("final success (pooled, 95% Wilson)")
        written.append(_save(fig, folder / "final_success.png"))
    curves = {n: a for n, a in arms.items() if len(a["curve"]) > 1}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, arm in curves.items():
            steps = [int(s) for s in arm["curve"]]
            rates = []
            for sources in arm["curve"].values():
                k = sum(p["successes"] for p in sources.values())
                n = sum(p["episodes"] for p in sources.values())
                rates.append(k / n if n else 0.0)
            ax.plot(steps, rates, marker="o", label=name)
        ax.set_xlabel("training steps")
        ax.set_ylabel("success (pooled)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        written.append(_save(fig, folder / "learning_curves.png"))
    for key, value in summary.get("prompts", {}).items():
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        robots = list(dict.fromkeys(d["robot"] for d in value["domains"].values()))  # one colour each
        for ax, method in zip(axes, ("pca", "tsne"), strict=True):
            for name, d in value["domains"].items():
                ax.scatter(*d[method], s=60, color=f"C{robots.index(d['robot']) % 10}")
                ax.annotate(
                    f"{name}\n{_label(d)}", d[method], fontsize=7, xytext=(4, 4), textcoords="offset points"
                )
            ax.set_title({"pca": "PCA", "tsne": "t-SNE"}[method])
        written.append(_save(fig, folder / f"prompts_{key.replace('/', '_')}.png"))
    if summary.get("proxy", {}).get("points"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        points = summary["proxy"]["points"]
        for ax, metric in zip(axes, ("flow_loss", "l1"), strict=True):
            ax.scatter([p[metric] for p in points], [p["success_rate"] for p in points], s=15)
            ax.set_xlabel(f"validation {metric}")
            ax.set_ylabel("success")
        written.append(_save(fig, folder / "proxy.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _rho(r: Mapping[str, Any]) -> str:
    """A `rank_correlation` result as text."""
    if r["rho"] is None:
        return "not defined (fewer than 3 points, or a constant side)"
    return f"Spearman rho {r['rho']:.2f} (95% bootstrap {r['ci95'][0]:.2f} to {r['ci95'][1]:.2f})"
