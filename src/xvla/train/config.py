"""Training and adaptation configs: frozen dataclasses, JSON/YAML files and dotted `--override`s.

Every field has a default except what a run cannot guess (the data mixture). Loading is strict: an unknown
key is an error that names it and lists close matches, and a value of the wrong type names its field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from xvla.data.transforms import Augment

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class ModelInit:
    """Where the weights come from: a preset (fresh weights) or a checkpoint (fine-tuning)."""

    preset: str = "tiny"  # a name in xvla.config presets; ignored when `checkpoint` is set
    checkpoint: str | None = None  # folder or hub id readable by XVLA.from_pretrained
    # XVLAConfig fields to change in a preset, dotted for nested ones: {"image_size": 64, "head.depth": 2}
    overrides: dict[str, Any] = field(default_factory=dict)
    # Tokenizer folder or hub id for a preset, or "builtin" (a byte-level BPE trained offline by
    # xvla.model.tokenizer.build_tokenizer); None = BART's (facebook/bart-large) for a BART-sized vocabulary,
    # else builtin. A checkpoint brings its own.
    tokenizer: str | None = None
    activation_checkpointing: bool = False  # recompute transformer blocks in backward (memory for compute)
    compile: bool = False  # torch.compile each repeated layer as its own region (not with fsdp)


@dataclass(frozen=True)
class DataConfig:
    mixture: str | dict[str, Any] | None = None  # Mixture JSON/YAML file, or the mixture inline
    num_workers: int = 0
    seed: int = (
        0  # fixes the train/val episode split (sources' val_fraction/val_count) and the sampling order
    )
    # Decoded frames kept in RAM per process (GiB): each episode's video is decoded once; past the cap the rest
    # is streamed frame by frame. With workers the cache is filled before they fork and shared by them.
    frame_cache_gib: float = 1.0
    augment: Augment = field(default_factory=Augment)  # training-time image augmentation


@dataclass(frozen=True)
class GroupLR:
    """Learning-rate coefficient of each parameter group, relative to `OptimConfig.lr`."""

    vlm: float = 0.1
    transformer: float = 1.0
    soft_prompts: float = 0.1
    action_heads: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_scale: GroupLR = field(default_factory=GroupLR)
    warmup_steps: int = 2000  # linear warm-up from 0, then cosine decay
    min_lr_ratio: float = 0.1  # floor of the cosine decay, relative to each group's peak
    # Before this step only soft prompts and action heads train; the rest is frozen (no gradients at all).
    prompt_warmup_steps: int = 1000
    fused: bool | None = None  # fused AdamW; None = on CPU and CUDA (optim.FUSED_DEVICES)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (the final step is always saved)
    keep_last: int = 3  # older step checkpoints are deleted
    ema_decay: float | None = None  # keep an EMA of the weights (saved as the checkpoint's model) when set


@dataclass(frozen=True)
class ValConfig:
    every: int = 1000  # steps between validations, and at the final step (0 = never)
    batches: int = 4  # validation batches per source
    sample_steps: int | None = None  # sampler steps for the L1 of generated chunks (None = model default)


@dataclass(frozen=True)
class LogConfig:
    every: int = 10  # steps between scalar logs
    progress: bool = True  # progress bar on the main process
    tensorboard: bool = True
    wandb: bool = False  # used only when the package is installed
    wandb_project: str = "xvla"
    run_name: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/xvla"
    model: ModelInit = field(default_factory=ModelInit)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    val: ValConfig = field(default_factory=ValConfig)
    log: LogConfig = field(default_factory=LogConfig)
    steps: int = 10_000  # optimiser steps
    batch_size: int = 16  # per process, per micro-batch
    grad_accum: int = 1
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    cpu: bool = False  # force CPU even when a GPU is visible
    fsdp: bool = False  # shard weights/grads/optimiser state (FULL_SHARD) instead of DDP
    seed: int = 0

    def validate(self) -> None:
        """Cross-field checks that a schema cannot express."""
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "checkpoint.every": self.checkpoint.every >= 1,
            "checkpoint.keep_last": self.checkpoint.keep_last >= 1,
            "val.every": self.val.every >= 0,
            "optim.warmup_steps": self.optim.warmup_steps >= 0,
            "optim.prompt_warmup_steps": self.optim.prompt_warmup_steps >= 0,
            "optim.min_lr_ratio": 0.0 <= self.optim.min_lr_ratio <= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}: invalid value {_get(self, name)!r}")
        if self.fsdp and self.model.compile:
            raise ConfigError("model.compile: not supported together with fsdp")
        if self.checkpoint.ema_decay is not None and not 0.0 < self.checkpoint.ema_decay < 1.0:
            raise ConfigError(
                f"checkpoint.ema_decay: expected a value in (0, 1), got {self.checkpoint.ema_decay}"
            )


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"  # peft target_modules
    save: Literal["merged", "adapter"] = "merged"  # merged: a plain checkpoint; adapter: LoRA weights only


@dataclass(frozen=True)
class AdaptConfig:
    """Add a domain to a trained checkpoint and fit it to a new data source.

    Stage 1 trains only the new prompt and heads for `train.optim.prompt_warmup_steps` steps, stage 2 trains
    what `mode` says until `train.steps`. `train.model.checkpoint` is the trained checkpoint; the mixture's
    sources are the new data (each gets a new domain).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    init: str = "retrieval"  # "scratch", "retrieval", or the name of an existing domain to copy
    retrieval_batches: int = 4  # batches of new data per candidate domain when init = "retrieval"
    # Stage 2 trains everything ("full"), LoRA adapters + prompt + heads ("lora"), or prompt + heads ("prompt").
    mode: Literal["full", "lora", "prompt"] = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)


# ---------------------------------------------------------------------------------------------------------
# (de)serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build `cls` from a (nested) mapping; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        name = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(_unknown_key(name, key, list(fields)))
        kwargs[key] = _coerce(hints[key], value, name)
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read a JSON or YAML config file, apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return from_dict(cls, apply_overrides(cls, data, overrides))


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted `a.b=value` overrides set; unknown keys are errors."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        parts = key.strip().split(".")
        _check_path(cls, parts)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def _parse_value(raw: str) -> Any:
    """YAML scalars/lists, except that YAML 1.1 reads `3e-4` as a string: JSON numbers win."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return value
    return value


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def flatten(
    data: dict[str, Any], prefix: str = "", sep: str = ".", keep_types: bool = False
) -> dict[str, Any]:
    """Nested dicts -> {"a.b": value}; values other than scalars become strings unless `keep_types`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name, sep, keep_types))
        else:
            out[name] = value if keep_types or isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _check_path(cls: type, parts: list[str]) -> None:
    """Raise for a dotted key that names no field (free-form dict fields accept any sub-key)."""
    current: Any = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(current):
            return  # inside a free-form mapping
        fields = {f.name for f in dataclasses.fields(current)}
        if part not in fields:
            raise ConfigError(_unknown_key(".".join(parts[: i + 1]), part, sorted(fields)))
        hint = typing.get_type_hints(current)[part]
        current = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), hint)


def _unknown_key(name: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {name!r}{hint} (valid keys here: {', '.join(sorted(known))})"


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path=name)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} matches none of {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
        return value
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
