"""`xvla data ...` subcommands."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset tools (inspect)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "inspect",
        help="summarise a mixture file or a dataset folder (LeRobot v2.1/v3.0, HDF5) and flag bad values",
    )
    p.add_argument("path", help="mixture file (.json/.yaml) or dataset folder/file (format auto-detected)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--max-episodes", type=int, default=20, help="episodes whose values are checked (default 20)"
    )
    p.add_argument("--format", choices=("auto", "lerobot", "hdf5"), default="auto", help="dataset format")
    p.add_argument("--fps", type=float, default=None, help="frame rate of HDF5 files that record none")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from xvla.data.episode_base import DatasetError
    from xvla.data.inspect import inspect_path, print_reports, reports_to_json
    from xvla.data.sources import SourceError

    options = {"format": args.format} | ({"fps": args.fps} if args.fps is not None else {})
    try:
        reports = inspect_path(args.path, max_episodes=args.max_episodes, **options)
    except (DatasetError, SourceError, FileNotFoundError) as err:
        print(f"xvla data inspect: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(reports_to_json(reports))
    else:
        print_reports(reports)
    return 1 if any(r.error for r in reports) else 0
