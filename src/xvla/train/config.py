"""Training and adaptation configs: frozen dataclasses, read and written by `xvla.configio`.

Every field has a default except what a run cannot guess (the data mixture).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from xvla.configio import ConfigError, get_dotted
from xvla.data.transforms import Augment
from xvla.train.modes import AdaptMode


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
    # auto = bf16 on GPU and on a CPU with bf16 instructions (devices.cpu_has_bf16), else fp32
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
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
                raise ConfigError(f"{name}: invalid value {get_dotted(self, name)!r}")
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
    mode: AdaptMode = "lora"  # what stage 2 trains (xvla.train.modes)
    lora: LoraSettings = field(default_factory=LoraSettings)
