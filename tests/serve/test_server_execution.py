"""Execution strategies through the server: selected per connection, state kept per connection and freed when it
closes, and `PolicyClient.step` at a control rate against a `ServerThread`."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable

import numpy as np
from websockets.sync.client import connect

from xvla.serve.client import PolicyClient
from xvla.serve.execution import RealTimeChunking, Synchronous, strategy_to_dict
from xvla.serve.policy import Policy
from xvla.serve.protocol import packb, unpackb
from xvla.serve.server import ServerConfig, ServerThread

from .helpers import SlowPolicy, robot_obs

AUTH = {"Authorization": "Api-Key secret"}


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_strategy_is_selected_per_connection_and_bad_ones_refused(robot_server: ServerThread) -> None:
    with connect(f"ws://127.0.0.1:{robot_server.port}", additional_headers=AUTH) as ws:
        unpackb(ws.recv(timeout=10))  # metadata
        ws.send(packb({"execution": {"strategy": "teleport"}}))
        assert "invalid request: execution.strategy: expected one of" in str(ws.recv(timeout=10))
        ws.send(packb({"execution": strategy_to_dict(RealTimeChunking(execute_steps=3))}))
        assert unpackb(ws.recv(timeout=10)) == {
            "execution": strategy_to_dict(RealTimeChunking(execute_steps=3))
        }
        ws.send(packb(robot_obs(np.random.default_rng(40))))  # no tick on an RTC connection
        assert "invalid request: tick: required with the 'rtc' execution strategy" in str(ws.recv(timeout=10))


def test_sessions_do_not_leak_between_clients_and_are_freed_on_disconnect(
    robot_server: ServerThread, policy: Policy
) -> None:
    server = robot_server.server
    rng = np.random.default_rng(41)
    obs_a, obs_b = robot_obs(rng), robot_obs(rng)
    rtc = RealTimeChunking(execute_steps=2)
    with (
        PolicyClient("127.0.0.1", robot_server.port, api_key="secret", execution=rtc) as a,
        PolicyClient("127.0.0.1", robot_server.port, api_key="secret", execution=rtc) as b,
    ):
        assert _wait_for(lambda: server.open_sessions == 2)
        a.infer({**obs_a, "tick": 0})
        a.infer({**obs_a, "tick": 4, "delay": 2})  # A's session now holds a plan and a delay estimate
        # B starts at tick 0 (before A's tick 4) on a fresh session: not inpainted, so the plain chunk
        reply = b.infer({**obs_b, "tick": 0})
        np.testing.assert_array_equal(reply["actions"], policy.infer(obs_b)["actions"])
        assert reply["tick"] == 0
        sessions = [weakref.ref(s) for s in server._sessions if s is not None]
        assert len(sessions) == 2
    assert _wait_for(lambda: server.open_sessions == 0)
    gc.collect()
    assert all(ref() is None for ref in sessions)  # nothing else holds them


def test_a_client_that_disconnects_mid_chunk_frees_its_session(policy: Policy) -> None:
    slow = SlowPolicy(policy, 0.5)
    with ServerThread(slow, ServerConfig(port=0)) as running:
        server = running.server
        with connect(f"ws://127.0.0.1:{running.port}") as ws:
            ws.recv(timeout=10)
            ws.send(packb({"execution": strategy_to_dict(RealTimeChunking())}))
            ws.recv(timeout=10)
            assert server.open_sessions == 1
            ws.send(packb({**robot_obs(np.random.default_rng(42)), "tick": 0}))
            time.sleep(0.1)  # the chunk is being computed; leave without reading it
        assert _wait_for(lambda: server.open_sessions == 0)
        with PolicyClient("127.0.0.1", running.port) as client:  # and the server keeps serving
            assert client.infer(robot_obs(np.random.default_rng(43)))["actions"].shape == (20, 7)


def test_client_step_loop_at_the_control_rate(policy: Policy) -> None:
    slow = SlowPolicy(policy, 0.15)  # a chunk takes ~3 ticks of 50 ms
    obs = robot_obs(np.random.default_rng(44))
    with ServerThread(slow, ServerConfig(port=0)) as running:
        with PolicyClient("127.0.0.1", running.port, execution=RealTimeChunking(execute_steps=4)) as client:
            actions = []
            for _ in range(14):
                start = time.monotonic()
                actions.append(client.step(obs))
                time.sleep(max(0.0, 0.05 - (time.monotonic() - start)))
            assert all(a.shape == (7,) and np.isfinite(a).all() for a in actions)
            ex = client.executor
            assert ex.plan_id >= 1 and ex.last_delay is not None and ex.last_delay >= 1  # replies took ticks
            assert ex.tick == 14
            client.reset()
            assert client.executor.tick == 0 and client.executor.plan is None
            assert _wait_for(lambda: running.server.open_sessions == 1)
        with PolicyClient("127.0.0.1", running.port, execution=Synchronous(execute_steps=3)) as sync:
            chunk = slow.inner.infer(obs)["actions"]
            stepped = [sync.step(obs) for _ in range(4)]
            np.testing.assert_array_equal(np.stack(stepped[:3]), chunk[:3])  # synchronous: today's chunks
            np.testing.assert_array_equal(stepped[3], chunk[0])
