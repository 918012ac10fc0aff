"""`xvla experiments NAME`: run a named experiment's grid (resumable) and write its summary."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from xvla import devices
from xvla.demo.config import SCALES

DEFAULT_OUT = "experiments_out"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiments",
        help="run a named experiment (a grid of arms x seeds over the demo's suite) and summarise it",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments and their arms, then exit")
    p.add_argument(
        "--scale", default=None, choices=sorted(SCALES), help="demo scale (default: the experiment's)"
    )
    p.add_argument(
        "--seeds", default=None, help="comma-separated seeds (default: the experiment's), e.g. 0,1,2"
    )
    p.add_argument("--arms", default=None, help="comma-separated arms of this experiment (default: all)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="cells run side by side, each in its own process with one thread (default 1: one cell at a time "
        "with every core)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads of a cell (default: every core)")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: write the summary from the cells that have finished (e.g. while a grid runs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _cli(args: argparse.Namespace) -> int:
    from xvla.experiments.runner import RunOptions, run_experiment
    from xvla.experiments.specs import EXPERIMENTS, get_experiment

    if args.list:
        for spec in EXPERIMENTS.values():
            print(f"{spec.name}: {spec.description}")
            print(f"  scale {spec.scale}, seeds {list(spec.seeds)}, includes {list(spec.includes) or '-'}")
            for arm in spec.arms:
                print(f"  - {arm.name} [{arm.kind}] {arm.description}")
        return 0
    if args.name is None:
        raise ValueError("experiments: NAME is required (or --list)")
    get_experiment(args.name)  # an unknown name fails before anything runs
    if args.workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {args.workers}")
    seeds = _ints(args.seeds, "--seeds") if args.seeds is not None else None
    if seeds is not None and not seeds:
        raise ValueError("--seeds: expected at least one seed")
    cores = os.cpu_count() or 1
    opts = RunOptions(
        out=Path(args.out).expanduser().resolve(),
        device=devices.resolve_device(args.device),
        workers=args.workers,
        threads=args.threads or devices.default_threads(),
        sim_workers=max(1, min(cores, 4)),
        progress=not args.no_progress,
    )
    arms = [a for a in args.arms.split(",") if a] if args.arms else []
    done = run_experiment(
        args.name, opts, scale=args.scale, seeds=seeds, arms=arms, summary_only=args.summary_only
    )
    print(
        f"{args.name}: {len(done['ran'])} cell(s) run, {len(done['skipped'])} already finished; summary in "
        f"{opts.out / args.name / 'summary.md'}"
    )
    return 0
