"""`xvla info` (parameter counts without allocating the model), `xvla parity` (fixture replay) and `xvla export`
(another layout or format)."""

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

    export = subparsers.add_parser(
        "export", help="write a checkpoint in LeRobot's or the authors' layout (or as ONNX)"
    )
    export.add_argument("checkpoint", help="checkpoint folder or hub id (any layout)")
    export.add_argument("out", help="the new folder to write")
    export.add_argument(
        "--format", choices=("safetensors", "onnx"), default="safetensors", help="default: safetensors"
    )
    export.add_argument(
        "--layout", choices=("lerobot", "authors"), help="whose checkpoint layout (required with safetensors)"
    )
    export.add_argument(
        "--tokenizer-name",
        help="LeRobot: the tokenizer its preprocessor loads (default: facebook/bart-large)",
    )
    export.add_argument(
        "--domain",
        help="LeRobot: the domain its preprocessor sets, a source name or id (default: the only one)",
    )
    export.set_defaults(func=_export)


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


def _export(args: argparse.Namespace) -> int:
    try:
        if args.format == "onnx":
            if args.layout or args.tokenizer_name or args.domain:
                raise ValueError("--layout, --tokenizer-name and --domain apply to --format safetensors only")
            from xvla.model.onnx_export import export_onnx  # imports onnx only when it exports

            export_onnx(args.checkpoint, args.out)
        else:
            from xvla.model.export import export_checkpoint

            if args.layout is None:
                raise ValueError("--layout lerobot|authors is required with --format safetensors")
            export_checkpoint(
                args.checkpoint, args.out, args.layout, tokenizer_name=args.tokenizer_name, domain=args.domain
            )
    except (OSError, ValueError, KeyError) as err:
        print(f"xvla export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format}" + (f", {args.layout} layout)" if args.layout else ")"))
    return 0
