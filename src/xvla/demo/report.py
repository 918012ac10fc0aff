"""The demo's report: `report.md`, the plots and the closing summary table, all drawn from `results.json`, so
`write_report(results, out)` can redraw a finished run."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xvla.demo.config import STAGES


def _rate(summary: Mapping[str, Any] | None) -> str:
    if not summary or not summary.get("episodes"):
        return "n/a"
    low, high = summary["ci95"]
    return (
        f"{100 * summary['success_rate']:.0f}% ({summary['successes']}/{summary['episodes']}; "
        f"95% CI {100 * low:.0f}-{100 * high:.0f}%)"
    )


def _milestones(summary: Mapping[str, Any] | None) -> str:
    """Episodes that reached each sub-goal, e.g. 'reach 18, grasp 12 of 20' (where failures stop)."""
    if not summary or not summary.get("milestones"):
        return ""
    reached = ", ".join(f"{name} {count}" for name, count in summary["milestones"].items())
    return f"{reached} of {summary['episodes']}"


CONDITION_TEXT = {
    "untrained": "untrained (random weights, same architecture)",
    "pre_adaptation": "pre-trained, not adapted (the prompt and heads adaptation starts from)",
    "adapted": "pre-trained + adapted (two-stage recipe)",
    "scratch": "trained on the held-out data only (no pre-training, same steps)",
}


def write_report(results: Mapping[str, Any], out: Path) -> Path:
    """`results.json`, `plots/*.png` and `report.md` from a results dict (as `run_demo` builds it)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    plots = make_plots(results, out / "plots")
    cfg = results["config"]
    held = cfg["heldout_source"].partition(":")[0]
    timing, budget = results["timing_s"], results["budget_s"]
    machine = results["machine"]
    lines = [
        "# X-VLA demo report",
        "",
        f"Scale `{cfg['scale']}`, seed {cfg['seed']}, on {machine['device']} ({machine['cpu_count']} CPU cores, "
        f"{machine.get('cpu_capability', 'unknown')} kernels, "
        f"load average {machine['load_average']:.1f} at start, {machine['threads']} training thread(s), "
        f"{machine['workers']} simulator worker(s)); total wall time **{duration(timing.get('total'))}**. "
        f"Every number below is in `results.json`.",
        "",
        "## What ran",
        "",
        "| stage | wall time | budget |",
        "|---|---|---|",
        *[f"| {s} | {duration(timing.get(s))} | {duration(budget.get(s))} |" for s in STAGES if s in timing],
        f"| **total** | **{duration(timing.get('total'))}** | {duration(sum(budget.values()))} |",
        "",
        *target_line(cfg.get("target_s"), timing.get("total")),
        "## Data (scripted experts)",
        "",
        "| source | role | robot | domain | tasks | episodes (val) | frames | rate | expert success | oracle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in results["data"].items():
        lines.append(
            f"| {name} | {d['role']} | {d['robot']} | {d['domain_id']} | {', '.join(d['tasks'])} | "
            f"{d['episodes']} ({d['val_episodes']}) | {d['frames']} | {d['fps']:g} Hz | "
            f"{100 * d['expert_success_rate']:.0f}% of {d['expert_attempts']} | "
            f"{_rate(results['oracle'].get(name))} |"
        )
    lines += [
        "",
        "*Expert success*: share of scripted-expert attempts that solved the task during generation (only "
        "successes are kept). *Oracle*: recorded episodes replayed from their initial state, with each "
        "query answered by the episode's own 30 training anchors sent through the serving post-processing: "
        "what a perfect model could reach through this action path.",
        "",
        "## Pre-training",
        "",
        f"{results['pretrain']['parameters'] / 1e6:.2f}M parameters, {results['pretrain']['steps']} steps of "
        f"batch {cfg['batch_size']} ({_fmt(results['pretrain']['samples_per_s'])} samples/s), one soft prompt "
        f"per source. Final training loss {_fmt(results['pretrain']['final_loss'])}.",
        "",
        f"![training loss per source]({plots['loss'].relative_to(out)})",
        "",
        "Validation on held-out episodes of each source (never trained on):",
        "",
        "| source | flow loss | L1 of sampled chunks | samples |",
        "|---|---|---|---|",
    ]
    for name, v in results["pretrain"]["validation"]["per_source"].items():
        lines.append(f"| {name} | {_fmt(v['flow_loss'])} | {_fmt(v['l1'])} | {v['samples']} |")
    overall = results["pretrain"]["validation"]["overall"]
    lines += [
        f"| **all** | {_fmt(overall['flow_loss'])} | {_fmt(overall['l1'])} | {overall['samples']} |",
        "",
        "*Flow loss*: the training objective (500 x MSE of xyz + 10 x MSE of rot6d + BCE of the gripper) at a "
        "random noise level. *L1*: mean absolute error between a sampled 30-anchor chunk and the expert's "
        "anchors, in canonical units (metres for xyz, unitless for rot6d and the gripper in [0, 1]).",
        "",
    ]
    adapt = results["adapt"]
    init = {
        "retrieval": f"from `{adapt['init_from']}` (retrieval: the existing domain with the lowest flow loss on "
        "the new data)",
        "scratch": "at random (init `scratch`)",
    }.get(cfg["adapt_init"], f"from `{adapt['init_from']}` (chosen by name)")
    lines += [
        f"## Adaptation to the held-out robot ({held})",
        "",
        f"A new domain (id {adapt['domain_id']}) initialised {init}; "
        f"stage 1: {adapt['prompt_steps']} steps training only its soft prompt and action heads; stage 2: "
        f"{adapt['steps'] - adapt['prompt_steps']} steps in mode `{adapt['mode']}`. Validation on "
        f"{results['data'][held]['val_episodes']} held-out episodes: flow loss "
        f"{_fmt(adapt['validation']['overall']['flow_loss'])}, L1 {_fmt(adapt['validation']['overall']['l1'])}.",
        "",
    ]
    if adapt["retrieval"]:
        lines += [
            "Zero-shot fit of each pre-trained domain to the new robot's data (flow loss, lower is better):",
            "",
            "| domain | flow loss |",
            "|---|---|",
            *[f"| {r['name']} | {_fmt(r['loss'])} |" for r in adapt["retrieval"]],
            "",
        ]
    if "scratch" in results:
        sv = results["scratch"]["validation"]["overall"]
        lines += [
            f"Without pre-training (same data and steps): validation flow loss {_fmt(sv['flow_loss'])}, "
            f"L1 {_fmt(sv['l1'])}.",
            "",
        ]
    lines += [
        "## Closed-loop success",
        "",
        f"Evaluation seeds differ from the generation seeds; the policy is queried through the serving `Policy` "
        f"and executes {cfg['replan_s']} s of each chunk before replanning; {cfg['sample_steps']} denoising "
        "steps per query. Success rates with 95% Wilson intervals.",
        "",
        f"| policy on {held} | success | sub-goals reached |",
        "|---|---|---|",
        *[
            f"| {CONDITION_TEXT.get(k, k)} | {_rate(v)} | {_milestones(v)} |"
            for k, v in results["heldout_eval"].items()
        ],
        f"| oracle (recorded anchors, no model) | {_rate(results['oracle'].get(held))} | |",
        "",
    ]
    if results["pretrain_eval"]:
        lines += [
            "| pre-trained policy on its own sources | success | sub-goals reached |",
            "|---|---|---|",
            *[f"| {k} | {_rate(v)} | {_milestones(v)} |" for k, v in results["pretrain_eval"].items()],
            "",
        ]
    lines += [f"![success rates]({plots['success'].relative_to(out)})", ""]
    if "learning_curve" in plots:
        curves = results["learning_curve"]
        steps = [p["step"] for p in max(curves.values(), key=len)]
        lines += [
            "### Learning curves",
            "",
            "Closed-loop success of the pre-trained model along training, on the same evaluation seeds at every "
            f"checkpoint ({cfg['curve_episodes']} episodes per task at intermediate checkpoints, "
            f"{cfg['pretrain_eval_episodes']} at the last):",
            "",
            "| source | " + " | ".join(f"step {s}" for s in steps) + " |",
            "|---|" + "---|" * len(steps),
            *[
                f"| {name} | " + " | ".join(f"{p['successes']}/{p['episodes']}" for p in points) + " |"
                for name, points in curves.items()
            ],
            "",
            f"![learning curves]({plots['learning_curve'].relative_to(out)})",
            "",
        ]
    videos = sorted((out / "videos").rglob("*.mp4")) if (out / "videos").is_dir() else []
    if videos:
        lines += [
            "Videos of the adapted policy: " + ", ".join(f"[{v.name}]({v.relative_to(out)})" for v in videos),
            "",
        ]
    if "soft_prompts" in plots:
        sp = results["soft_prompts"]
        cos = {n: d["cosine_to_heldout"] for n, d in sp["domains"].items() if n != held}
        closest = max(cos, key=lambda n: cos[n]) if cos else None
        lines += [
            "## Learned soft prompts",
            "",
            f"PCA of the flattened soft prompt of every domain (PC1 {100 * sp['explained_variance'][0]:.0f}%, "
            f"PC2 {100 * sp['explained_variance'][1]:.0f}% of the variance); the arrow runs from the domain the "
            f"held-out robot's prompt was initialised from to where adaptation took it. "
            + (
                f"The held-out robot's prompt is closest (cosine) to `{closest}` ({cos[closest]:.2f})."
                if closest
                else ""
            ),
            "",
            f"![soft prompts]({plots['soft_prompts'].relative_to(out)})",
            "",
        ]
    lines += [
        "## How to read this",
        "",
        "- This is a tiny model trained for minutes on a few dozen demonstrations per robot: the point is the "
        "mechanics (one model, several embodiments, per-domain prompts, adaptation to a new robot), not the "
        "success rates of the paper. Compare conditions on the same seeds, and mind the intervals: with 20 "
        "episodes a 95% interval is 30-40 points wide.",
        "- `untrained` is the floor, `oracle` the ceiling of this action path; `pre_adaptation` is exactly the "
        "adapted model at step 0, so the gap to `adapted` is what the two adaptation stages bought.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def make_plots(results: Mapping[str, Any], folder: Path) -> dict[str, Path]:
    """Loss per source, success rates with intervals, soft-prompt PCA (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    held = results["config"]["heldout_source"].partition(":")[0]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "pretrain", "pre-training"), (axes[1], "adapt", f"adaptation ({held})")):
        history = results[key]["history"]
        for name, values in history["per_source"].items():
            pts = [(s, v) for s, v in zip(history["step"], values, strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name, lw=1.2)
        if key == "adapt" and results["adapt"]["prompt_steps"]:
            ax.axvline(results["adapt"]["prompt_steps"], color="grey", ls="--", lw=1)
            ax.text(results["adapt"]["prompt_steps"], ax.get_ylim()[1], " stage 2", va="top", fontsize=8)
        ax.set(title=title, xlabel="step", ylabel="training loss (flow)", yscale="log")
        ax.legend(fontsize=7)
    paths["loss"] = _save(fig, folder / "loss_per_source.png")

    bars = [(CONDITION_TEXT.get(k, k).split(" (")[0], v) for k, v in results["heldout_eval"].items()]
    if held in results["oracle"]:
        bars.append(("oracle", results["oracle"][held]))
    pre = list(results["pretrain_eval"].items())
    fig, axes = plt.subplots(
        1, 2 if pre else 1, figsize=(11 if pre else 6, 4), constrained_layout=True, squeeze=False
    )
    for ax, items, title in (
        (axes[0][0], bars, f"held-out robot: {held}"),
        *(((axes[0][1], pre, "pre-trained model on its sources"),) if pre else ()),
    ):
        labels = [k for k, _ in items]
        rates = np.array([v["success_rate"] for _, v in items]) * 100
        low = np.array([v["ci95"][0] for _, v in items]) * 100
        high = np.array([v["ci95"][1] for _, v in items]) * 100
        x = np.arange(len(items))
        ax.bar(x, rates, color="tab:blue", alpha=0.8)
        yerr = np.clip([rates - low, high - rates], 0, None)
        ax.errorbar(x, rates, yerr=yerr, fmt="none", ecolor="black", capsize=4)
        for i, (_, v) in enumerate(items):
            ax.text(i, 2, f"{v['successes']}/{v['episodes']}", ha="center", fontsize=8, color="white")
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set(ylim=(0, 100), ylabel="success (%) with 95% CI", title=title)
    paths["success"] = _save(fig, folder / "success_rates.png")

    curves = {k: v for k, v in (results.get("learning_curve") or {}).items() if len(v) > 1}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
        for name, points in curves.items():
            samples = [p["samples"] for p in points]
            ax.plot(samples, [100 * p["success_rate"] for p in points], marker="o", label=name)
            ax.fill_between(
                samples,
                [100 * p["ci95"][0] for p in points],
                [100 * p["ci95"][1] for p in points],
                alpha=0.12,
            )
        ax.set(
            ylim=(0, 100),
            xlabel="training samples seen",
            ylabel="closed-loop success (%), 95% CI",
            title="pre-training: success on each source along training",
        )
        ax.legend(fontsize=7)
        paths["learning_curve"] = _save(fig, folder / "learning_curve.png")

    sp = results.get("soft_prompts") or {}
    if sp.get("domains"):
        fig, ax = plt.subplots(figsize=(6, 5), constrained_layout=True)
        colours = plt.get_cmap("tab10")
        for i, (name, d) in enumerate(sp["domains"].items()):
            star = name == held
            px, py = d["point"]  # the domain's first two principal components
            ax.scatter(
                px,
                py,
                s=180 if star else 90,
                marker="*" if star else "o",
                color=colours(i % 10),
                edgecolor="black",
                label=f"{name} (domain {d['domain_id']})",
                zorder=3,
            )
            ax.annotate(name, d["point"], textcoords="offset points", xytext=(6, 6), fontsize=8)
        init = results["adapt"].get("init_from")
        if init in sp["domains"] and held in sp["domains"]:
            ax.annotate(
                "",
                xy=sp["domains"][held]["point"],
                xytext=sp["domains"][init]["point"],
                arrowprops={"arrowstyle": "->", "color": "grey", "lw": 1},
            )
        var = sp["explained_variance"]
        ax.set(
            xlabel=f"PC1 ({100 * var[0]:.0f}%)",
            ylabel=f"PC2 ({100 * var[1]:.0f}%)",
            title="learned soft prompts, one point per domain (PCA)",
        )
        ax.margins(0.2)
        ax.legend(fontsize=7)
        paths["soft_prompts"] = _save(fig, folder / "soft_prompts_pca.png")
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_table(results: Mapping[str, Any], out: Path) -> Any:
    """The console summary: where the report is and what each number means."""
    from rich.table import Table

    held = results["config"]["heldout_source"].partition(":")[0]
    table = Table(title=f"X-VLA demo: report at {out / 'report.md'}", title_justify="left")
    table.add_column("number")
    table.add_column("value")
    table.add_column("meaning")
    for key, value in results["heldout_eval"].items():
        table.add_row(f"{held} {key}", _rate(value), CONDITION_TEXT.get(key, key))
    if held in results["oracle"]:
        table.add_row(
            f"{held} oracle", _rate(results["oracle"][held]), "recorded anchors through the action path"
        )
    for name, value in results["pretrain_eval"].items():
        table.add_row(f"{name} pre-trained", _rate(value), "in-distribution success of the pre-trained model")
    val = results["pretrain"]["validation"]["overall"]
    table.add_row("pre-training val L1", _fmt(val["l1"]), "sampled chunk vs expert anchors (m / unitless)")
    table.add_row(
        "wall time",
        duration(results["timing_s"].get("total")),
        f"budget {duration(sum(results['budget_s'].values()))}",
    )
    return table


def target_line(target: float | None, total: float | None) -> list[str]:
    if not target or total is None:
        return []
    verdict = "met" if total <= target else f"**missed** by {duration(total - target)}"
    return [f"Wall-time target of this scale: {duration(target)}, {verdict}.", ""]


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}" if minutes else f"{secs} s"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
