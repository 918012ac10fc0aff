"""Closed loop in a built-in simulated source through `POST /act` (issue 15, item 1): a client in the authors'
style (per-field json-numpy strings, the whole chunk executed, the last predicted pose as the next proprio)
drives the robot through the same evaluation loop as `xvla sim eval`, the server speaking only the raw model
protocol (no Source on the server: the client converts, as the authors' LIBERO / Simpler clients do)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import json_numpy
import numpy as np
import pytest

pytest.importorskip("mujoco")
pytest.importorskip("torch")


class AuthorsStyleSimClient:
    """`ChunkPolicy` for `run_episode`: native state and images in, native actions out, over HTTP /act."""

    def __init__(self, url: str, source: Any) -> None:
        self.url, self.source = url, source
        self.queries: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.proprio: np.ndarray | None = None

    def infer(self, obs: Mapping[str, Any]) -> Mapping[str, Any]:
        from xvla.serve.codecs.source import resample_anchors

        state = np.asarray(obs["state"], dtype=np.float64)
        if self.proprio is None:  # the first query of an episode: the sensed pose
            self.proprio = self.source.state_to_canonical(state)
        query: dict[str, Any] = {
            "proprio": json_numpy.dumps(self.proprio),
            "language_instruction": obs["instruction"],
            "domain_id": self.source.domain_id,
            "steps": 2,
        }
        for i, camera in enumerate(self.source.cameras):
            query[f"image{i}"] = json_numpy.dumps(camera.apply(obs["images"][camera.key]))
        body = json.dumps(query).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            anchors = np.array(json.loads(r.read())["action"])
        self.queries.append(query)
        canonical = resample_anchors(self.source, self.proprio, anchors)
        self.proprio = anchors[-1].copy()  # open loop: the last predicted pose is the next proprio
        return {"actions": self.source.canonical_to_native(canonical, state)}


def test_closed_loop_in_the_simulator_through_http_act(random_demo_checkpoint: Path) -> None:
    checkpoint = random_demo_checkpoint
    from xvla.serve.policy import Policy
    from xvla.serve.server import ServerConfig, ServerThread
    from xvla.sim.evaluate import run_episode
    from xvla.sim.suite import SUITE

    entry = SUITE["rs_ur5e"]
    source = entry.source("rs_ur5e")
    policy = Policy.from_checkpoint(checkpoint, device="cpu", steps=2, seed=0)
    env = entry.factory(32)
    try:
        with ServerThread(policy, ServerConfig(port=0)) as server:
            client = AuthorsStyleSimClient(f"http://127.0.0.1:{server.port}/act", source)
            chunk = round(source.horizon_s * source.control_hz)
            outcome = run_episode(env, client, "Lift", seed=0, execute=chunk, max_steps=2 * chunk)
    finally:
        env.close()
    assert outcome["steps"] == 2 * chunk and outcome["queries"] == 2 == len(client.queries)
    second = json_numpy.loads(client.queries[1]["proprio"])
    assert second.shape == (20,) and np.isfinite(second).all()
    assert not np.allclose(
        second, json_numpy.loads(client.queries[0]["proprio"])
    )  # the predicted pose, fed back
