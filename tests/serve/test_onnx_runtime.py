"""The torch-free ONNX runtime's own parts: import without torch, the numpy sampler loops against the torch
objectives, the manifest. (Exported graphs against the eager model: tests/model/test_onnx_export.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from xvla.model.flow import OBJECTIVES
from xvla.serve.onnx_runtime import (
    MANIFEST_NAME,
    SAMPLER_LOOPS,
    Manifest,
    OnnxGenerator,
    Sampler,
    finish,
)

SRC = Path(__file__).resolve().parents[2] / "src"

# A torch-free process: torch, transformers and the model/data code cannot be imported.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers") or name.startswith(("xvla.model", "xvla.data")):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    sys.modules["torch"] = None
    """
)


def test_runtime_imports_without_torch() -> None:
    code = BLOCK_TORCH + textwrap.dedent(
        """
        from xvla.serve.onnx_runtime import OnnxGenerator, SAMPLER_LOOPS
        assert sys.modules["torch"] is None and "xvla.model" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(SRC)}
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("steps", [1, 4, 10])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_numpy_sampler_loop_matches_the_objective(name: str, steps: int) -> None:
    """Every registered objective has a numpy twin whose loop gives the torch loop's state on the same
    (non-trivial) denoiser and noise."""
    assert name in SAMPLER_LOOPS, f"objective {name!r} has no numpy sampler in onnx_runtime.SAMPLER_LOOPS"
    rng = np.random.default_rng(steps)
    noise = rng.standard_normal((2, 5, 6), dtype=np.float32)
    weight = rng.standard_normal((6, 6), dtype=np.float32)
    seen: list[tuple[float, ...]] = []

    def den_np(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        seen.append(tuple(t.tolist()))
        return np.tanh(x @ weight + t[:, None, None])

    def den_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ torch.from_numpy(weight) + t[:, None, None])

    got = SAMPLER_LOOPS[name].sample(den_np, noise, steps)
    want = OBJECTIVES[name].sample(den_torch, torch.from_numpy(noise), steps)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
    assert [s[0] for s in seen] == pytest.approx(OBJECTIVES[name].grid(steps))
    assert not np.allclose(got, SAMPLER_LOOPS[name].start(noise))  # the loop moved the state


def test_finish_applies_sigmoid_then_trims() -> None:
    state = np.array([[[-1.0, 0.0, 2.0, 5.0]]], dtype=np.float32)
    out = finish(state, Sampler("x0_renoise", 10, 1, 4, output_dim=3, sigmoid_channels=(1,)))
    np.testing.assert_allclose(out, [[[-1.0, 0.5, 2.0]]])
    assert state[0, 0, 1] == 0.0  # the input is left alone


def _manifest() -> Manifest:
    return Manifest(
        encoder="encoder.onnx",
        step="denoise_step.onnx",
        encoder_inputs={"pixel_values": ["batch", 3, 3, 64, 64]},
        encoder_outputs={"context": ["batch", 31, 32]},
        step_inputs={"x_t": ["batch", 30, 20]},
        step_outputs={"prediction": ["batch", 30, 20]},
        sampler=Sampler("x0_renoise", 10, 30, 20, 20, (9, 19)),
        num_views=3,
        image_size=64,
        max_text_len=12,
        vocab_size=300,
        proprio_dim=20,
        num_domains=4,
        domains={"arm": 2},
    )


def test_manifest_round_trips_through_json() -> None:
    manifest = _manifest()
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_manifest_errors_name_the_problem() -> None:
    data = _manifest().to_dict()
    with pytest.raises(ValueError, match="expected format 'xvla-onnx' version 1"):
        Manifest.from_dict({**data, "version": 2})
    del data["sampler"]["objective"]
    with pytest.raises(ValueError, match="malformed"):
        Manifest.from_dict(data)


def test_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        OnnxGenerator(tmp_path)
