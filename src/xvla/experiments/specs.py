"""Named experiments (`EXPERIMENTS`): each a grid of arms x seeds over the demo's suite, at a demo scale.

An `Arm` is one way of training: a pre-training run ("pretrain"), an adaptation of another arm's pre-trained
checkpoint to the held-out robot ("adapt"), or a model trained on the held-out robot alone ("scratch"). Its
`overrides` are `DemoConfig` fields (`field=value`, typed by `xvla.configio`) on top of the scale and the
experiment's own overrides, so every arm of an experiment gets the same steps x batch unless it says otherwise.
A cell is one arm at one seed; `xvla.experiments.runner` runs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, get_args

from xvla.demo.config import DemoConfig

CellKind = Literal["pretrain", "adapt", "scratch"]
CELL_KINDS: tuple[str, ...] = get_args(CellKind)
Analysis = Literal["prompts", "proxy"]
ANALYSES: tuple[str, ...] = get_args(Analysis)


@dataclass(frozen=True)
class Arm:
    name: str  # a folder name: letters, digits, "_" and "-"
    kind: CellKind = "pretrain"
    overrides: tuple[str, ...] = ()  # DemoConfig "field=value" overrides
    # adapt: the pre-training arm it starts from, "experiment/arm" or an arm of the same experiment; its
    # DemoConfig (model, data options) is inherited, this arm's overrides go on top
    base: str | None = None
    # adapt, scratch: demonstrations of the held-out robot to train on (validation episodes come on top);
    # None = the scale's heldout_episodes (which include the validation episodes)
    demonstrations: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"Arm.name: expected letters, digits, '_' or '-', got {self.name!r}")
        if self.kind not in CELL_KINDS:
            raise ValueError(f"arm {self.name!r}: kind: expected one of {CELL_KINDS}, got {self.kind!r}")
        if (self.kind == "adapt") != (self.base is not None):
            raise ValueError(f"arm {self.name!r}: base: required for (and only for) kind 'adapt'")
        if self.demonstrations is not None and (self.kind == "pretrain" or self.demonstrations < 1):
            raise ValueError(
                f"arm {self.name!r}: demonstrations: expected an integer >= 1 on an adapt or scratch arm, "
                f"got {self.demonstrations!r}"
            )


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    description: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    scale: str = "default"  # a DemoConfig scale (xvla.demo.SCALES); `--scale` replaces it
    overrides: tuple[str, ...] = ()  # DemoConfig overrides for every arm
    includes: tuple[str, ...] = ()  # other experiments whose cells this one runs and summarises too
    analyses: tuple[Analysis, ...] = ()  # summary sections beyond the success table
    # adapt and scratch cells: evenly spaced checkpoints (the last at adapt_steps) evaluated for learning curves
    adapt_curve_points: int = 3

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: arms: names must be unique, got {names}")
        if not self.seeds:
            raise ValueError(f"experiment {self.name!r}: seeds: expected at least one")
        unknown = sorted(set(self.analyses) - set(ANALYSES))
        if unknown:
            raise ValueError(f"experiment {self.name!r}: analyses: unknown {unknown}; expected {ANALYSES}")
        if self.adapt_curve_points < 1:
            raise ValueError(f"experiment {self.name!r}: adapt_curve_points: expected >= 1")

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ValueError(
            f"experiment {self.name!r} has no arm {name!r}; its arms: {[a.name for a in self.arms]}"
        )


# The pre-training arms of the paper's ablation (X-VLA, Table 5 / Fig. 4 in miniature).
_NO_PROMPTS = "model_overrides.head.len_soft_prompts=0"
PRETRAINING_ARMS = (
    Arm(
        "shared_heads",
        overrides=("pretrain_domains=shared", _NO_PROMPTS),
        description="(a) one action in/out layer for every source, no soft prompts",
    ),
    Arm(
        "domain_heads", overrides=(_NO_PROMPTS,), description="(b) per-domain in/out layers, no soft prompts"
    ),
    Arm("xvla", description="(c) per-domain layers + soft prompts (X-VLA)"),
    Arm(
        "next_frames",
        overrides=("targets=next_frames",),
        description="(d) X-VLA without intention abstraction: the next 30 frames as targets",
    ),
    Arm(
        "frame_sampling",
        overrides=("sampling=frames",),
        description="(e) X-VLA with sources drawn in proportion to their frames instead of balanced",
    ),
)

NEAREST = "rs_panda"  # the pre-training robot nearest Kinova3: another 7-DoF arm in the same robosuite scenes


def _adaptation_arms(demonstrations: tuple[int, ...]) -> tuple[Arm, ...]:
    """One factor at a time around the paper's recipe (X-VLA checkpoint, two-step, full, retrieval)."""
    xvla = "pretraining/xvla"
    arms = []
    for n in demonstrations:
        variants = (
            ("two_step", xvla, (), "prompt warm-up, then full fine-tuning (the recipe)"),
            ("direct", xvla, ("adapt_prompt_steps=0",), "full fine-tuning from the first step"),
            ("prompt_only", xvla, ("adapt_mode=soft_prompts",), "trainable: the new soft prompt only"),
            ("prompt_heads", xvla, ("adapt_mode=prompt",), "trainable: prompt + action heads"),
            ("prompt_heads_lora", xvla, ("adapt_mode=lora",), "trainable: prompt + heads + LoRA"),
            ("prompt_heads_last", xvla, ("adapt_mode=last_layer",), "trainable: prompt + heads + last block"),
            ("init_random", xvla, ("adapt_init=scratch",), "new prompt and heads at random"),
            ("init_nearest", xvla, (f"adapt_init={NEAREST}",), f"new prompt and heads copied from {NEAREST}"),
            ("from_shared_heads", "pretraining/shared_heads", (), "the recipe from arm (a)'s checkpoint"),
            ("from_domain_heads", "pretraining/domain_heads", (), "the recipe from arm (b)'s checkpoint"),
        )
        arms += [Arm(f"{name}-n{n}", "adapt", o, base, n, f"{d}; {n} demos") for name, base, o, d in variants]
        arms.append(Arm(f"scratch-n{n}", "scratch", (), None, n, f"a fresh model on the {n} demos alone"))
    return tuple(arms)


# The default pre-training sources plus the Panda through a second camera (`rs_panda_side`, IIWA's side view):
# one robot, two views, two domains, so the `prompts` experiment can tell grouping by robot from grouping by view.
# rs_panda_side has domain 6, so this arm's models also hold Kinova3's domain 5, untrained (`domain_5`).
TWO_VIEWS_SOURCES = (*DemoConfig().pretrain_sources, "rs_panda_side:Lift")
TWO_VIEWS = Arm(
    "xvla_two_views",
    overrides=(f"pretrain_sources={json.dumps(list(TWO_VIEWS_SOURCES))}",),
    description="X-VLA (c) with the Panda recorded twice: its agentview (rs_panda) and a side view (rs_panda_side)",
)


def _experiments() -> dict[str, ExperimentSpec]:
    specs = (
        ExperimentSpec(
            "pretraining",
            "ablation of the pre-training design: shared vs per-domain heads, soft prompts, intention "
            "abstraction, balanced sampling; per source: flow loss, L1 of sampled chunks, closed-loop success",
            PRETRAINING_ARMS,
        ),
        ExperimentSpec(
            "adaptation",
            "adapting pre-trained checkpoints to Kinova3 with 5 and 20 demonstrations: direct vs two-step, "
            "trainable sets, prompt initialisation, a from-scratch model; success vs adaptation steps",
            _adaptation_arms((5, 20)),
            includes=("pretraining",),
        ),
        ExperimentSpec(
            "prompts",
            "2-D projections (PCA, t-SNE) of the learned soft prompts of every pre-training and adapted cell, "
            "and X-VLA pre-trained with one robot seen through two cameras: do prompts group by robot or by view?",
            (TWO_VIEWS,),
            includes=("pretraining", "adaptation"),
            analyses=("prompts",),
        ),
        ExperimentSpec(
            "proxy",
            "validation error vs closed-loop success over every evaluated checkpoint (Spearman rank "
            "correlation with a bootstrap interval): does the paper's proxy hold here?",
            (),
            includes=("pretraining", "adaptation"),
            analyses=("proxy",),
        ),
        # Every code path in about a minute on 2 cores (tests use it): two pre-training arms (the second with
        # every data and model option that differs from X-VLA), an adaptation, a scratch model, both analyses.
        ExperimentSpec(
            "smoke",
            "every code path at the smoke scale: not a result",
            (
                Arm("xvla", description="X-VLA"),
                Arm(
                    "ablated",
                    overrides=(
                        "pretrain_domains=shared",
                        _NO_PROMPTS,
                        "targets=next_frames",
                        "sampling=frames",
                    ),
                    description="shared heads, no prompts, next-frame targets, frame sampling",
                ),
                Arm("two_step", "adapt", base="xvla", demonstrations=1, description="the recipe"),
                Arm("scratch", "scratch", demonstrations=1, description="Kinova3 alone"),
            ),
            seeds=(0,),
            scale="smoke",
            analyses=("prompts", "proxy"),
            adapt_curve_points=2,
        ),
    )
    return {s.name: s for s in specs}


EXPERIMENTS: dict[str, ExperimentSpec] = _experiments()


def get_experiment(name: str) -> ExperimentSpec:
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: unknown {name!r}; expected one of {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]
