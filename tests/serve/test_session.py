"""The connection side of the execution strategies (xvla.serve.session) and `Policy.step` with each of them on the
tiny model: ensembling and inpainting weights by hand, synchronous parity, RTC continuity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xvla.serve.codecs import RAW, Prepared
from xvla.serve.execution import RealTimeChunking, Strategy, Synchronous, TemporalEnsemble
from xvla.serve.policy import Policy, PolicyConfig
from xvla.serve.protocol import RequestError
from xvla.serve.session import Session

from .helpers import STEPS, arm_source, robot_obs


def _raw(tick: int) -> Prepared:
    """A raw request's `Prepared` (no Source: ticks count anchors)."""
    return Prepared({}, 1, np.zeros(1), RAW, tick=tick)


def _reply(values: list[float]) -> dict[str, np.ndarray]:
    return {"actions": np.array(values, dtype=np.float32)[:, None]}


def test_temporal_ensemble_hand_computed() -> None:
    session = Session(TemporalEnsemble(coeff=0.5), num_anchors=3)
    first = session.finish(_raw(0), _reply([0, 1, 2]))
    np.testing.assert_array_equal(first["actions"][:, 0], [0, 1, 2])
    second = session.finish(_raw(1), _reply([10, 11, 12]))
    w = math.exp(-0.5)  # the newer chunk's weight; the older one's is 1
    expected = [(1 + w * 10) / (1 + w), (2 + w * 11) / (1 + w), 12]
    np.testing.assert_allclose(second["actions"][:, 0], expected, rtol=1e-6)
    assert second["tick"] == 1
    session.finish(_raw(4), _reply([40, 41, 42]))
    assert [p.tick for p in session.plans] == [4]  # chunks that end before tick 4 are dropped


def test_rtc_inpainting_target_and_weights_hand_computed() -> None:
    session = Session(RealTimeChunking(schedule="linear"), num_anchors=6)
    session.finish(_raw(0), _reply([0, 10, 20, 30, 40, 50]))  # row k: the pose after tick k
    session.delays.append(2)
    target, weight = session.inpainting(_raw(2), 2)
    # anchor j of the chunk for tick 2 is the pose after tick 2 + j, i.e. row j + 2; past the plan's end: held
    np.testing.assert_allclose(target[:, 0], [20, 30, 40, 50, 50, 50])
    # 2 frozen anchors (the delay), then the linear mask over the rest of the overlap (which ends at row 5)
    np.testing.assert_allclose(weight, [1, 1, 0.5, 0, 0, 0])


def test_session_checks_ticks() -> None:
    session = Session(RealTimeChunking(), num_anchors=6)
    with pytest.raises(RequestError, match="tick: required with the 'rtc' execution strategy"):
        session.attach(_raw(0), {})
    with pytest.raises(RequestError, match="tick: expected an integer"):
        session.attach(_raw(0), {"tick": "now"})
    session.finish(session.attach(_raw(0), {"tick": 5}), _reply([0, 1, 2, 3, 4, 5]))
    with pytest.raises(RequestError, match="tick: 4 is before the previous request's 5"):
        session.attach(_raw(0), {"tick": 4})
    assert Session().attach(_raw(0), {}).tick is None  # synchronous: no tick needed


# -------------------------------------------------------------------------------------------- on the tiny model


def _stepping(policy: Policy, strategy: Strategy, latency: int, control_hz: float = 15.0) -> Policy:
    """The tiny policy on a toy arm whose control ticks fall on anchors (15 Hz x 2 s = 30 ticks = 30 anchors)."""
    source = arm_source(control_hz=control_hz)
    config = PolicyConfig(steps=STEPS, seed=0, execution=strategy, latency_steps=latency)
    return policy.with_source(source, config)


def test_synchronous_step_equals_the_chunk_exactly(policy: Policy) -> None:
    obs = robot_obs(np.random.default_rng(30))
    looped = _stepping(policy, Synchronous(), 0, control_hz=10.0)
    chunk = looped.infer(obs)["actions"]
    actions = [looped.step(obs) for _ in range(len(chunk) + 2)]
    assert np.array_equal(np.stack(actions[: len(chunk)]), chunk)  # bit-identical to today's queue
    assert np.array_equal(np.stack(actions[len(chunk) :]), chunk[:2])  # re-queried once it ran out


def _rtc_run(policy: Policy, weight: float) -> list[tuple[int, np.ndarray | None, np.ndarray | None]]:
    """RTC with a 2-tick latency for 7 ticks: per tick (plan id, the plan's canonical poses, the executed pose).
    Queries at ticks 0 and 4; the first chunk starts at tick 2, the second arrives at tick 6 (its delay, 2, was
    measured on the first)."""
    looped = _stepping(policy, RealTimeChunking(execute_steps=4, weight=weight), 2)
    rng = np.random.default_rng(31)
    out = []
    for _ in range(7):
        looped.step(robot_obs(rng))  # a new random scene every tick: the tiny model's chunks disagree
        ex = looped.executor
        out.append((ex.plan_id, ex.plan_canonical, ex.last_canonical))
    return out


def test_rtc_frozen_steps_equal_the_committed_actions(policy: Policy) -> None:
    ticks = _rtc_run(policy, 1.0)
    assert [t[0] for t in ticks] == [-1, -1, 0, 0, 0, 0, 1]  # held until the first reply
    first, second = ticks[2][1], ticks[6][1]
    assert first is not None and second is not None and np.isfinite(second).all()
    # rows 0 and 1 of the second chunk (ticks 4 and 5, executed from the first chunk during inference) are the
    # first chunk's rows 2 and 3 (it started at tick 2, when it arrived): xyz and rot6d exactly, the gripper up
    # to the logit clamp of the sampler
    pose = [i for i in range(10) if i != 9]
    np.testing.assert_allclose(second[:2, pose], first[2:4, pose], atol=1e-5)
    np.testing.assert_allclose(second[:2, 9], first[2:4, 9], atol=1e-3)


def test_rtc_boundaries_jump_less_than_without_inpainting(policy: Policy) -> None:
    jumps = {}
    for weight in (1.0, 0.0):  # weight 0: the same asynchronous execution without inpainting
        ticks = _rtc_run(policy, weight)
        before, after = ticks[5][2], ticks[6][2]  # tick 6: the boundary
        assert before is not None and after is not None
        jumps[weight] = float(np.linalg.norm(after[:3] - before[:3]))
    assert jumps[1.0] < 0.5 * jumps[0.0], jumps
