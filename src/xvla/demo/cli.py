"""`xvla demo`: argument parsing; the run itself is `xvla.demo.stages.run_demo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from xvla import devices
from xvla.demo.config import SCALES, demo_config
from xvla.demo.stages import Runtime, run_demo

DEFAULT_OUT = "demo_out"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="generate a small sim suite, pre-train, adapt to a held-out robot, evaluate, write a report",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument(
        "--scale",
        default="default",
        choices=sorted(SCALES),
        help="stage sizes: smoke (seconds), default (<= 25 min on 2 CPU cores), small|medium|large (GPU)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seeds data generation, training and evaluation")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="simulator processes for generation, oracle and evaluation (default: min(cores, 4))",
    )
    p.add_argument(
        "--train-processes",
        type=int,
        default=None,
        help="CPU training processes, DDP over gloo, each with its share of the batch (default: one per core "
        "while each gets >= 8 samples)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of each training process (default: the cores divided among the processes)",
    )
    p.add_argument("--data", default=None, help="generated datasets folder (default OUT/data; cached)")
    p.add_argument(
        "--skip-generate",
        action="store_true",
        help="use the datasets already in the data folder; fail if they are missing",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DemoConfig field, e.g. --set pretrain_steps=2000 (repeatable)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (same settings): training stages from their latest checkpoints",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = demo_config(args.scale, args.overrides).replace(seed=args.seed)
    out = Path(args.out).expanduser().resolve()
    workers = args.workers if args.workers is not None else max(1, min(os.cpu_count() or 1, 4))
    if workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {workers}")
    device = devices.resolve_device(args.device)
    cores = devices.default_threads()
    processes = args.train_processes or (
        devices.cpu_train_processes(cfg.batch_size, cores) if device == "cpu" else 1
    )
    rt = Runtime(
        out=out,
        data=Path(args.data).expanduser().resolve() if args.data else out / "data",
        device=device,
        workers=workers,
        threads=args.threads or max(1, cores // processes),
        train_processes=processes,
        skip_generate=args.skip_generate,
        progress=not args.no_progress,
    )
    run_demo(cfg, rt, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xvla")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
