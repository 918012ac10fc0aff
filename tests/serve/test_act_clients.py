"""`POST /act` driven by a client written the way the authors' LIBERO / Simpler clients are (issue 15, item 1):
per-field `json_numpy.dumps` strings in a plain JSON body, a query whenever the action plan is empty, all 30
actions executed, and the last predicted pose sent back as the next proprio."""

from __future__ import annotations

import collections
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import json_numpy
import numpy as np
import pytest

from xvla.model.tokenizer import build_tokenizer
from xvla.serve.policy import Policy
from xvla.serve.server import ServerConfig, ServerThread

from .helpers import fixture_dir, raw_obs


def post_json(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`requests.post(url, json=payload).json()` with the standard library; raises on a non-200 answer."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


class AuthorsStyleClient:
    """The authors' evaluation client loop: query when the plan is empty, execute the whole chunk, and feed
    the last predicted pose back as the next query's proprio (open loop)."""

    def __init__(self, url: str, domain_id: int, steps: int | None = 10) -> None:
        self.url, self.domain_id, self.steps = url, domain_id, steps
        self.sent: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.proprio: np.ndarray | None = None
        self.action_plan: collections.deque[list[float]] = collections.deque()

    def step(self, images: list[np.ndarray], sensed_proprio: np.ndarray, goal: str) -> np.ndarray:
        if not self.action_plan:
            if self.proprio is None:
                self.proprio = sensed_proprio.copy()
            query: dict[str, Any] = {
                "proprio": json_numpy.dumps(self.proprio),
                "language_instruction": goal,
                "domain_id": self.domain_id,
            }
            for i, image in enumerate(images):
                query[f"image{i}"] = json_numpy.dumps(image)
            if self.steps is not None:
                query["steps"] = self.steps
            action = np.array(post_json(self.url, query)["action"])
            self.sent.append(query)
            self.proprio = action[-1].copy()
            self.action_plan.extend(action.tolist())
        return np.array(self.action_plan.popleft(), dtype=np.float32)


def test_per_field_strings_over_http(raw_server: ServerThread, raw_policy: Policy) -> None:
    """The authors' body is answered with the policy's own actions; a bad field is a 400 naming it."""
    url = f"http://127.0.0.1:{raw_server.port}/act"
    obs = raw_obs(np.random.default_rng(70))
    query = {k: json_numpy.dumps(v) if isinstance(v, np.ndarray) else v for k, v in obs.items()}
    reply = post_json(url, query)
    assert set(reply) == {"action", "server_timing"}
    np.testing.assert_allclose(reply["action"], raw_policy.infer(obs)["actions"], atol=1e-5)
    with pytest.raises(urllib.error.HTTPError) as err:
        post_json(url, {**query, "image0": json_numpy.dumps("/etc/passwd")})
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"].startswith("image0: expected an image")


@pytest.fixture(scope="module")
def authors_policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    """The shared tiny checkpoint in the authors' layout (config.json + model.safetensors) and a tokenizer."""
    folder = tmp_path_factory.mktemp("authors") / "ckpt"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture_dir("xvla_official_tiny") / name, folder / name)
    build_tokenizer(folder, vocab_size=1024)
    return Policy.from_checkpoint(Path(folder), device="cpu", steps=2, seed=0)


def test_authors_client_loop_against_an_authors_checkpoint(authors_policy: Policy) -> None:
    rng = np.random.default_rng(71)
    sensed = rng.uniform(-0.3, 0.3, 20)
    goal = "put the bowl on the plate"
    with ServerThread(authors_policy, ServerConfig(port=0)) as server:
        client = AuthorsStyleClient(f"http://127.0.0.1:{server.port}/act", domain_id=17, steps=None)
        executed = []
        for _ in range(60):  # two chunks of 30
            images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
            executed.append(client.step(images, sensed, goal))
    assert len(client.sent) == 2 and np.isfinite(executed).all()
    assert all(a.shape == (20,) for a in executed)
    # the second query carried the first chunk's last pose, and each answer is the policy's own
    first, second = (json_numpy.loads(q["proprio"]) for q in client.sent)
    np.testing.assert_array_equal(first, sensed)
    np.testing.assert_allclose(second, executed[29], atol=1e-6)
    for i, query in enumerate(client.sent):
        obs = {
            "image0": json_numpy.loads(query["image0"]),
            "image1": json_numpy.loads(query["image1"]),
            "proprio": json_numpy.loads(query["proprio"]),
            "language_instruction": goal,
            "domain_id": 17,
        }
        np.testing.assert_allclose(
            executed[30 * i : 30 * (i + 1)], authors_policy.infer(obs)["actions"], atol=1e-4
        )
