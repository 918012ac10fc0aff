"""`DemoConfig`: the size of every stage of `xvla demo`, and the named scales (`SCALES`).

Each scale is a frozen `DemoConfig`; `demo_config(scale, ["field=value", ...])` applies command-line overrides
through `xvla.configio` (typed, strict, dotted into `model_overrides` and `augment`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from xvla import configio
from xvla.train.modes import ADAPT_INITS, ADAPT_MODES, AdaptMode

STAGES = ("generate", "oracle", "pretrain", "adapt", "evaluate", "report")
PretrainDomains = Literal["per_source", "shared"]
TargetMode = Literal["anchors", "next_frames"]
SamplingMode = Literal["balanced", "frames"]
DEFAULT_OUT = "demo_out"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every stage. The `default` scale fits 25 minutes on 2 CPU cores (see docs/demo.md)."""

    scale: str = "default"
    seed: int = 0
    # -- data: sources as "name[:task,task]" (xvla.sim.suite.parse_selection)
    pretrain_sources: tuple[str, ...] = (
        "mw_sawyer:button-press-topdown,drawer-open",
        "rs_panda:Lift",
        "rs_ur5e:Lift",
        "rs_iiwa:Lift",
        "so100_bimanual",
    )
    heldout_source: str = "rs_kinova3:Lift"
    # 40 episodes measured against 20 (docs/demo.md, items 16 and 18): alone 68/120 vs 52/120 on the pre-training
    # tasks, but with `proprio_gripper` 60/120 vs 66/120 and Kinova3 21/40 vs 31/40, for twice the generation time.
    episodes: int = 20  # successful expert episodes per pre-training source
    # Episodes of particular pre-training sources (name -> count; the rest get `episodes`).
    source_episodes: dict[str, int] = field(default_factory=dict)
    heldout_episodes: int = 20  # demonstrations of the held-out robot for adaptation
    val_episodes: int = 2  # per source, kept out of training for the validation error
    # Sampling weight per pre-training source name (the rest 1.0): the mixture draws a source by normalised
    # weight, then an episode uniformly (balanced over sources and trajectories, as in the paper).
    source_weights: dict[str, float] = field(default_factory=dict)
    # "frames": each source's weight is also multiplied by its number of frames (about uniform over frames, so
    # sources recorded at a high rate dominate); "balanced": the weights alone.
    sampling: SamplingMode = "balanced"
    # "per_source": one domain (prompt and action heads) per pre-training source, as X-VLA; "shared": every
    # pre-training source on domain 0 (one shared action in/out layer)
    pretrain_domains: PretrainDomains = "per_source"
    # "anchors": the 30 targets spread over each source's horizon (intention abstraction); "next_frames": the
    # next 30 frames at the source's control rate (horizon 30 / control_hz)
    targets: TargetMode = "anchors"
    image_size: int = 64  # rendered, stored and model image side (px)
    # -- model: an xvla.config preset plus XVLAConfig field overrides (dotted)
    preset: str = "demo"
    # The proprio's gripper channel reaches the network (docs/demo.md, item 17): with it hidden, as released, the
    # policy re-opened the gripper at every query once at the cube. A keypoint token per view (item 27): UR5e
    # 48/60 against 34/60 over three seeds, all pre-training tasks 247/360 against 219/360.
    model_overrides: dict[str, Any] = field(
        default_factory=lambda: {"num_views": 2, "proprio_gripper": True, "vision.keypoints": 16}
    )
    # training-time image augmentation (`xvla.data.transforms.Augment` fields)
    augment: dict[str, Any] = field(default_factory=lambda: {"color_jitter": True, "shift_px": 0})
    # -- pre-training
    # 3600 measured against 2400 (docs/demo.md, item 41; bf16 on a CPU with bf16 instructions, item 40): 269/360
    # against 252/360 on the pre-training tasks over three seeds, every robosuite arm and Sawyer >= 60% on every
    # seed; 22:18 from nothing on the AMD EPYC (AVX512-BF16). 2400 against 1200: item 21.
    pretrain_steps: int = 3600
    batch_size: int = 32
    # 1e-3 measured against 5e-4 in closed loop (docs/demo.md): the default run reached 54/120 vs 42/120 on the
    # pre-training tasks (Panda 13/20 vs 0/20); at 5e-4 the loss was still falling at the last step.
    lr: float = 1e-3
    warmup_steps: int = 50
    # TrainConfig.precision of every training run ("auto": bf16 autocast on GPU and on a CPU with bf16
    # instructions, else fp32). On such a CPU bf16 pre-trains 1.2-1.3x faster; with the action's input and output
    # layers kept in fp32 it matches fp32 in closed loop (docs/demo.md, item 40; without that, item 36).
    precision: Literal["auto", "no", "bf16"] = "auto"
    ema_decay: float | None = None  # serve an exponential moving average of the weights (None: the raw ones)
    # The authors train the VLM and prompts at 0.1x because their VLM is pre-trained and their run is 200k
    # steps; this model starts from random weights and trains for minutes, so everything trains at 1x.
    vlm_lr_scale: float = 1.0
    prompt_lr_scale: float = 1.0
    val_batches: int = 2  # validation batches per source (of `batch_size` samples)
    log_every: int = 10
    # -- adaptation (two stages; `adapt_steps` counts both)
    adapt_prompt_steps: int = 100  # stage 1: only the new prompt and heads train
    # 600 measured against 400 (docs/demo.md, item 21): Kinova3 adapted 25/40 against 32/40 from the same checkpoint.
    adapt_steps: int = 400
    # 1e-3 measured against 3e-4 in closed loop (docs/demo.md, item 8): Kinova3 adapted 16/40 vs 4/40 from the
    # same pre-trained checkpoint; 300 steps of fine-tuning at 3e-4 barely move the retrieved domain's prompt.
    adapt_lr: float = 1e-3
    adapt_mode: AdaptMode = "full"  # what stage 2 trains (xvla.train.modes)
    # "retrieval", the name of a pre-training source, or "scratch" (a random prompt and heads; then the evaluation
    # has no pre-adaptation condition)
    adapt_init: str = "retrieval"
    scratch_baseline: bool = True  # also train a fresh model on the held-out data only (adapt_steps steps)
    # -- evaluation (episodes per task)
    eval_episodes: int = 40  # held-out robot after adaptation (and the scratch baseline)
    pre_adaptation_episodes: int = 10  # held-out robot, pre-trained model before adaptation
    untrained_episodes: int = 5  # held-out robot, random weights
    pretrain_eval_episodes: int = 20  # each pre-training task, pre-trained model
    # Learning curves: this many evenly spaced intermediate pre-training checkpoints (besides the final one) are
    # evaluated on every pre-training task with `curve_episodes` episodes on the first evaluation seeds.
    curve_points: int = 1
    curve_episodes: int = 5
    oracle_episodes: int = 2  # per source
    videos: int = 2  # MP4s of the adapted policy on the held-out robot
    # Seconds of each 1 s chunk executed before the policy is queried again. 0.4 measured best (docs/demo.md,
    # "What limits success", item 12): 46/120 pre-training successes at 0.2, 66/120 at 0.4 and 0.6.
    replan_s: float = 0.4
    sample_steps: int = 10  # denoising steps per query
    noise_scale: float = 1.0  # sampling temperature of the evaluated policies (`PolicyConfig.noise_scale`)
    # Closed-probability from which the evaluated policies close a binary gripper (the robosuite arms;
    # `GripperConvention.close_at`, set on the served Source). 0.1 measured against 0.5 and 0.25 (docs/demo.md,
    # item 30): Kinova3 adapted 84/120 against 70/120 and 80/120 on the same checkpoints; the policy hovered at
    # the cube, never sure enough to close.
    gripper_close_at: float = 0.1
    # -- the wall-time promise of this scale (None: none); the report says whether the run kept it
    target_s: float | None = 25 * 60
    # -- expected seconds per stage on the reference machine (2 CPU cores); the report compares
    budget_s: dict[str, float] = field(
        default_factory=lambda: {
            # the default scale's stages on 2 cores (AMD EPYC with AVX512-BF16, 8 December 2026, eighth session:
            # the three seeds of docs/demo.md, Measured; generation from nothing as measured there on 7 December)
            "generate": 285.0,
            "oracle": 10.0,
            "pretrain": 730.0,
            "adapt": 170.0,
            "evaluate": 180.0,
            "report": 5.0,
        }
    )

    def __post_init__(self) -> None:
        for name in (
            "pretrain_sources",
            "model_overrides",
            "augment",
            "source_weights",
            "source_episodes",
            "budget_s",
        ):
            value = getattr(self, name)
            if name == "pretrain_sources" and isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            elif name != "pretrain_sources" and not isinstance(value, Mapping):
                raise ValueError(f"DemoConfig.{name}: expected a mapping, got {value!r}")
        positive = (
            "episodes",
            "heldout_episodes",
            "image_size",
            "pretrain_steps",
            "batch_size",
            "adapt_steps",
            "eval_episodes",
            "sample_steps",
            "val_batches",
            "log_every",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        for name in (
            "val_episodes",
            "pre_adaptation_episodes",
            "untrained_episodes",
            "pretrain_eval_episodes",
            "curve_points",
            "curve_episodes",
            "oracle_episodes",
            "videos",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"DemoConfig.{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        if not self.pretrain_sources:
            raise ValueError("DemoConfig.pretrain_sources: expected at least one source")
        names = {item.partition(":")[0] for item in self.pretrain_sources}
        for name, weight in self.source_weights.items():
            if name not in names:
                raise ValueError(
                    f"DemoConfig.source_weights: {name!r} is not a pre-training source (expected one of {sorted(names)})"
                )
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"DemoConfig.source_weights[{name!r}]: expected a finite number > 0, got {weight!r}"
                )
        for name, count in self.source_episodes.items():
            if name not in names:
                raise ValueError(
                    f"DemoConfig.source_episodes: {name!r} is not a pre-training source (expected one of {sorted(names)})"
                )
            if not (isinstance(count, int) and count > self.val_episodes):
                raise ValueError(
                    f"DemoConfig.source_episodes[{name!r}]: expected an integer > val_episodes "
                    f"({self.val_episodes}), got {count!r}"
                )
        for name, total in (("episodes", self.episodes), ("heldout_episodes", self.heldout_episodes)):
            if not self.val_episodes < total:
                raise ValueError(
                    f"DemoConfig.val_episodes ({self.val_episodes}) must be smaller than {name} ({total}): "
                    "training needs episodes left"
                )
        if not 0 <= self.adapt_prompt_steps < self.adapt_steps:
            raise ValueError(
                f"DemoConfig.adapt_prompt_steps: expected 0 <= value < adapt_steps ({self.adapt_steps}), "
                f"got {self.adapt_prompt_steps}"
            )
        for name, choices in (
            ("adapt_mode", ADAPT_MODES),
            ("sampling", get_args(SamplingMode)),
            ("pretrain_domains", get_args(PretrainDomains)),
            ("targets", get_args(TargetMode)),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"DemoConfig.{name}: expected one of {choices}, got {getattr(self, name)!r}")
        if self.adapt_init not in (*ADAPT_INITS, *names):
            raise ValueError(
                f"DemoConfig.adapt_init: expected one of {ADAPT_INITS} or a pre-training source name "
                f"{sorted(names)}, got {self.adapt_init!r}"
            )
        if self.curve_points >= self.pretrain_steps:
            raise ValueError(
                f"DemoConfig.curve_points: expected fewer than pretrain_steps ({self.pretrain_steps}), "
                f"got {self.curve_points}"
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(
                f"DemoConfig.ema_decay: expected None or a value in (0, 1), got {self.ema_decay}"
            )
        if not 0.0 <= self.noise_scale <= 1.0:
            raise ValueError(f"DemoConfig.noise_scale: expected a value in [0, 1], got {self.noise_scale}")
        if not 0.0 < self.gripper_close_at < 1.0:
            raise ValueError(
                f"DemoConfig.gripper_close_at: expected a value strictly between 0 and 1, got {self.gripper_close_at}"
            )
        if self.replan_s <= 0 or self.lr <= 0 or self.adapt_lr <= 0:
            raise ValueError("DemoConfig.replan_s, lr and adapt_lr: expected values > 0")
        unknown = sorted(set(self.budget_s) - set(STAGES))
        if unknown:
            raise ValueError(
                f"DemoConfig.budget_s: unknown stage(s) {unknown}; expected a subset of {STAGES}"
            )

    def replace(self, **changes: Any) -> DemoConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return configio.to_dict(self)

    @property
    def heldout_name(self) -> str:
        return self.heldout_source.partition(":")[0]

    @property
    def pretrain_names(self) -> tuple[str, ...]:
        return tuple(s.partition(":")[0] for s in self.pretrain_sources)


def _scales() -> dict[str, DemoConfig]:
    default = DemoConfig()
    gpu_model = {
        "num_views": 2,
        "proprio_gripper": True,
        "head.hidden_size": 256,
        "head.depth": 6,
        "head.num_heads": 8,
    }
    return {
        # Seconds on 2 cores: a check that every stage runs and writes its outputs, not a result.
        "smoke": default.replace(
            scale="smoke",
            pretrain_sources=("mw_sawyer:button-press-topdown", "rs_panda:Lift"),
            episodes=2,
            heldout_episodes=2,
            val_episodes=1,
            image_size=32,
            model_overrides={
                "num_views": 2,
                "proprio_gripper": True,
                "vision.keypoints": 16,
                "head.depth": 1,
                "text.encoder_layers": 1,
            },
            pretrain_steps=4,
            batch_size=4,
            warmup_steps=1,
            val_batches=1,
            log_every=2,
            adapt_prompt_steps=2,
            adapt_steps=4,
            eval_episodes=1,
            pre_adaptation_episodes=1,
            untrained_episodes=1,
            pretrain_eval_episodes=1,
            curve_points=1,
            curve_episodes=1,
            oracle_episodes=1,
            videos=1,
            replan_s=1.0,
            sample_steps=2,
            target_s=None,
            budget_s={"generate": 20, "oracle": 5, "pretrain": 5, "adapt": 5, "evaluate": 10, "report": 5},
        ),
        "default": default,
        # Up to 2 hours on 2 CPU cores: twice the demonstrations, four times the pre-training. Measured 49:04 from
        # nothing on the 2-core Xeon of 6 December (docs/demo.md, Measured); the budget is that run's stages.
        "cpu-long": default.replace(
            scale="cpu-long",
            target_s=2 * 3600,
            episodes=40,
            # twice the SO-100 scenes and twice the steps of the first definition (docs/demo.md, Measured, 7
            # December): 159/180 and 148/180 on the pre-training tasks over two seeds (SO-100 42/60), in about
            # 65 minutes from nothing; the 4800-step, 40-episode scale used 49 minutes
            source_episodes={"so100_bimanual": 80},
            heldout_episodes=40,
            val_episodes=3,
            pretrain_steps=9600,
            curve_points=3,
            curve_episodes=10,
            adapt_prompt_steps=200,
            adapt_steps=2000,
            eval_episodes=50,
            pre_adaptation_episodes=20,
            untrained_episodes=10,
            pretrain_eval_episodes=30,
            oracle_episodes=4,
            # the Xeon's stages (7 December, third session: pre-training with its three learning-curve
            # evaluations 35:13 with ~15% of the machine taken by other jobs, adaptation and scratch 13:48,
            # evaluation 6:05; generation of the 80 SO-100 and 40 x 5 other episodes about 9 minutes)
            budget_s={
                "generate": 540,
                "oracle": 20,
                "pretrain": 2100,
                "adapt": 830,
                "evaluate": 365,
                "report": 5,
            },
        ),
        # GPU scales: bigger data, model, images and evaluations; simulation stays on the CPU.
        "small": default.replace(
            scale="small",
            target_s=None,
            episodes=60,
            heldout_episodes=40,
            val_episodes=4,
            model_overrides=gpu_model,
            pretrain_steps=4000,
            batch_size=64,
            adapt_prompt_steps=300,
            adapt_steps=1500,
            scratch_baseline=True,
            eval_episodes=50,
            untrained_episodes=20,
            pretrain_eval_episodes=20,
            oracle_episodes=6,
            budget_s={
                "generate": 600,
                "oracle": 120,
                "pretrain": 900,
                "adapt": 400,
                "evaluate": 900,
                "report": 20,
            },
        ),
        "medium": default.replace(
            scale="medium",
            target_s=None,
            pretrain_sources=(
                "mw_sawyer:button-press-topdown,drawer-open,pick-place,push",
                "rs_panda",
                "rs_ur5e",
                "rs_iiwa",
                "so100_bimanual",
            ),
            heldout_source="rs_kinova3",
            episodes=150,
            heldout_episodes=50,
            val_episodes=6,
            image_size=96,
            model_overrides={**gpu_model, "head.hidden_size": 384, "head.depth": 8},
            pretrain_steps=15000,
            batch_size=128,
            lr=2e-4,
            adapt_lr=3e-4,  # below the 1e-3 measured for the default scale's model; not measured here
            warmup_steps=500,
            adapt_prompt_steps=500,
            adapt_steps=3000,
            scratch_baseline=True,
            eval_episodes=50,
            untrained_episodes=20,
            pretrain_eval_episodes=30,
            oracle_episodes=10,
            budget_s={
                "generate": 1500,
                "oracle": 240,
                "pretrain": 3600,
                "adapt": 900,
                "evaluate": 2400,
                "report": 30,
            },
        ),
        "large": default.replace(
            scale="large",
            target_s=None,
            pretrain_sources=("mw_sawyer", "rs_panda", "rs_ur5e", "rs_iiwa", "so100_bimanual"),
            heldout_source="rs_kinova3",
            episodes=400,
            heldout_episodes=100,
            val_episodes=10,
            image_size=128,
            model_overrides={**gpu_model, "head.hidden_size": 512, "head.depth": 12},
            pretrain_steps=50000,
            batch_size=256,
            lr=2e-4,
            adapt_lr=3e-4,  # below the 1e-3 measured for the default scale's model; not measured here
            warmup_steps=1000,
            adapt_prompt_steps=1000,
            adapt_steps=8000,
            scratch_baseline=True,
            eval_episodes=100,
            untrained_episodes=20,
            pretrain_eval_episodes=50,
            oracle_episodes=10,
            budget_s={
                "generate": 4000,
                "oracle": 400,
                "pretrain": 14400,
                "adapt": 2400,
                "evaluate": 6000,
                "report": 30,
            },
        ),
    }


SCALES: dict[str, DemoConfig] = _scales()


def demo_config(scale: str = "default", overrides: Sequence[str] = ()) -> DemoConfig:
    """A scale preset with `field=value` overrides (`episodes=5`, `adapt_mode=lora`, `model_overrides.head.depth=2`;
    values parsed as YAML, typed by `xvla.configio`)."""
    if scale not in SCALES:
        raise ValueError(f"scale: unknown {scale!r}; expected one of {sorted(SCALES)}")
    return configio.replace(SCALES[scale], configio.parse_overrides(overrides, example="episodes=5"))
