"""Checkpoints: our layout, the authors' (2toinf/X-VLA) layout and LeRobot's xvla layout, auto-detected.

Ours: `config.json` = `{"format": "xvla", **XVLAConfig.to_dict()}` + `model.safetensors` with this package's
parameter names (native transformers Florence-2 names under `vlm.`). The authors' and LeRobot's files use the
vendored remote-code Florence-2 names; `layouts.py` (the one definition of both, read here and written by
`export.py`) renames them. Every key must be consumed and every parameter filled: anything else is an error listing
the keys.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from xvla.config import XVLAConfig
from xvla.model.layouts import Layout, config_from_layout, state_from_layout
from xvla.model.transformer import time_frequencies
from xvla.model.xvla import XVLA

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SOURCES_NAME = (
    "sources.json"  # the data sources the model was trained with, by name (xvla.data.sources.Source dicts)
)


# ------------------------------------------------------------------------------------------------------ saving
def save_pretrained(model: XVLA, path: str | Path) -> None:
    """Write config.json + model.safetensors into `path` atomically (`atomic_folder`).

    Other files already in `path` (tokenizer, sources.json, ...) are carried over.
    """
    path = Path(path)
    with atomic_folder(path) as tmp:
        if path.is_dir():
            for item in path.iterdir():
                if item.name not in (CONFIG_NAME, WEIGHTS_NAME):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        model.config.to_json(tmp / CONFIG_NAME)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; on success it replaces `path` (renamed over it), on any error it is
    removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{tmp.name}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------- loading
# A hub id is `owner/name`, each part letters, digits, "-", "_" or "." (the hub's own rule, simplified).
_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def local_reason(path_or_hub_id: str | Path) -> str | None:
    """Why `path_or_hub_id` must be a local path and not a hub id, or None when it could be a hub id.

    A typo'd local path must fail as "not found", never reach the hub: anything that starts like a path, has a
    separator other than the one `/`, a part the hub would refuse, or whose owner part is a local folder
    (`runs/typo_ckpt` next to a `runs/`) is local.
    """
    text = str(path_or_hub_id)
    if isinstance(path_or_hub_id, Path):
        return "it is a Path"
    if text.startswith((".", "/", "~")):
        return f"it starts with {text[0]!r}"
    if "\\" in text or text.count("/") != 1:
        return "a hub id is owner/name"
    owner, name = text.split("/")
    if not (_HUB_PART.fullmatch(owner) and _HUB_PART.fullmatch(name)) or ".." in text or "--" in text:
        return "a hub id's parts are letters, digits, '-', '_' or '.'"
    if Path(owner).is_dir():
        return f"{owner}/ is a local folder"
    return None


def resolve_folder(path_or_hub_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; a hub id (`owner/name`, see `local_reason`) is downloaded; anything else that does
    not exist is a FileNotFoundError "not found: PATH"."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"not found: {path_or_hub_id} (a file, expected a checkpoint folder)")
    reason = local_reason(path_or_hub_id)
    if reason is not None:
        raise FileNotFoundError(
            f"not found: {path_or_hub_id} (no such checkpoint folder; not a hub id: {reason})"
        )
    from huggingface_hub import snapshot_download

    # Weights, configs and tokenizer files only (hub repos may also hold .bin/.pt duplicates).
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    return Path(snapshot_download(str(path_or_hub_id), revision=revision, allow_patterns=patterns))


def detect_layout(raw_config: dict[str, Any]) -> Layout:
    if raw_config.get("format") == "xvla":
        return "xvla"
    if raw_config.get("type") == "xvla" and "florence_config" in raw_config:
        return "lerobot"
    if "florence_config" in raw_config:
        return "authors"
    raise ValueError(
        "config.json: unknown checkpoint layout (expected our 'format': 'xvla', the authors' XVLA config with "
        "'florence_config', or LeRobot's with 'type': 'xvla')"
    )


def read_config(path: str | Path) -> XVLAConfig:
    """XVLAConfig from a config.json of any supported layout."""
    raw = read_json(Path(path))
    layout = detect_layout(raw)
    return XVLAConfig.from_dict(raw) if layout == "xvla" else config_from_layout(raw, layout)


def read_checkpoint(folder: Path) -> tuple[XVLAConfig, dict[str, Tensor], Layout]:
    """Config and state dict of a checkpoint folder, both converted to this package's layout."""
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder}: missing {CONFIG_NAME}")
    layout = detect_layout(read_json(cfg_path))
    config = read_config(cfg_path)
    state = read_weights(folder)
    if layout != "xvla":
        state = state_from_layout(state, layout, str(folder / WEIGHTS_NAME))
    return config, state, layout


def read_weights(folder: Path) -> dict[str, Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json. Read with safetensors directly:
    LeRobot's files lack the "format" metadata that transformers' loader insists on."""
    if (folder / WEIGHTS_NAME).is_file():
        return _load_safetensors(folder / WEIGHTS_NAME)
    index = folder / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"checkpoint {folder}: missing {WEIGHTS_NAME} (or {INDEX_NAME})")
    state: dict[str, Tensor] = {}
    try:
        shards = sorted(set(read_json(index)["weight_map"].values()))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index}: expected a 'weight_map' of tensor name -> shard file ({err!r})") from None
    for shard in shards:
        state.update(_load_safetensors(folder / shard))
    return state


def read_json(path: Path) -> Any:
    """A checkpoint JSON file; a corrupt one is a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: corrupt JSON ({err})") from None


def read_sources(folder: str | Path) -> dict[str, dict[str, Any]]:
    """A checkpoint's `sources.json` as {name: Source dict}, {} if absent. Ours maps names to Source dicts; a
    mixture (`{"sources": [...]}`) or a list of Source dicts is accepted too."""
    path = Path(folder) / SOURCES_NAME
    if not path.is_file():
        return {}
    data = read_json(path)
    items = data.get("sources") if isinstance(data, dict) else data
    if items is None:
        return {str(name): {**spec, "name": str(name)} for name, spec in data.items()}
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        raise ValueError(f"{path}: expected a name -> source map, a mixture or a list of sources with names")
    return {str(i["name"]): dict(i) for i in items}


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file; a truncated or corrupt one is a one-line error naming it (safetensors' own message
    does not)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {path} (a weight shard listed in {INDEX_NAME})") from None
    except SafetensorError as err:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def load_pretrained(
    path_or_hub_id: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    **config_overrides: Any,
) -> XVLA:
    """Build the model from a checkpoint folder or hub id (layout auto-detected); `config_overrides` replace
    XVLAConfig fields that are not architectural (e.g. `image_size`, `max_text_len`, masking options)."""
    folder = resolve_folder(path_or_hub_id, revision)
    config, state, _ = read_checkpoint(folder)
    if config_overrides:
        config = config.replace(**config_overrides)
    with torch.device("meta"):
        model = XVLA(config)
    load_state(model, state, source=str(folder / WEIGHTS_NAME))
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def load_state(model: XVLA, state: dict[str, Tensor], source: str) -> None:
    """Strict load (assigning tensors, so the model may live on the meta device); lists any mismatch and any
    tensor holding NaN or inf."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shape:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in shape
                )
            )
        raise ValueError(f"{source}: checkpoint does not match the model: " + "; ".join(parts))
    # One NaN weight makes every action NaN: refuse the file rather than serve or train from it.
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if nonfinite:
        raise ValueError(
            f"{source}: non-finite values (NaN or inf) in {len(nonfinite)} tensor(s): {nonfinite[:8]}"
            + (" ..." if len(nonfinite) > 8 else "")
            + " (a diverged or corrupted checkpoint)"
        )
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in the file: recompute them (they are still on the meta device).
    head = model.transformer
    head.time_freqs = time_frequencies(model.config.head.dim_time).to(head.pos_emb.device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{source}: tensors left unmaterialised after loading: {leftover}")
