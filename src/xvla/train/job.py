"""What a run trains (`Job`), and how `xvla train` builds one from a config: a preset or checkpoint model, its
tokenizer, the data mixture and the sources the model serves. `xvla.train.adapt` builds its own `Job` (a grown
checkpoint, maybe LoRA-wrapped) from the same parts; `xvla.train.trainer.run` trains either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from xvla import configio
from xvla.config import XVLAConfig, get_preset
from xvla.configio import ConfigError
from xvla.data.sources import Mixture
from xvla.model.checkpoint import read_sources
from xvla.model.tokenizer import build_tokenizer, check_fits, load_tokenizer
from xvla.model.xvla import XVLA
from xvla.train.config import TrainConfig
from xvla.train.optim import ALL_GROUPS, PROMPT_PHASE_GROUPS, check_groups

BART_VOCAB = 50265  # facebook/bart-large's tokenizer size (Florence-2 adds tokens on top)
BUILTIN_VOCAB = 4096  # upper bound for the offline BPE (its small built-in corpus yields far fewer merges)


@dataclass
class Job:
    """What `run` trains. `train` makes one from a preset or checkpoint; `adapt` from a grown checkpoint."""

    model: nn.Module  # the module optimised: an XVLA, or a peft model around one
    xvla: XVLA  # the XVLA inside `model` (config, action space, generate)
    groups: dict[str, list[nn.Parameter]]  # optimiser groups, disjoint, covering every trainable parameter
    tokenizer: Any
    mixture: Mixture  # the training data
    sources: dict[str, dict[str, Any]]  # every source the model serves (written as sources.json)
    prompt_groups: tuple[str, ...] = PROMPT_PHASE_GROUPS  # trainable during optim.prompt_warmup_steps
    main_groups: tuple[str, ...] = ALL_GROUPS  # trainable afterwards
    # Writes the servable model from a full state dict of `model` into a folder (None: XVLA.save_pretrained).
    export: Callable[[dict[str, Tensor], Path], None] | None = None
    adaptation: dict[str, Any] | None = None  # what `adapt` did (written to <output_dir>/adaptation.json)


def load_mixture(cfg: TrainConfig) -> Mixture:
    """The training mixture: the file `cfg.data.mixture` names, or the mixture it holds inline."""
    spec = cfg.data.mixture
    if spec is None:
        raise ConfigError("data.mixture: required (a mixture JSON/YAML file, or the mixture inline)")
    return Mixture.from_dict(spec) if isinstance(spec, dict) else Mixture.load(spec)


def build_job(cfg: TrainConfig) -> Job:
    """Model from `cfg.model` (checkpoint, else preset + overrides), its tokenizer, and the mixture."""
    mixture = load_mixture(cfg)
    sources: dict[str, dict[str, Any]] = {}
    if cfg.model.checkpoint is not None:
        if cfg.model.overrides:
            raise ConfigError("model.overrides: only for presets; a checkpoint fixes the architecture")
        model = XVLA.from_pretrained(cfg.model.checkpoint).train()
        tokenizer = load_tokenizer(cfg.model.checkpoint)
        sources = read_sources(Path(cfg.model.checkpoint))
    else:
        model = XVLA(preset_config(cfg.model.preset, cfg.model.overrides)).train()
        tokenizer = preset_tokenizer(cfg.model.tokenizer, model.config)
    check_fits(tokenizer, model.config.text.vocab_size)
    check_mixture(mixture, model)
    sources = merge_sources(sources, mixture)
    groups = model.parameter_groups()
    check_groups(model, groups)
    return Job(model=model, xvla=model, groups=groups, tokenizer=tokenizer, mixture=mixture, sources=sources)


def preset_config(name: str, overrides: dict[str, Any]) -> XVLAConfig:
    """A preset with field overrides, dotted or nested ({"image_size": 64, "head.num_domains": 4})."""
    try:
        return configio.replace(get_preset(name), overrides)
    except ConfigError as err:
        raise ConfigError(f"model.overrides: {err}") from None


def preset_tokenizer(name: str | None, config: XVLAConfig) -> Any:
    """`name` (folder or hub id); "builtin" = a byte-level BPE trained offline; None = BART's tokenizer for a
    BART-sized vocabulary, else the builtin one."""
    if name == "builtin" or (name is None and config.text.vocab_size < BART_VOCAB):
        return build_tokenizer(vocab_size=min(config.text.vocab_size, BUILTIN_VOCAB))
    return load_tokenizer(name or "facebook/bart-large")


def check_mixture(mixture: Mixture, model: XVLA) -> None:
    """Every source must provide the model's action layout, use one of its domains and fit its views."""
    space = model.action_space
    for s in mixture.sources:
        if s.action_space != space.layout:
            raise ValueError(
                f"mixture source {s.name!r}: action space {s.action_space!r} conflicts with the model's "
                f"{space.name!r} (layout {space.layout!r})"
            )
        if s.canonical_dim != space.input_dim:
            raise ValueError(
                f"mixture source {s.name!r}: canonical dim {s.canonical_dim} != the model's action dim "
                f"{space.input_dim}"
            )
        if not 0 <= s.domain_id < model.num_domains:
            raise ValueError(
                f"mixture source {s.name!r}: domain_id {s.domain_id} is outside the model's {model.num_domains} "
                "domains (use `xvla adapt` to add a domain, or model.overrides head.num_domains for a preset)"
            )
        s.check_views(model.config.num_views, model.config.mask_missing_views)


def merge_sources(known: dict[str, dict[str, Any]], mixture: Mixture) -> dict[str, dict[str, Any]]:
    """`known` sources plus the mixture's; a mixture source replaces any known one with its name or domain."""
    names = {s.name for s in mixture.sources}
    ids = {s.domain_id for s in mixture.sources}
    kept = {n: d for n, d in known.items() if n not in names and d.get("domain_id") not in ids}
    return {**kept, **{s.name: s.to_dict() for s in mixture.sources}}
