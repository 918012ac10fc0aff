"""Serving fixtures: a tiny random checkpoint (demo preset, 64 px) with a local tokenizer and two robot sources.

tests/serve is a package so that this file is imported as `serve.conftest` and never shadows tests/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from xvla.config import get_preset
from xvla.model.tokenizer import build_tokenizer
from xvla.model.xvla import XVLA
from xvla.serve.policy import Policy
from xvla.serve.server import ServerConfig, ServerThread

from .helpers import STEPS, arm_source


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve") / "ckpt"
    config = get_preset("demo")
    XVLA(config).save_pretrained(folder)
    build_tokenizer(folder, vocab_size=config.text.vocab_size)
    sources = {s.name: s.to_dict() for s in (arm_source(), arm_source("other_arm", 5, control_hz=5.0))}
    (folder / "sources.json").write_text(json.dumps(sources))
    return folder


@pytest.fixture(scope="session")
def policy(checkpoint: Path) -> Policy:
    torch.set_num_threads(1)
    return Policy.from_checkpoint(checkpoint, source="toy_arm", device="cpu", steps=STEPS, seed=0)


@pytest.fixture(scope="session")
def raw_policy(policy: Policy) -> Policy:
    return policy.with_source(None)


@pytest.fixture(scope="module")
def raw_server(raw_policy: Policy) -> Iterator[ServerThread]:
    with ServerThread(raw_policy, ServerConfig(port=0, max_message_mb=1.0)) as server:
        yield server


@pytest.fixture(scope="module")
def robot_server(policy: Policy) -> Iterator[ServerThread]:
    with ServerThread(
        policy, ServerConfig(port=0, api_key="secret", max_batch=4, max_wait_ms=20.0)
    ) as server:
        yield server
