"""Closed-loop ablations of the demo's pre-training: named arms, each a change to `DemoConfig`, trained on the
demo's own generated datasets and evaluated on every pre-training task with the same evaluation seeds.

    PYTHONPATH=src python benchmarks/demo_ablations.py --data demo_out/data --out abl --arms base,lr2e-3
    PYTHONPATH=src python benchmarks/demo_ablations.py --out abl --table          # markdown table of finished arms

Arms that differ only in evaluation settings (`replan_s`, `sample_steps`, `noise_scale`, `gripper_close_at`) share one training run. Every arm
writes `OUT/<training key>/pretrain/` (the run) and `OUT/arms/<arm>.json` (its config, training summary and
success per task with 95% Wilson intervals); a finished arm is skipped on a rerun. Runs use `--threads` torch
threads and `--workers` simulator processes, so two invocations with one thread each share a 2-core machine
(success does not depend on the machine's load; wall times then do, so read them as a pair).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xvla import demo  # noqa: E402
from xvla.demo import stages  # noqa: E402
from xvla.sim.evaluate import merge_evaluations  # noqa: E402
from xvla.sim.jobs import run_jobs  # noqa: E402

# Fields that only change how a trained policy is evaluated: arms differing only in these share the training.
EVAL_FIELDS = frozenset(
    {
        "replan_s",
        "sample_steps",
        "noise_scale",
        "gripper_close_at",
        "eval_episodes",
        "pre_adaptation_episodes",
        "untrained_episodes",
        "pretrain_eval_episodes",
        "curve_points",
        "curve_episodes",
        "oracle_episodes",
        "videos",
        "target_s",
        "budget_s",
        "scale",
    }
)
# Fields that change only the adaptation to the held-out robot (and its scratch baseline).
ADAPT_FIELDS = frozenset(
    {"adapt_prompt_steps", "adapt_steps", "adapt_lr", "adapt_mode", "adapt_init", "scratch_baseline"}
)

_DEMO_MODEL = demo.DemoConfig().model_overrides

# name -> DemoConfig changes from the default scale
ARMS: dict[str, dict[str, Any]] = {
    "base": {},
    "replan0.1": {"replan_s": 0.1},
    "replan0.2": {"replan_s": 0.2},
    "replan0.4": {"replan_s": 0.4},
    "replan0.6": {"replan_s": 0.6},
    "replan0.8": {"replan_s": 0.8},
    "steps5": {"sample_steps": 5},
    "noise0": {"noise_scale": 0.0},
    "noise0.5": {"noise_scale": 0.5},
    "close0.25": {"gripper_close_at": 0.25},
    "close0.1": {"gripper_close_at": 0.1},
    "lr2e-3": {"lr": 2e-3},
    "lr5e-4": {"lr": 5e-4},
    "lr2e-4": {"lr": 2e-4},
    "ema0.99": {"ema_decay": 0.99},
    "bf16": {"precision": "bf16"},  # bf16 autocast in every training run (fp32 master weights)
    "mlp2": {"model_overrides": {**_DEMO_MODEL, "head.mlp_ratio": 2.0}},
    "nojitter": {"augment": {"color_jitter": False, "shift_px": 0}},
    "shift4": {"augment": {"color_jitter": True, "shift_px": 4}},
    "no-keypoints": {"model_overrides": {**_DEMO_MODEL, "vision.keypoints": 0}},  # item 27 without its token
    "head256x2": {"model_overrides": {**_DEMO_MODEL, "head.hidden_size": 256, "head.depth": 2}},
    "episodes40": {"episodes": 40, "heldout_episodes": 40},
    "hidden-gripper": {"model_overrides": {**_DEMO_MODEL, "proprio_gripper": False}},
    "adapt-lr3e-4": {"adapt_lr": 3e-4},
    "adapt-lr2e-3": {"adapt_lr": 2e-3},
    "adapt-lr5e-4": {"adapt_lr": 5e-4},
    "adapt-steps300": {"adapt_steps": 300},
    "adapt-prompt200": {"adapt_prompt_steps": 200},
    # the held-out robot's prompt and heads copied from a named pre-training domain instead of the retrieved one
    "adapt-init-ur5e": {"adapt_init": "rs_ur5e"},
    "adapt-init-panda": {"adapt_init": "rs_panda"},
    "adapt-init-iiwa": {"adapt_init": "rs_iiwa"},
    # single-source overfit check (issue #12): the same budget on one robot alone
    "only-so100": {"pretrain_sources": ("so100_bimanual",)},
    "only-sawyer": {"pretrain_sources": ("mw_sawyer:button-press-topdown,drawer-open",)},
}


def training_key(cfg: demo.DemoConfig, adaptation: bool = False) -> str:
    """A short hash of the fields that change pre-training (or, with `adaptation`, also the adaptation):
    the same key means the same trained model."""
    ignored = EVAL_FIELDS if adaptation else EVAL_FIELDS | ADAPT_FIELDS
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ignored}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def evaluate_adapted(cfg: demo.DemoConfig, rt: stages.Runtime, mixture: Path, adapted: dict[str, Any]) -> Any:
    """Success of the adapted checkpoint on the held-out robot, `cfg.eval_episodes` per task."""
    from xvla.data.sources import Mixture
    from xvla.sim.suite import parse_selection

    (held,) = Mixture.load(mixture).sources
    source = dataclasses.replace(held, domain_id=adapted["domain_id"])
    (tasks,) = parse_selection([cfg.heldout_source]).values()
    jobs = stages.eval_jobs(cfg, rt, source, tasks, adapted["checkpoint"], cfg.eval_episodes)
    return merge_evaluations(run_jobs(jobs, rt.workers, progress=rt.progress, desc="evaluate held-out"))


def evaluate_pretrained(
    cfg: demo.DemoConfig,
    rt: stages.Runtime,
    mixture: Path,
    checkpoint: Path,
    episodes: int,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Success of `checkpoint` on every pre-training task (of the sources in `only`, when given), `episodes` per
    task (the demo's evaluation seeds)."""
    from xvla.data.sources import Mixture
    from xvla.sim.evaluate import wilson_interval
    from xvla.sim.suite import parse_selection

    sources = {s.name: s for s in Mixture.load(mixture).sources}
    jobs = [
        job
        for name, tasks in parse_selection(list(cfg.pretrain_sources)).items()
        if only is None or name in only
        for job in stages.eval_jobs(cfg, rt, sources[name], tasks, str(checkpoint), episodes)
    ]
    grouped: dict[str, list[dict[str, Any]]] = {}
    for job, result in zip(
        jobs, run_jobs(jobs, rt.workers, progress=rt.progress, desc="evaluate"), strict=True
    ):
        grouped.setdefault(job.source, []).append(result)
    per_source = {name: merge_evaluations(parts) for name, parts in grouped.items()}
    k = sum(s["successes"] for s in per_source.values())
    n = sum(s["episodes"] for s in per_source.values())
    total = {"successes": k, "episodes": n, "success_rate": k / n, "ci95": list(wilson_interval(k, n))}
    return {"per_source": per_source, "all": total}


def run_arm(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import time

    import torch

    record = args.out / "arms" / f"{name}{'-' + '+'.join(args.sources) if args.sources else ''}.json"
    if record.exists():
        return json.loads(record.read_text())
    cfg = demo.SCALES[args.scale].replace(seed=args.seed, **ARMS[name])
    key = training_key(cfg)
    rt = stages.Runtime(
        out=args.out / key,
        data=args.data,
        device="cpu",
        workers=args.workers,
        threads=args.threads,
        skip_generate=not args.generate,
        progress=not args.no_progress,
    )
    torch.set_num_threads(args.threads)
    mixtures = stages.generate_data(cfg, rt)
    summary_file = rt.out / "pretrain_summary.json"
    t0 = time.perf_counter()
    demo_run = json.loads((args.from_demo / "results.json").read_text()) if args.from_demo else None
    if demo_run is not None:
        if (
            training_key(cfg, adaptation=True)
            != training_key(demo.SCALES[args.scale].replace(seed=args.seed), adaptation=True)
            or demo_run["config"]["seed"] != args.seed
        ):
            raise SystemExit(f"--from-demo: arm {name!r} changes training, or the run has another seed")
        summary = demo_run["pretrain"]
    elif args.pretrained is not None:
        if key != training_key(demo.SCALES[args.scale].replace(seed=args.seed)):
            raise SystemExit(f"--pretrained: arm {name!r} changes pre-training; run it without --pretrained")
        summary = stages.training_summary(args.pretrained.parent.parent, args.pretrained)
    elif summary_file.exists():
        summary = json.loads(summary_file.read_text())
    else:
        summary = stages.pretrain(cfg.replace(curve_points=0), rt, mixtures)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        summary_file.write_text(json.dumps(summary))
    t1 = time.perf_counter()
    evaluation = evaluate_pretrained(
        cfg, rt, mixtures["pretrain"], Path(summary["checkpoint"]), args.episodes, args.sources
    )
    heldout = None
    if args.heldout:
        art = dataclasses.replace(rt, out=rt.out / f"adapt-{training_key(cfg, adaptation=True)}")
        adapt_file = art.out / "adapt_summary.json"
        adapt_mixtures = stages.generate_data(cfg, art)
        if demo_run is not None:
            adapted = {**demo_run["adapt"], "wall_s": None}
        elif adapt_file.exists():
            adapted = json.loads(adapt_file.read_text())
        else:
            t2 = time.perf_counter()
            adapted = stages.adapt_heldout(cfg, art, adapt_mixtures, Path(summary["checkpoint"]))
            adapted["wall_s"] = round(time.perf_counter() - t2, 1)
            adapt_file.write_text(json.dumps(adapted))
        heldout = {
            "init_from": adapted["init_from"],
            "adapt_wall_s": adapted["wall_s"],
            "validation": adapted["validation"]["overall"],
            **evaluate_adapted(cfg, art, adapt_mixtures["heldout"], adapted),
        }
    result = {
        "heldout": heldout,
        "arm": name,
        "changes": ARMS[name],
        "training_key": key,
        "threads": args.threads,
        "train_wall_s": summary.get("wall_s"),
        "samples_per_s": summary["samples_per_s"],
        "validation": summary["validation"]["overall"],
        "eval_wall_s": round(time.perf_counter() - t1, 1),
        **evaluation,
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(out: Path) -> str:
    """Markdown: one row per finished arm, success per source and in all (k/n, 95% Wilson interval)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "arms").glob("*.json"))]
    if not rows:
        return "no finished arms"
    # Every record's sources, in order: a record may evaluate a subset (--sources).
    sources = list(dict.fromkeys(name for r in rows for name in r["per_source"]))
    head = ["arm", "changes", "samples/s", "val L1", *sources, "all", "held-out (adapted)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(s: dict[str, Any]) -> str:
        low, high = s["ci95"]
        return f"{s['successes']}/{s['episodes']} ({100 * low:.0f}-{100 * high:.0f}%)"

    for r in rows:
        per = [cell(r["per_source"][s]) if s in r["per_source"] else "" for s in sources]
        changes = json.dumps(r["changes"]).replace("|", "/") if r["changes"] else "-"
        rate = f"{r['samples_per_s']:.1f}" if r.get("samples_per_s") else ""
        lines.append(
            f"| {r['arm']} | {changes} | {rate} | {r['validation'].get('l1', float('nan')):.3f} | "
            + " | ".join(per)
            + f" | **{cell(r['all'])}** | {cell(r['heldout']) if r.get('heldout') else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=Path("demo_out/data"), help="the demo's generated datasets"
    )
    parser.add_argument("--out", type=Path, default=Path("demo_ablations"))
    parser.add_argument("--arms", default="base", help=f"comma-separated, from {sorted(ARMS)}")
    parser.add_argument("--scale", default="default", help="the demo scale the arms change")
    parser.add_argument(
        "--generate", action="store_true", help="generate missing datasets into --data (else they must exist)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the demo seed (data, weights, evaluation seeds)")
    parser.add_argument("--episodes", type=int, default=20, help="evaluation episodes per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--heldout", action="store_true", help="also adapt to the held-out robot and evaluate it"
    )
    parser.add_argument(
        "--pretrained",
        type=Path,
        help="a finished pre-training checkpoint of the unchanged scale (e.g. demo_out/pretrain/checkpoints/"
        "step_00001200) for arms that change only evaluation or adaptation",
    )
    parser.add_argument(
        "--from-demo",
        type=Path,
        help="a finished `xvla demo` output folder of the unchanged scale and the same seed: its pre-trained and "
        "adapted checkpoints, for arms that change only evaluation",
    )
    parser.add_argument(
        "--sources",
        type=lambda text: text.split(","),
        default=None,
        help="evaluate only these pre-training sources (comma-separated names; the record is named after them)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the table of finished arms and exit")
    args = parser.parse_args()
    if not args.table:
        names = [a for a in args.arms.split(",") if a]
        unknown = sorted(set(names) - set(ARMS))
        if unknown:
            raise SystemExit(f"--arms: unknown {unknown}; expected names from {sorted(ARMS)}")
        for name in names:
            result = run_arm(name, args)
            print(f"{name}: {result['all']['successes']}/{result['all']['episodes']}", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()
