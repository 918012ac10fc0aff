"""Execution strategies on the robot side (xvla.serve.execution): configs, the executor's tick bookkeeping with a
scripted model, ACT's weights. No model here: replies are made up."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest

from xvla.serve.execution import (
    Executor,
    RealTimeChunking,
    SimulatedLatency,
    Synchronous,
    TemporalEnsemble,
    ThreadedRequester,
    strategy_from_dict,
    strategy_to_dict,
)

K = 6


class Scripted:
    """A 'model' whose chunk for a request at tick t is [[t*100 + k] for k in range(K)]: every action says which
    query and which row it came from."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        t = request["tick"]
        return {"actions": (t * 100 + np.arange(K, dtype=np.float64))[:, None]}


HOLD = np.array([-1.0])


def _run(strategy: Any, latency: int, ticks: int) -> tuple[list[float], Scripted]:
    model = Scripted()
    ex = Executor(strategy, SimulatedLatency(model, latency), hold=lambda obs: HOLD)
    return [float(ex.step({"state": 0})[0]) for _ in range(ticks)], model


def test_strategy_dicts_round_trip_and_errors_name_the_field() -> None:
    for s in (Synchronous(4), TemporalEnsemble(0.1, 2), RealTimeChunking(3, "linear", 0.5)):
        assert strategy_from_dict(strategy_to_dict(s)) == s
    assert strategy_to_dict(RealTimeChunking()) == {
        "strategy": "rtc",
        "execute_steps": None,
        "schedule": "exp",
        "weight": 1.0,
    }
    with pytest.raises(
        ValueError, match=r"execution.strategy: expected one of \['ensemble', 'rtc', 'sync'\]"
    ):
        strategy_from_dict({"strategy": "fast"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['delay'\] for strategy 'rtc'"):
        strategy_from_dict({"strategy": "rtc", "delay": 3})
    with pytest.raises(ValueError, match="RealTimeChunking.schedule: expected one of"):
        strategy_from_dict({"strategy": "rtc", "schedule": "cubic"})
    with pytest.raises(ValueError, match="Synchronous.execute_steps: expected an integer >= 1"):
        Synchronous(0)
    with pytest.raises(ValueError, match="TemporalEnsemble.coeff"):
        TemporalEnsemble(coeff=-1.0)


def test_act_weights_hand_computed() -> None:
    w = TemporalEnsemble(coeff=0.5).weights(3)
    raw = np.array([1.0, math.exp(-0.5), math.exp(-1.0)])  # oldest first, oldest heaviest
    np.testing.assert_allclose(w, raw / raw.sum())
    np.testing.assert_allclose(TemporalEnsemble(coeff=0.0).weights(4), np.full(4, 0.25))


def test_rtc_soft_mask_hand_computed() -> None:
    c = np.array([1.0, 0.5, 0.0, -1.0, 2.0])
    np.testing.assert_allclose(
        RealTimeChunking().mask(c), [1.0, 0.5 * math.expm1(0.5) / math.expm1(1.0), 0.0, 0.0, 1.0]
    )
    np.testing.assert_allclose(RealTimeChunking(schedule="linear").mask(c), [1.0, 0.5, 0.0, 0.0, 1.0])
    assert not RealTimeChunking(schedule="none").mask(c).any()


def test_synchronous_without_latency_is_query_then_execute() -> None:
    actions, model = _run(Synchronous(execute_steps=4), 0, 9)
    assert actions == [0, 1, 2, 3, 400, 401, 402, 403, 800]
    assert [r["tick"] for r in model.requests] == [0, 4, 8]
    assert "delay" not in model.requests[0] and model.requests[1]["delay"] == 0


def test_synchronous_with_latency_holds_while_waiting() -> None:
    actions, model = _run(Synchronous(execute_steps=3), 2, 10)
    # queries at 0 (reply at 2), at 5 (reply at 7): the robot holds still while it waits
    assert actions == [-1, -1, 0, 1, 2, -1, -1, 500, 501, 502]
    assert [r.get("delay") for r in model.requests] == [None, 2]


def test_rtc_keeps_executing_the_old_chunk_during_inference() -> None:
    actions, model = _run(RealTimeChunking(execute_steps=3), 2, 10)
    # the first chunk is waited for (the robot holds, then it starts from its row 0); then a query every 3
    # ticks; each reply arrives 2 ticks later and is read from its own tick: row 2 of the chunk asked for at
    # tick 3 is executed at tick 5
    assert actions == [-1, -1, 0, 1, 2, 302, 303, 304, 602, 603]
    assert [r["tick"] for r in model.requests] == [0, 3, 6, 9]
    assert [r.get("delay") for r in model.requests] == [None, 2, 2, 2]
    assert [r.get("plan_start") for r in model.requests] == [None, 2, 3, 6]  # the session re-anchors by it


def test_ensemble_queries_as_often_as_it_may() -> None:
    actions, model = _run(TemporalEnsemble(query_every=1), 0, 3)
    assert [r["tick"] for r in model.requests] == [0, 1, 2]
    assert actions == [0, 100, 200]  # the plan is the reply (the server-side Session ensembles it)


def test_without_hold_the_executor_waits_for_the_reply() -> None:
    model = Scripted()
    release = threading.Event()

    def slow(request: dict[str, Any]) -> dict[str, Any]:
        release.wait(5)
        return model(request)

    ex = Executor(Synchronous(execute_steps=2), ThreadedRequester(slow))
    threading.Timer(0.05, release.set).start()
    assert [float(ex.step({})[0]) for _ in range(3)] == [0, 1, 200]
    assert ex.last_delay == 0  # the robot waited: no tick passed


def test_a_failing_request_leaves_no_state() -> None:
    def broken(request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("model down")

    ex = Executor(RealTimeChunking(), SimulatedLatency(broken, 1), hold=lambda obs: HOLD)
    with pytest.raises(RuntimeError, match="model down"):
        ex.step({})
    assert ex.in_flight is None and ex.plan is None and ex.tick == 0
