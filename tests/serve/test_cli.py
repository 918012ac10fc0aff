"""`xvla serve` as a process (the authors' layout served directly) and `xvla replay` on a small dataset."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import json_numpy
import numpy as np
import pytest

from xvla.cli import build_parser
from xvla.cli import main as xvla_main
from xvla.data.lerobot_writer import LeRobotV3Writer
from xvla.data.sources import Mixture
from xvla.model.tokenizer import build_tokenizer
from xvla.serve import cli as serve_cli
from xvla.serve.client import PolicyClient, ServerError
from xvla.serve.policy import Policy
from xvla.serve.replay import replay
from xvla.serve.server import ServerConfig, ServerThread

from .helpers import arm_source, fixture_dir, raw_obs, robot_obs

SRC = Path(__file__).resolve().parents[2] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: 10-40 s on a busy 2-core machine
def test_xvla_serve_process(checkpoint: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "xvla.cli", "serve", str(checkpoint), "--port", str(port), "--steps", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        obs = raw_obs(np.random.default_rng(30))
        request = urllib.request.Request(f"http://127.0.0.1:{port}/act", data=json_numpy.dumps(obs).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            assert np.asarray(json.loads(r.read())["action"]).shape == (30, 20)
        with PolicyClient("127.0.0.1", port) as client:
            assert client.metadata["protocol"] == "raw"
            assert client.infer(obs)["actions"].shape == (30, 20)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _write_dataset(root: Path, episodes: int = 3, frames: int = 30) -> None:
    features = {
        "observation.images.front": {
            "dtype": "image",
            "shape": [32, 32, 3],
            "names": ["height", "width", "channels"],
        },
        "observation.images.wrist": {
            "dtype": "image",
            "shape": [24, 40, 3],
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": [8], "names": None},
        "action": {"dtype": "float32", "shape": [7], "names": None},
    }
    rng = np.random.default_rng(0)
    with LeRobotV3Writer(root, fps=10, features=features) as writer:
        for ep in range(episodes):
            for i in range(frames):
                t = i / 10
                state = np.array(
                    [0.3 + 0.05 * t, 0.1 * np.sin(t + ep), 0.2, 0, 0, np.sin(t / 4), np.cos(t / 4), 0.04]
                )
                writer.add_frame(
                    {
                        "observation.images.front": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                        "observation.images.wrist": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
                        "observation.state": state.astype(np.float32),
                        "action": np.zeros(7, np.float32),
                    },
                    task=f"task {ep}",
                )
            writer.save_episode()
        writer.finalize()


def test_replay_serving_path_matches_training_inputs(
    tmp_path: Path, policy: Policy, checkpoint: Path
) -> None:
    _write_dataset(tmp_path / "data")
    source = arm_source(path=str(tmp_path / "data"), format="lerobot", val_count=1)
    mixture = Mixture((source,))
    report = replay(policy.with_source(None), mixture, split="val", samples=5, batch_size=2)
    row = report["sources"]["toy_arm"]
    assert row["samples"] == 5 and np.isfinite(row["l1"]) and row["l1"] > 0
    assert row["input_max_abs_diff"] == 0.0  # serving and training build identical model inputs
    mixture.save(tmp_path / "mixture.json")
    out = tmp_path / "replay.json"
    argv = [
        "replay",
        str(checkpoint),
        "--mixture",
        str(tmp_path / "mixture.json"),
        "--samples",
        "3",
        "--steps",
        "2",
    ]
    assert xvla_main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["overall"]["samples"] == 3


def test_xvla_serve_wiring(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`xvla serve CKPT --source NAME ...` builds the policy and server config the flags say (served in a thread)."""
    captured = {}
    monkeypatch.setattr(
        "xvla.serve.server.run_server", lambda policy, config: captured.update(policy=policy, config=config)
    )
    argv = [
        "serve",
        str(checkpoint),
        "--source",
        "other_arm",
        "--port",
        "0",
        "--api-key",
        "k",
        "--max-batch",
        "3",
    ]
    assert (
        xvla_main([*argv, "--max-wait-ms", "1", "--max-message-mb", "2", "--steps", "2", "--device", "cpu"])
        == 0
    )
    config, policy = captured["config"], captured["policy"]
    assert (config.host, config.api_key, config.max_batch, config.max_wait_ms, config.max_message_bytes) == (
        "127.0.0.1",
        "k",
        3,
        1.0,
        2 * 2**20,
    )
    assert policy.source.name == "other_arm" and policy.config.steps == 2
    with (
        ServerThread(policy, config) as server,
        PolicyClient("127.0.0.1", server.port, api_key="k") as client,
    ):
        assert client.metadata["domain"] == "other_arm" and client.metadata["control_hz"] == 5.0
        assert client.infer(robot_obs(np.random.default_rng(32)))["actions"].shape == (10, 7)


def test_serve_rejects_unknown_source(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert xvla_main(["serve", str(checkpoint), "--source", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xvla serve: error: ") and "source 'nope'" in err and err.count("\n") == 1


def test_a_typo_d_checkpoint_path_is_not_found_and_never_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`xvla serve runs/typo_ckpt` next to a `runs/` folder: a one-line "not found", no hub lookup (issue 14 D16)."""
    import huggingface_hub

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("snapshot_download called for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for command in ("serve", "replay"):
        extra = ["--mixture", "m.json"] if command == "replay" else []
        for name in ("runs/typo_ckpt", "./typo", "~/typo_ckpt"):
            assert xvla_main([command, name, *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"xvla {command}: error: not found: {name} (") and err.count("\n") == 1


def test_a_corrupt_weights_file_is_a_one_line_error_naming_it(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated model.safetensors is named, not a safetensors traceback (issue 14 D13)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert xvla_main(["serve", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xvla serve: error: {weights}: corrupt or truncated safetensors file (")
    assert err.count("\n") == 1
    (folder / "config.json").write_text("{not json")
    assert xvla_main(["serve", str(folder), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"xvla serve: error: {folder / 'config.json'}: corrupt JSON (")


def test_authors_layout_checkpoint_served_directly(tmp_path: Path) -> None:
    """The authors' checkpoint folder (config.json with florence_config + model.safetensors) plus a tokenizer."""
    folder = tmp_path / "authors"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fixture_dir("xvla_official_tiny") / name, folder / name)
    build_tokenizer(folder, vocab_size=1024)
    policy = Policy.from_checkpoint(folder, device="cpu", steps=2, seed=0)
    obs = {**raw_obs(np.random.default_rng(31)), "domain_id": 17}
    with ServerThread(policy, ServerConfig(port=0)) as server:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/act", data=json_numpy.dumps(obs).encode()
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            action = np.asarray(json.loads(r.read())["action"])
    assert action.shape == (30, 20) and np.isfinite(action).all()
    np.testing.assert_allclose(action, policy.infer(obs)["actions"], atol=1e-4)


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "ckpt", *argv])


def test_api_key_from_a_file_or_the_environment(tmp_path: Path) -> None:
    """The key need not be on the command line, where every user sees it in the process list."""
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert serve_cli.api_key(_serve_args("--api-key-file", str(key_file)), {}) == "s3cret"
    assert serve_cli.api_key(_serve_args(), {"XVLA_API_KEY": "from-env"}) == "from-env"
    assert serve_cli.api_key(_serve_args("--api-key", "flag"), {"XVLA_API_KEY": "from-env"}) == "flag"
    assert serve_cli.api_key(_serve_args(), {}) is None
    with pytest.raises(ValueError, match=rf"--api-key-file {tmp_path / 'nope'}: cannot read it"):
        serve_cli.api_key(_serve_args("--api-key-file", str(tmp_path / "nope")), {})
    (tmp_path / "blank").write_text("  \n")
    with pytest.raises(ValueError, match="blank: the API key is empty"):
        serve_cli.api_key(_serve_args("--api-key-file", str(tmp_path / "blank")), {})
    with pytest.raises(ValueError, match=r"\$XVLA_API_KEY: the API key is empty"):
        serve_cli.api_key(_serve_args(), {"XVLA_API_KEY": ""})
    with pytest.raises(SystemExit):  # one source per command line
        _serve_args("--api-key", "a", "--api-key-file", str(key_file))
    with pytest.raises(ValueError, match="api_key: empty"):
        ServerConfig(api_key=" ")


def test_serve_enforces_the_key_from_the_environment(
    tmp_path: Path, policy: Policy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from xvla.serve import server

    configs: list[ServerConfig] = []
    monkeypatch.setattr(serve_cli, "_policy", lambda args, source: policy)
    monkeypatch.setattr(server, "run_server", lambda policy, config: configs.append(config))
    monkeypatch.setenv("XVLA_API_KEY", "from-env")
    assert xvla_main(["serve", "ckpt", "--port", "0"]) == 0
    with ServerThread(policy, configs[0]) as running:
        with pytest.raises(ServerError, match="401"):
            PolicyClient("127.0.0.1", running.port, api_key="wrong", retries=0)
        with PolicyClient("127.0.0.1", running.port, api_key="from-env") as client:
            assert client.infer(robot_obs(np.random.default_rng(31)))["actions"].shape == (20, 7)
    monkeypatch.setenv("XVLA_API_KEY", "")
    assert xvla_main(["serve", "ckpt"]) == 2
    assert "xvla serve: error: $XVLA_API_KEY: the API key is empty" in capsys.readouterr().err


def test_allow_origin_flag(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    from xvla.serve import server

    configs: list[ServerConfig] = []
    monkeypatch.setattr(serve_cli, "_policy", lambda args, source: policy)
    monkeypatch.setattr(server, "run_server", lambda policy, config: configs.append(config))
    argv = ["serve", "ckpt", "--allow-origin", "https://a.example", "--allow-origin", "https://b.example"]
    assert xvla_main(argv) == 0 and xvla_main(["serve", "ckpt"]) == 0
    assert configs[0].allow_origins == ("https://a.example", "https://b.example")
    assert configs[1].allow_origins == ()
    assert (configs[1].max_connections, configs[1].max_buffered_mb) == (64, 256.0)


def test_limit_flags(
    policy: Policy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from xvla.serve import server

    configs: list[ServerConfig] = []
    monkeypatch.setattr(serve_cli, "_policy", lambda args, source: policy)
    monkeypatch.setattr(server, "run_server", lambda policy, config: configs.append(config))
    assert xvla_main(["serve", "ckpt", "--max-connections", "4", "--max-buffered-mb", "32"]) == 0
    assert (configs[0].max_connections, configs[0].max_buffered_bytes) == (4, 32 * 2**20)
    assert xvla_main(["serve", "ckpt", "--max-buffered-mb", "8"]) == 2
    assert capsys.readouterr().err.startswith(
        "xvla serve: error: max_buffered_mb (8.0) must be >= max_message_mb"
    )
