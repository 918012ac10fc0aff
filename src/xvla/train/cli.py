"""`xvla train` and `xvla adapt`.

Both run unchanged under `accelerate launch` or `torchrun` (one process per GPU, one or many nodes):
    torchrun --nproc_per_node 8 -m xvla.cli train run.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from xvla.configio import ConfigError, load_config
from xvla.data.mixture import MixtureDataError
from xvla.data.sources import SourceError
from xvla.train.config import AdaptConfig, TrainConfig

# Errors whose message says everything; anything else keeps its traceback.
USER_ERRORS = (ConfigError, SourceError, MixtureDataError, FileExistsError, FileNotFoundError, ValueError)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model on a data mixture (CPU, GPU, DDP, FSDP through accelerate)",
        description="Train from a TrainConfig file (JSON or YAML); see docs/training.md.",
    )
    _common(train)
    train.set_defaults(func=_train)

    adapt = subparsers.add_parser(
        "adapt",
        help="add a domain to a trained checkpoint and fit it to new data (prompt, full or LoRA)",
        description="Adapt from an AdaptConfig file (JSON or YAML); see docs/training.md.",
    )
    _common(adapt)
    adapt.add_argument(
        "--checkpoint", help="trained checkpoint (same as --override train.model.checkpoint=...)"
    )
    adapt.add_argument("--mixture", help="new data sources (same as --override train.data.mixture=...)")
    adapt.set_defaults(func=_adapt)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file (.json, .yaml)")
    parser.add_argument(
        "--override",
        "-o",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. optim.lr=3e-4 batch_size=8 (values are YAML)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its latest checkpoint (starts it when there is none)",
    )


def _train(args: argparse.Namespace) -> int:
    from xvla.train.trainer import train

    def go() -> Path:
        return train(load_config(TrainConfig, args.config, args.override), resume=args.resume)

    return _report(go, "train")


def _adapt(args: argparse.Namespace) -> int:
    from xvla.train.adapt import adapt

    overrides = list(args.override)
    if args.checkpoint:
        overrides.append(f"train.model.checkpoint={args.checkpoint}")
    if args.mixture:
        overrides.append(f"train.data.mixture={args.mixture}")

    def go() -> Path:
        return adapt(load_config(AdaptConfig, args.config, overrides), resume=args.resume)

    return _report(go, "adapt")


def one_line(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (torch puts the worker's whole traceback
    in the message) the worker's own message, which is its traceback's last line."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return (last[len(prefix) :] if last.startswith(prefix) else last) + " (in a DataLoader worker)"


def _report(go: Callable[[], Path], command: str) -> int:
    from accelerate import PartialState

    from xvla.train.checkpointing import CheckpointWriteError
    from xvla.train.trainer import DivergedError  # the trainer is imported by `go` anyway

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        final = go()
    except (*USER_ERRORS, DivergedError, CheckpointWriteError) as err:
        print(f"xvla {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(f"final checkpoint: {final}")
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """After a successful run under torchrun: every rank meets, then tears its process group down. A process that
    exits with its gloo group alive can hang in the group's teardown, and torchrun then waits on it forever (seen
    once in the demo's smoke test, after the run's final checkpoint was written). Not after an error: a rank that
    failed mid-collective would leave the others waiting at the barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
