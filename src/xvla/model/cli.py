"""`xvla info` (parameter counts without allocating the model) and `xvla parity` (fixture replay)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from xvla.config import PRESETS, XVLAConfig, get_preset


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser("info", help="parameter counts per component of a preset or checkpoint")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    src.add_argument("--config", help="an XVLAConfig JSON file or checkpoint folder")
    info.set_defaults(func=_info)

    parity = subparsers.add_parser(
        "parity", help="replay a parity fixture (refs.safetensors) against a checkpoint"
    )
    parity.add_argument("checkpoint", help="checkpoint folder (ours, the authors' or LeRobot's layout)")
    parity.add_argument("--refs", help="reference file (default: CHECKPOINT/refs.safetensors)")
    parity.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance on tensors")
    parity.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance on loss scalars")
    parity.set_defaults(func=_parity)


def parameter_counts(config: XVLAConfig) -> dict[str, int]:
    """Parameters per component, counted on the meta device (nothing is allocated)."""
    from xvla.model.xvla import XVLA

    with torch.device("meta"):
        model = XVLA(config)
    vlm = model.vlm

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "vision (DaViT + projector)": n(vlm.vision_tower) + n(vlm.multi_modal_projector),
        "text encoder (BART)": n(vlm.language_model),
        "head (soft-prompted transformer)": n(model.transformer),
        "total": n(model),
    }


def _load_config(path: str) -> XVLAConfig:
    from xvla.model.checkpoint import CONFIG_NAME, read_config

    p = Path(path)
    return read_config(p / CONFIG_NAME if p.is_dir() else p)


def _info(args: argparse.Namespace) -> int:
    try:
        config = get_preset(args.preset) if args.preset else _load_config(args.config)
    except (OSError, ValueError, KeyError) as err:
        print(f"xvla info: error: {err}", file=sys.stderr)
        return 2
    for name, count in parameter_counts(config).items():
        print(f"{name:34s} {count:>14,d}  ({count / 1e6:8.1f} M)")
    return 0


def _parity(args: argparse.Namespace) -> int:
    from xvla.model.parity import run_parity

    try:
        results, layout = run_parity(args.checkpoint, args.refs, atol=args.atol, rtol=args.rtol)
    except (OSError, ValueError, KeyError) as err:
        print(f"xvla parity: error: {err}", file=sys.stderr)
        return 2
    print(f"checkpoint layout: {layout}")
    for r in results:
        print(
            f"{'ok  ' if r.ok else 'FAIL'} {r.name:28s} max {r.kind} err {r.error:.3e} (tol {r.tol:.0e}, |ref| max {r.max_ref:.3g})"
        )
    failed = [r.name for r in results if not r.ok]
    print(
        f"{len(results) - len(failed)}/{len(results)} outputs within tolerance"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0
