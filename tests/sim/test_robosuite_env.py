"""The robosuite sources' scripted expert."""

from __future__ import annotations

import pytest

from xvla.sim.evaluate import eval_seed
from xvla.sim.robosuite_env import RobosuiteSource

pytest.importorskip("robosuite")


def test_lift_expert_lifts_once_the_fingers_stop() -> None:
    """The Panda's fingers stop on the cube about 0.35 s after the close command. The expert held still for a
    fixed 0.6 s before lifting, a pause a policy cannot see the end of: replanning every 0.4 s it predicted the
    same remaining hold from the same still scene at every query and never lifted (docs/demo.md, item 33). It now
    lifts as soon as the fingers stop, with both pads on the cube."""
    env = RobosuiteSource("rs_panda", 32)
    try:
        obs = env.reset(eval_seed(0, 0), "Lift")
        expert = env._expert
        assert expert is not None
        grasp_steps = 0
        for _ in range(env.max_steps):
            phase = expert.phase
            env.step(env.expert(obs))
            grasp_steps += phase == "grasp"
            if phase == "grasp" and expert.phase == "lift":
                assert env.milestones()["grasp"], "lifted before both finger pads touched the cube"
                assert env.finger_speed() < 0.1 * 0.06  # the fingers close at about 0.06 m/s
            if env.success():
                break
            obs = env.observe(render=False)
        assert env.success()
        assert 0 < grasp_steps * expert.dt < 0.45, grasp_steps
    finally:
        env.close()
