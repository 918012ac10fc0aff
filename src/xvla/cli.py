"""The single `xvla` command.

Each subpackage owns its subcommands in its own `cli.py` exposing `register(subparsers)`; this module only
wires them together, so adding a command never touches another team's file. Subpackages are imported
lazily by name so `xvla --help` stays fast and a missing optional extra only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from xvla.processes import exit_on_sigterm

# Modules that provide `register(subparsers: argparse._SubParsersAction) -> None`.
_COMMAND_MODULES = (
    "xvla.model.cli",  # info, parity, export
    "xvla.data.cli",  # data inspect
    "xvla.train.cli",  # train, adapt
    "xvla.serve.cli",  # serve, replay
    "xvla.sim.cli",  # sim generate/eval
    "xvla.demo.cli",  # demo (the main job)
    "xvla.experiments.cli",  # experiments (grids of demo runs)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvla", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("xvla."):
                continue  # that part of the package is not there yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # a killed command stops its children (xvla.processes)
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
