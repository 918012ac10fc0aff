"""`xvla sim generate|eval|list`: the built-in simulation suite from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser("sim", help="built-in multi-robot simulation suite (generate data, evaluate)")
    sub = sim.add_subparsers(dest="sim_command", required=True, metavar="SIM_COMMAND")

    lst = sub.add_parser("list", help="list the simulated sources, their robots, rates, cameras and tasks")
    lst.set_defaults(func=_list)

    gen = sub.add_parser("generate", help="scripted-expert episodes -> LeRobot v3.0 datasets + mixture.json")
    gen.add_argument(
        "--sources",
        nargs="+",
        default=["pretrain"],
        help="source names (optionally NAME:task1,task2), 'pretrain' (default) or 'all'",
    )
    gen.add_argument("--episodes", type=int, default=20, help="successful episodes per source (default 20)")
    gen.add_argument(
        "--out", type=Path, default=None, help="suite folder (default $XVLA_CACHE/sim or ~/.cache/xvla/sim)"
    )
    gen.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    gen.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=_generate)

    ev = sub.add_parser(
        "eval", help="closed-loop success of a checkpoint (or the oracle check) in simulation"
    )
    ev.add_argument("checkpoint", nargs="?", help="checkpoint folder or hub id (omit with --oracle)")
    ev.add_argument("--source", nargs="+", required=True, help="simulated source name(s)")
    ev.add_argument("--task", nargs="+", default=None, help="task id(s) (default: all tasks of the source)")
    ev.add_argument(
        "--episodes", type=int, default=50, help="episodes per task (oracle: recorded episodes to replay)"
    )
    ev.add_argument("--seed", type=int, default=0, help="evaluation seed namespace (default 0)")
    ev.add_argument("--image-size", type=int, default=64)
    ev.add_argument(
        "--replan", type=float, default=0.25, help="seconds of each chunk executed before re-querying"
    )
    ev.add_argument("--steps", type=int, default=10, help="denoising steps per query")
    ev.add_argument("--device", default=None)
    ev.add_argument(
        "--video", type=Path, default=None, help="folder for MP4s of the first episodes of each task"
    )
    ev.add_argument(
        "--oracle",
        action="store_true",
        help="replay recorded episodes' own anchors through the policy action path (no model)",
    )
    ev.add_argument(
        "--suite",
        type=Path,
        default=None,
        help="generated suite folder or mixture file for --oracle (default: the cache folder)",
    )
    ev.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)


def _list(args: argparse.Namespace) -> int:
    from xvla.sim.suite import SUITE

    for name, e in SUITE.items():
        s = e.spec
        role = "held-out" if s.held_out else "pretrain"
        print(
            f"{name:16s} domain {e.domain_id}  {s.robot:15s} {s.fps:5.0f} Hz  {role:8s} cameras={','.join(s.cameras)}"
            f"  tasks={','.join(s.tasks)}"
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from xvla.sim.generate import generate_suite, suite_report

    path = generate_suite(
        args.sources,
        args.episodes,
        args.out,
        args.workers,
        args.image_size,
        args.seed,
        progress=not args.no_progress,
    )
    report = suite_report(path.parent)
    for name, stats in report["sources"].items():
        print(
            f"{name:16s} expert success {stats['expert_success_rate']:.0%} over {stats['attempts']} attempts, "
            f"{stats['seconds_per_episode']:.2f} s/episode"
        )
    print(f"mixture: {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from xvla.sim.evaluate import evaluate, oracle_check, save_results

    results: dict[str, Any] = {}
    if args.oracle:
        from xvla.sim.generate import MIXTURE, cache_dir

        suite = args.suite or cache_dir()
        mixture = suite / MIXTURE if suite.is_dir() else suite
        if not mixture.is_file():
            print(f"--suite: no mixture file at {mixture} (run `xvla sim generate` first)", file=sys.stderr)
            return 2
        for name in args.source:
            r = oracle_check(
                mixture, name, args.episodes, replan_s=args.replan, progress=not args.no_progress
            )
            results[name] = r
            print(
                f"oracle {name:16s} {r['successes']}/{r['episodes']} = {r['success_rate']:.0%} "
                f"(expert {r['expert_success_rate']:.0%}, ratio {r['ratio_to_expert']:.2f})"
            )
    else:
        if args.checkpoint is None:
            print("eval: give a CHECKPOINT (or --oracle)", file=sys.stderr)
            return 2
        for name in args.source:
            factory = _checkpoint_factory(args.checkpoint, name, args.device, args.steps)
            r = evaluate(
                factory,
                name,
                args.episodes,
                tasks=args.task,
                seed=args.seed,
                image_size=args.image_size,
                replan_s=args.replan,
                video_dir=args.video,
                progress=not args.no_progress,
            )
            results[name] = r
            for task, t in r["tasks"].items():
                lo, hi = t["ci95"]
                print(
                    f"{name:16s} {task:22s} {t['successes']}/{t['episodes']} = {t['success_rate']:.0%} "
                    f"(95% CI {lo:.0%}-{hi:.0%})"
                )
            lo, hi = r["ci95"]
            print(
                f"{name:16s} {'all':22s} {r['successes']}/{r['episodes']} = {r['success_rate']:.0%} (95% CI {lo:.0%}-{hi:.0%})"
            )
    if args.out is not None:
        save_results(results, args.out)
    else:
        json.dump(
            {k: {kk: vv for kk, vv in v.items() if kk != "outcomes"} for k, v in results.items()},
            sys.stdout,
            indent=1,
            default=str,
        )
        print()
    return 0


def _checkpoint_factory(checkpoint: str, name: str, device: str | None, steps: int) -> Any:
    """Policy for a simulated source: its Source from the checkpoint's sources.json, else the suite's own."""

    def make() -> Any:
        from xvla.serve.policy import Policy, load_sources
        from xvla.sim.suite import entry

        try:
            from xvla.model.checkpoint import resolve_folder

            known = load_sources(resolve_folder(checkpoint, None))
        except Exception:  # noqa: BLE001 - any failure here falls back to the suite description below
            known = {}
        source: Any = name if name in known else entry(name).source(path=name)
        return Policy.from_checkpoint(checkpoint, source=source, device=device, steps=steps)

    return make
