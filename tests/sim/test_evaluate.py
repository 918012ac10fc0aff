"""Evaluation plumbing, replays of recorded actions, and the oracle check of the policy action path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("mujoco")

from xvla.data.episodes import open_dataset
from xvla.data.sources import Mixture
from xvla.sim.evaluate import (
    eval_seed,
    evaluate,
    merge_evaluations,
    oracle_check,
    replay_actions,
    wilson_interval,
)
from xvla.sim.generate import read_manifest
from xvla.sim.suite import SUITE, entry


def test_wilson_interval() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(50, 50)
    assert low == pytest.approx(0.9287, abs=1e-4) and high == 1.0


@pytest.mark.parametrize("name", list(SUITE))
def test_replaying_recorded_actions_succeeds(suite: Path, name: str) -> None:
    """Determinism per seed: the recorded native actions, replayed open loop, solve the task again."""
    source = Mixture.load(suite)[name]
    ds = open_dataset(source.path)
    episode = read_manifest(source.path)["episodes"][0]
    env = entry(name).factory(32)
    try:
        assert replay_actions(env, episode["task"], episode["seed"], ds.read_lowdim(0, "action"))
    finally:
        env.close()


class _ExpertPolicy:
    """Answers each request with one expert action (privileged), in the Policy reply format."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.requests: list[Mapping[str, Any]] = []

    def reset(self) -> None:
        pass

    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        self.requests.append(obs)
        return {"actions": self.env.expert(self.env.observe(render=False))[None]}


def test_evaluate_plumbing(tmp_path: Path) -> None:
    env = entry("rs_panda").factory(32)
    policy = _ExpertPolicy(env)
    result = evaluate(
        lambda: policy,
        "rs_panda",
        2,
        tasks=["Lift"],
        image_size=32,
        replan_s=0.05,
        video_dir=tmp_path,
        videos=1,
        progress=False,
        env=env,
    )
    env.close()
    assert result["successes"] == 2 and result["tasks"]["Lift"]["episodes"] == 2
    assert result["milestones"] == {"reach": 2, "grasp": 2}
    assert result["tasks"]["Lift"]["outcomes"][0]["milestones"] == {"reach": True, "grasp": True}
    assert result["ci95"] == pytest.approx(list(wilson_interval(2, 2)))
    request = policy.requests[0]
    assert set(request["images"]) == {"observation.images.agentview", "observation.images.robot0_eye_in_hand"}
    assert request["images"]["observation.images.agentview"].shape == (32, 32, 3)
    assert request["state"].shape == (8,) and request["instruction"] == "pick up the cube"
    seeds = [o["seed"] for o in result["tasks"]["Lift"]["outcomes"]]
    assert len(set(seeds)) == 2
    assert (tmp_path / "rs_panda" / "Lift-000.mp4").stat().st_size > 0


@pytest.mark.parametrize("name", list(SUITE))
def test_milestones_start_unreached_and_the_expert_reaches_them(name: str) -> None:
    """Every source names its sub-goals; none holds at the start of an episode, and the scripted expert
    reaches each of them on its way to success (so a failed episode's milestones say where it stopped)."""
    env = entry(name).factory(32)
    try:
        for task in env.spec.tasks:
            obs = env.reset(eval_seed(0, 0), task)
            start = env.milestones()
            assert start and not any(start.values()), (task, start)
            reached = dict.fromkeys(start, False)
            for _ in range(env.max_steps):
                env.step(env.expert(obs))
                for key, now in env.milestones().items():
                    reached[key] |= now
                if env.success():
                    break
                obs = env.observe(render=False)
            assert env.success() and all(reached.values()), (task, reached)
    finally:
        env.close()


def test_evaluate_rejects_bad_replies() -> None:
    class Empty:
        def reset(self) -> None:
            pass

        def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
            return {"actions": np.zeros((0, 7))}

    with pytest.raises(ValueError, match="actions"):
        evaluate(Empty, "rs_panda", 1, tasks=["Lift"], image_size=32, progress=False)


@pytest.mark.parametrize("name", ["mw_sawyer", "rs_panda", "rs_panda_side"])
def test_oracle_reaches_expert_success(suite: Path, name: str) -> None:
    """The episodes' own anchors, through resampling and Source.canonical_to_native, solve the tasks."""
    result = oracle_check(suite, name, progress=False)
    assert result["episodes"] == 2 and result["successes"] == 2
    assert result["ratio_to_expert"] >= 0.9


def test_merge_evaluations_pools_tasks_with_wilson_interval() -> None:
    parts = [
        {
            "tasks": {
                "a": {
                    "successes": 3,
                    "episodes": 4,
                    "success_rate": 0.75,
                    "ci95": [0, 1],
                    "mean_steps": 10.0,
                    "milestones": {"reach": 4, "grasp": 3},
                    "outcomes": [],
                }
            }
        },
        {
            "tasks": {
                "b": {
                    "successes": 0,
                    "episodes": 6,
                    "success_rate": 0.0,
                    "ci95": [0, 1],
                    "mean_steps": 20.0,
                    "milestones": {"reach": 2, "grasp": 0},
                }
            }
        },
    ]
    merged = merge_evaluations(parts)
    assert (merged["successes"], merged["episodes"], merged["success_rate"]) == (3, 10, 0.3)
    assert merged["mean_steps"] == pytest.approx(16.0)
    assert merged["milestones"] == {"reach": 6, "grasp": 3}
    low, high = merged["ci95"]
    assert 0.1 < low < 0.3 < high < 0.61  # Wilson interval of 3/10: 0.108-0.603
    assert "outcomes" not in merged["tasks"]["a"]
