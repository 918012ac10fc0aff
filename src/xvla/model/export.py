"""`xvla export CKPT OUT --layout lerobot|authors`: a checkpoint folder that LeRobot's X-VLA policy or the authors'
`XVLA.from_pretrained` loads.

The layouts are written through `layouts.py`, the same tables `checkpoint.py` reads them with. What a layout cannot
hold is refused, never approximated: the exported config is read back with our reader, and any field that would not
come back as it is (our extra options, a non-released objective, sizes a layout has no field for) is an error
naming it. docs/model.md lists them and records a load by LeRobot 0.6.1 itself.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from xvla.config import XVLAConfig
from xvla.model.checkpoint import (
    CONFIG_NAME,
    SOURCES_NAME,
    WEIGHTS_NAME,
    atomic_folder,
    load_state,
    read_checkpoint,
    read_sources,
    resolve_folder,
)
from xvla.model.layouts import (
    FOREIGN_LAYOUTS,
    ForeignLayout,
    config_to_authors,
    config_to_lerobot,
    layout_fields,
    lerobot_processors,
    state_to_layout,
    weights_metadata,
)
from xvla.model.xvla import XVLA

# What `AutoTokenizer.save_pretrained` writes; copied along so the exported folder is self-contained.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
BART_TOKENIZER = "facebook/bart-large"  # the released models' tokenizer, LeRobot's default `tokenizer_name`
BART_VOCAB = 50265  # its vocabulary without added tokens (Florence-2's adds location tokens on top)
XVLA_DEFAULTS = XVLAConfig()  # what a field a layout does not hold loads as
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}  # the two LeRobot's `dtype` accepts
# Why our options beyond the released model cannot be carried over (for the rest: the layout has no field for them).
_WHY = {
    "objective": "their samplers are the released x0 re-noising one",
    "proprio_gripper": "their models always zero the proprio's gripper channels",
    "mask_text_padding": "their models mask nothing",
    "mask_missing_views": "their models mask nothing",
}


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    layout: str,
    *,
    tokenizer_name: str | None = None,
    domain: str | None = None,
) -> Path:
    """Write `checkpoint` (any layout) to the new folder `out` in `layout` ("lerobot" or "authors"): config.json,
    model.safetensors, the tokenizer and sources.json when the checkpoint has them, and for LeRobot the policy
    pre/post-processor files. `tokenizer_name` and `domain` (a source name or domain id) fill LeRobot's
    preprocessor. Raises ValueError for anything the layout cannot hold, FileExistsError if `out` is not empty."""
    if layout not in FOREIGN_LAYOUTS:
        raise ValueError(f"layout: expected one of {list(FOREIGN_LAYOUTS)}, got {layout!r}")
    target: ForeignLayout = "lerobot" if layout == "lerobot" else "authors"
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder (the export writes a new one)")
    if target == "authors" and (tokenizer_name is not None or domain is not None):
        raise ValueError("tokenizer_name and domain set LeRobot's preprocessor: the authors' layout has none")
    folder = resolve_folder(checkpoint)
    config, state, _ = read_checkpoint(folder)
    with torch.device("meta"):
        model = XVLA(config)
    load_state(model, state, source=str(folder / WEIGHTS_NAME))  # mismatched or non-finite weights: refused
    dtype = weights_dtype(state)
    files: dict[str, dict[str, Any]]
    if target == "lerobot":
        raw = config_to_lerobot(config, dtype, tokenizer_name or default_tokenizer_name(folder, config))
        files = {CONFIG_NAME: raw, **lerobot_processors(raw, domain_id(folder, config, domain))}
    else:
        import transformers

        raw = config_to_authors(config, dtype, transformers.__version__)
        files = {CONFIG_NAME: raw}
    refuse_uncarried(config, raw, target)
    weights = state_to_layout(state, target)
    with atomic_folder(out) as tmp:
        for name, content in files.items():
            # draccus and LeRobot's processors indent by 4, transformers by 2
            (tmp / name).write_text(json.dumps(content, indent=4 if target == "lerobot" else 2) + "\n")
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata=weights_metadata(target))
        for name in (*TOKENIZER_FILES, SOURCES_NAME):
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
    return out


def weights_dtype(state: dict[str, Tensor]) -> str:
    """The one floating dtype of a state dict, by name ("float32" or "bfloat16")."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) != 1 or (dtype := dtypes.pop()) not in _DTYPES:
        found = sorted(str(d) for d in {v.dtype for v in state.values() if v.is_floating_point()})
        raise ValueError(f"weights: expected all float32 or all bfloat16 tensors, found {found}")
    return _DTYPES[dtype]


def uncarried_fields(config: XVLAConfig, raw: dict[str, Any], layout: ForeignLayout) -> list[str]:
    """The fields of `config` that the exported config `raw` does not carry: "name=ours (loads as theirs)". Compared
    field by field, before validation: what comes back may not even make a valid config."""
    held = layout_fields(raw, layout)
    back = {f.name: held.get(f.name, getattr(XVLA_DEFAULTS, f.name)) for f in dataclasses.fields(XVLAConfig)}
    ours, back = _flat(config.to_dict()), _flat(json.loads(json.dumps(back, default=dataclasses.asdict)))
    unused = () if config.action_space == "auto" else ("real_action_dim", "max_action_dim")
    return [
        f"{k}={ours[k]!r} (loads as {back[k]!r}" + (f": {_WHY[k]})" if k in _WHY else ")")
        for k in ours
        if k not in unused and ours[k] != back[k]
    ]


def refuse_uncarried(config: XVLAConfig, raw: dict[str, Any], layout: ForeignLayout) -> None:
    fields = uncarried_fields(config, raw, layout)
    if fields:
        raise ValueError(
            f"the {layout} layout cannot hold this checkpoint's "
            + "; ".join(fields)
            + " (docs/model.md, Export)"
        )


def default_tokenizer_name(folder: Path, config: XVLAConfig) -> str:
    """`facebook/bart-large` when the checkpoint's tokenizer is BART's (or it has none and the vocabulary fits
    BART's ids); otherwise the caller must say where LeRobot's processor finds the tokenizer."""
    hint = "pass --tokenizer-name (a hub id, or the exported folder's path: it holds a copy of the tokenizer)"
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        from xvla.model.tokenizer import load_tokenizer

        size = load_tokenizer(folder).vocab_size
        if size != BART_VOCAB:
            raise ValueError(
                f"tokenizer: this checkpoint's has {size} base tokens, {BART_TOKENIZER}'s {BART_VOCAB}; {hint}"
            )
    elif config.text.vocab_size < BART_VOCAB:
        raise ValueError(
            f"tokenizer: the checkpoint has none and its vocabulary ({config.text.vocab_size}) is smaller than "
            f"{BART_TOKENIZER}'s ({BART_VOCAB}); {hint}"
        )
    return BART_TOKENIZER


def domain_id(folder: Path, config: XVLAConfig, domain: str | None) -> int:
    """The domain LeRobot's preprocessor sets for every sample: `domain` (a source name from sources.json or an
    id); by default the checkpoint's only source, or 0 when it lists none."""
    sources = read_sources(folder)
    listing = ", ".join(f"{name} ({spec.get('domain_id')})" for name, spec in sources.items())
    if domain is None:
        if len(sources) > 1:
            raise ValueError(
                f"domain: LeRobot's preprocessor sets one domain id for every sample and this checkpoint has "
                f"{len(sources)} sources: pass --domain NAME or ID ({listing})"
            )
        value = next(iter(sources.values())).get("domain_id", 0) if sources else 0
    elif domain.isdigit():
        value = int(domain)
    elif domain in sources:
        value = sources[domain].get("domain_id")
    else:
        raise ValueError(
            f"domain: {domain!r} is neither a domain id nor a source of this checkpoint ({listing})"
        )
    if not isinstance(value, int) or not 0 <= value < config.head.num_domains:
        raise ValueError(f"domain: expected an id in [0, {config.head.num_domains}), got {value!r}")
    return value


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
