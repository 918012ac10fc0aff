"""`xvla serve` and `xvla replay`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the policy imports torch, which the CLI loads only when a command needs it
    from xvla.serve.policy import Policy

API_KEY_ENV = "XVLA_API_KEY"  # the key without putting it on the command line
# Loading errors whose message names the file or field (a missing folder, corrupt weights, a bad source);
# anything else keeps its traceback.
LOAD_ERRORS = (FileNotFoundError, ValueError)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over WebSocket (openpi protocol) and HTTP (/act, /healthz) on one port",
        description="Serve a checkpoint. Without --source the server speaks the raw model protocol (the authors' "
        "/act fields: image0..2, language_instruction, proprio, domain_id); with --source requests carry the "
        "robot's native state and camera images and get native actions at its control rate.",
    )
    p.add_argument("checkpoint", help="checkpoint folder or hub id")
    p.add_argument(
        "--source",
        default=None,
        help="source name from the checkpoint's sources.json, or a source JSON/YAML file",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8010)
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Api-Key KEY' (visible in the process list: prefer --api-key-file or "
        f"${API_KEY_ENV}; default: no key)",
    )
    key.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also serve browser pages from this origin, e.g. https://dashboard.example:8443 (repeatable; '*' "
        "allows any). Requests with an Origin header from other sites are refused: pages on loopback or on "
        "--host are allowed",
    )
    p.add_argument("--max-batch", type=int, default=8, help="largest dynamic batch")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long the first request waits for others"
    )
    p.add_argument(
        "--max-message-mb", type=float, default=16.0, help="largest accepted message / request body"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="open connections (HTTP and WebSocket) beyond which new ones get 503 (default 64)",
    )
    p.add_argument(
        "--max-buffered-mb",
        type=float,
        default=256.0,
        help="request bodies and messages held at once beyond which new ones are refused (503 / close 1013)",
    )
    _policy_args(p)
    p.set_defaults(func=_serve)

    r = subparsers.add_parser(
        "replay",
        help="train/serve consistency: replay dataset frames through the serving path and report the error",
        description="Replays validation frames (native state and camera frames, as a robot would send them) "
        "through Policy with each frame's Source, checks that the model inputs equal the training transform's, "
        "and reports the L1 of sampled chunks vs the dataset's targets in canonical space, per source.",
    )
    r.add_argument("checkpoint", help="checkpoint folder or hub id")
    r.add_argument("--mixture", required=True, help="mixture JSON/YAML file")
    r.add_argument("--split", default="val", choices=("train", "val"))
    r.add_argument("--samples", type=int, default=64, help="frames to replay")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--data-seed", type=int, default=0, help="MixtureDataset seed (frames drawn)")
    r.add_argument("--json", default=None, help="also write the report to this JSON file")
    _policy_args(r)
    r.set_defaults(func=_replay)


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per query")
    p.add_argument("--seed", type=int, default=None, help="fixed sampling noise (reproducible outputs)")
    p.add_argument(
        "--noise-scale",
        type=float,
        default=1.0,
        help="sampling temperature in [0, 1]: the flow's initial noise is scaled by it (0: deterministic)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use the model's fast inference path when it has one (default: the model's choice)",
    )


def _policy(args: argparse.Namespace, source: str | None) -> Policy:
    import torch

    from xvla.serve.policy import Policy

    if args.threads:
        torch.set_num_threads(args.threads)
    return Policy.from_checkpoint(
        args.checkpoint,
        source=source,
        device=args.device,
        steps=args.steps,
        seed=args.seed,
        fast=args.fast,
        noise_scale=args.noise_scale,
    )


def api_key(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str | None:
    """The server's API key: --api-key, else the first line of --api-key-file, else $XVLA_API_KEY, else None.
    An empty key is an error, never "no key"."""
    if args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        path = Path(args.api_key_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"--api-key-file {path}: cannot read it ({err.strerror})") from None
        key, where = (lines[0] if lines else ""), f"--api-key-file {path}"
    elif API_KEY_ENV in environ:
        key, where = environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    key = key.strip()
    if not key:
        raise ValueError(f"{where}: the API key is empty (unset it to serve without a key)")
    return key


def _serve(args: argparse.Namespace) -> int:
    from xvla.serve.server import ServerConfig, run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        key = api_key(args)
        config = ServerConfig(
            host=args.host,
            port=args.port,
            api_key=key,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_message_mb=args.max_message_mb,
            allow_origins=tuple(args.allow_origin),
            max_connections=args.max_connections,
            max_buffered_mb=args.max_buffered_mb,
        )
    except ValueError as err:
        print(f"xvla serve: error: {err}", file=sys.stderr)
        return 2
    try:
        policy = _policy(args, args.source)
    except LOAD_ERRORS as err:
        print(f"xvla serve: error: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        logging.warning(
            "serving on %s without an API key (--api-key-file, $%s): anyone who can reach this port can drive "
            "the robot",
            args.host,
            API_KEY_ENV,
        )
    run_server(policy, config)
    return 0


def _replay(args: argparse.Namespace) -> int:
    from xvla.data.sources import Mixture
    from xvla.serve.replay import format_report, replay

    try:
        policy = _policy(args, None)
    except LOAD_ERRORS as err:
        print(f"xvla replay: error: {err}", file=sys.stderr)
        return 2
    report = replay(
        policy,
        Mixture.load(args.mixture),
        split=args.split,
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.data_seed,
    )
    sys.stdout.write(format_report(report) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0
