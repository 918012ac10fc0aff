"""benchmarks/scene_following.py: the first-chunk slope is 1 for a policy that follows the scene, 0 for one that
does not."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from .scripts import load_script

pytest.importorskip("robosuite")


scene = load_script("scene_following")


class _Replay:
    """Answers the i-th query with chunk i (one query per seed)."""

    def __init__(self, chunks: list[np.ndarray]) -> None:
        self.chunks = chunks

    def reset(self) -> None:
        pass

    def infer(self, obs: Any) -> dict[str, np.ndarray]:
        return {"actions": self.chunks.pop(0)}


def test_slope_separates_scene_following_from_average_motion() -> None:
    from xvla.sim.evaluate import eval_seed
    from xvla.sim.suite import SUITE

    env = SUITE["rs_ur5e"].factory(32)
    steps, seeds = 6, 4
    try:
        expert_chunks = []  # what the expert does from each seed's reset: a perfect scene-following policy
        for episode in range(seeds):
            obs = env.reset(eval_seed(0, episode), "Lift")
            chunk = []
            for _ in range(steps):
                chunk.append(np.asarray(env.expert(obs)))
                env.step(chunk[-1])
                obs = env.observe(render=False)
            expert_chunks.append(np.stack(chunk))
        mean = np.mean(expert_chunks, axis=0)
        columns = [0, 1, 2]
        follows = scene.first_chunk_slopes(env, _Replay(list(expert_chunks)), columns, "Lift", seeds, steps)
        average = scene.first_chunk_slopes(env, _Replay([mean] * seeds), columns, "Lift", seeds, steps)
    finally:
        env.close()
    assert follows and [r["column"] for r in follows] == [r["column"] for r in average]
    assert all(r["slope"] == pytest.approx(1.0) and r["corr"] == pytest.approx(1.0) for r in follows)
    assert all(abs(r["slope"]) < 1e-6 and r["corr"] == 0.0 for r in average)
