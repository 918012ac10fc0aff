"""The robot-side client: no torch, reconnects, timeouts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xvla.serve.client import PolicyClient
from xvla.serve.policy import Policy
from xvla.serve.server import ServerConfig, ServerThread

from .helpers import SlowPolicy, raw_obs

SRC = Path(__file__).resolve().parents[2] / "src"


def test_client_imports_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "xvla.model", "xvla.data"):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        from xvla.serve.client import PolicyClient, ServerError
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(SRC)}
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_reconnects_after_a_server_restart(raw_policy: Policy) -> None:
    first = ServerThread(raw_policy, ServerConfig(port=0)).start()
    port = first.port
    client = PolicyClient("127.0.0.1", port, retries=5, retry_delay_s=0.2)
    assert client.infer(raw_obs(np.random.default_rng(20)))["actions"].shape == (30, 20)
    first.stop()
    with ServerThread(raw_policy, ServerConfig(port=port)):
        assert client.infer(raw_obs(np.random.default_rng(21)))["actions"].shape == (30, 20)
    client.close()


def test_timeout_then_gives_up(raw_policy: Policy) -> None:
    with ServerThread(SlowPolicy(raw_policy, 1.0), ServerConfig(port=0)) as server:
        client = PolicyClient("127.0.0.1", server.port, timeout_s=0.2, retries=1, retry_delay_s=0.0)
        with pytest.raises(ConnectionError, match="after 2 attempts"):
            client.infer(raw_obs(np.random.default_rng(22)))
        client.close()


def test_connection_refused_is_an_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        PolicyClient("127.0.0.1", port, connect_timeout_s=2.0)
