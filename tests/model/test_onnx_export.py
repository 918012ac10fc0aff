"""ONNX export: the two graphs run by the torch-free runtime give the eager model's actions on the same noise
(dynamic batch, domain ids, shared fixtures), and the manifest describes them.

Every export pays torch's exporter set-up (its op registry is rebuilt per call: 10-20 s warm, 45 s cold for one
nn.Linear on the shared 2-core development machine at load 9) plus the tracing; the small model's first export took
4 minutes there (at load 9), so every test that exports is `slow` except the parity at other batch sizes, which
pays the one export of the default run. The default run also keeps what needs no export (finish settings,
arguments; the runtime's own tests are in tests/serve/test_onnx_runtime.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir
from xvla.config import XVLAConfig
from xvla.model import XVLA
from xvla.model.action_spaces import build_action_space
from xvla.model.flow import OBJECTIVES
from xvla.model.onnx_export import TRACE_BATCH, export_onnx, finish_settings
from xvla.model.parity import refs_batch
from xvla.serve.onnx_runtime import OnnxGenerator, Sampler, finish
from xvla.serve.protocol import NonFiniteActionError

from .model_helpers import make_batch, small_config

torch.set_num_threads(1)  # the CI machine has 2 shared cores
TOL = 1e-4  # max |onnx - eager| / max |eager|
SRC = Path(__file__).resolve().parents[2] / "src"


def _need_onnx() -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'xvla[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'xvla[onnx]')")


@dataclass
class Exported:
    model: XVLA
    runtime: OnnxGenerator
    folder: Path


def _export(model: XVLA, root: Path) -> Exported:
    model.save_pretrained(root / "checkpoint")
    (root / "checkpoint" / "sources.json").write_text(json.dumps({"arm": {"domain_id": 2}}))
    result = export_onnx(root / "checkpoint", root / "onnx")
    return Exported(model, OnnxGenerator(result.folder, threads=1), result.folder)


def _numpy(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


def _noise(model: XVLA, b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, model.config.num_actions, model.action_space.dim, generator=g)


def _rel(got: np.ndarray, want: torch.Tensor) -> float:
    return float(np.abs(got - want.numpy()).max() / want.abs().max())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The small test config exported once (traced at batch TRACE_BATCH), shared by the module's slow tests."""
    _need_onnx()
    torch.manual_seed(0)
    return _export(XVLA(small_config()).eval(), tmp_path_factory.mktemp("onnx_small"))


# not slow: the one export CI pays, so parity with eager is always checked
@pytest.mark.parametrize("b", [1, 3])
def test_actions_match_eager_at_other_batch_sizes(small: Exported, b: int) -> None:
    assert b != TRACE_BATCH
    batch = make_batch(small.model.config, b=b, seed=b)  # the last sample has one view and padded text
    noise = _noise(small.model, b)
    want = small.model.generate(batch, noise=noise)
    got = small.runtime.generate(_numpy(batch), noise.numpy())
    assert got.shape == tuple(want.shape) and got.dtype == np.float32
    assert _rel(got, want) < TOL


@pytest.mark.slow
def test_domain_id_is_gathered_inside_the_graphs(small: Exported) -> None:
    """The same observation under two domain ids: per-domain outputs, each the eager model's."""
    one = make_batch(small.model.config, b=1, seed=7)
    batch = {k: v.expand(2, *v.shape[1:]).clone() for k, v in one.items()}
    batch["domain_id"] = torch.tensor([0, 3])
    noise = _noise(small.model, 1).expand(2, -1, -1).clone()
    want = small.model.generate(batch, noise=noise)
    got = small.runtime.generate(_numpy(batch), noise.numpy())
    assert _rel(got, want) < TOL
    assert np.abs(got[0] - got[1]).max() > 1e-2  # the domains differ


@pytest.mark.slow
def test_fewer_views_and_other_step_counts(small: Exported) -> None:
    batch = make_batch(small.model.config, b=2, seed=11, views=1)
    noise = _noise(small.model, 2)
    for steps in (1, 4):
        want = small.model.generate(batch, noise=noise, steps=steps)
        assert _rel(small.runtime.generate(_numpy(batch), noise.numpy(), steps=steps), want) < TOL


@pytest.mark.slow
def test_manifest_describes_the_graphs(small: Exported) -> None:
    m = small.runtime.manifest
    cfg = small.model.config
    assert m.encoder_inputs == {
        "pixel_values": ["batch", cfg.num_views, 3, cfg.image_size, cfg.image_size],
        "image_mask": ["batch", cfg.num_views],
        "input_ids": ["batch", cfg.max_text_len],
        "domain_id": ["batch"],
    }
    assert list(m.encoder_outputs) == ["context"] and m.encoder_outputs["context"][0] == "batch"
    assert list(m.step_inputs) == ["x_t", "t", "proprio", "domain_id", "context"]
    assert m.step_outputs == {"prediction": ["batch", cfg.num_actions, 20]}
    assert m.sampler == Sampler("x0_renoise", cfg.num_steps, cfg.num_actions, 20, 20, (9, 19))
    assert (m.num_domains, m.domains) == (cfg.head.num_domains, {"arm": 2})


@pytest.mark.slow
def test_bad_inputs_are_refused_by_name(small: Exported) -> None:
    inputs = _numpy(make_batch(small.model.config, b=2))
    run = small.runtime.generate
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(2, 12\)"):
        run({**inputs, "input_ids": inputs["input_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"domain_id: expected values in \[0, 4\)"):
        run({**inputs, "domain_id": np.array([0, 4])})
    with pytest.raises(ValueError, match=r"input_ids: token ids must lie in \[0, 300\)"):
        run({**inputs, "input_ids": np.full((2, 12), 300)})
    with pytest.raises(KeyError, match="proprio"):
        run({k: v for k, v in inputs.items() if k != "proprio"})
    with pytest.raises(ValueError, match="proprio: contains NaN"):
        run({**inputs, "proprio": np.full((2, 20), np.nan, np.float32)})
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 30, 20\)"):
        run(inputs, np.zeros((2, 30, 7), np.float32))


@pytest.mark.slow
def test_non_finite_actions_are_never_returned(small: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    class NanStep:
        def run(self, names: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.full_like(feed["x_t"], np.nan)]

    monkeypatch.setattr(small.runtime, "step_session", NanStep())
    with pytest.raises(NonFiniteActionError):
        small.runtime.generate(_numpy(make_batch(small.model.config, b=1)))


@pytest.mark.slow
def test_runtime_runs_without_torch(small: Exported, tmp_path: Path) -> None:
    """The export runs in a process where torch cannot be imported, with the eager model's result."""
    batch = make_batch(small.model.config, b=2, seed=5)
    noise = _noise(small.model, 2)
    np.savez(tmp_path / "inputs.npz", noise=noise.numpy(), **_numpy(batch))
    np.save(tmp_path / "want.npy", small.model.generate(batch, noise=noise).numpy())
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from xvla.serve.onnx_runtime import OnnxGenerator
        data = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        noise = data.pop("noise")
        got = OnnxGenerator({str(small.folder)!r}, threads=1).generate(data, noise)
        want = np.load({str(tmp_path / "want.npy")!r})
        assert "xvla.model" not in sys.modules
        print(float(np.abs(got - want).max() / np.abs(want).max()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(SRC)},
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < TOL


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("space", ["ee6d", "joint", "agibot_ee6d", "auto"])
def test_finish_settings_reproduce_the_objective_finish(objective: str, space: str) -> None:
    action_space = build_action_space(space, real_dim=7, max_dim=20)
    output_dim, sigmoid = finish_settings(OBJECTIVES[objective], action_space)
    state = torch.randn(2, 3, action_space.dim, generator=torch.Generator().manual_seed(0))
    want = OBJECTIVES[objective].finish(state, action_space)
    got = finish(state.numpy(), Sampler(objective, 10, 3, action_space.dim, output_dim, sigmoid))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def test_bad_export_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset: expected >= 17"):
        export_onnx(tmp_path, tmp_path / "out", opset=16)
    with pytest.raises(ValueError, match="steps: expected >= 1"):
        export_onnx(tmp_path, tmp_path / "out", steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xvla_official_tiny", "xvla_lerobot_tiny"])
def test_shared_fixture_actions_match_eager_and_refs(name: str, tmp_path: Path) -> None:
    """The authors' and LeRobot's tiny checkpoints (224 px, 50 tokens): the recorded noise gives the eager
    model's and the fixture's actions (minutes: the 224 px encoder's export)."""
    _need_onnx()
    folder = fixture_dir(name)
    refs = load_file(str(folder / "refs.safetensors"))
    result = export_onnx(folder, tmp_path / "onnx")
    batch = refs_batch(refs)
    noise = refs["gen_x1_noise"]
    got = OnnxGenerator(result.folder, threads=1).generate(_numpy(batch), noise.numpy())
    assert _rel(got, XVLA.from_pretrained(folder).generate(batch, noise=noise)) < TOL
    assert _rel(got, refs["gen_actions"]) < TOL


@pytest.mark.slow
def test_masked_velocity_auto_model_matches_eager(tmp_path: Path) -> None:
    """The options the released models do not use: key masks (an extra graph output/input), the velocity
    objective's Euler loop and the `auto` space's trim."""
    _need_onnx()
    cfg: XVLAConfig = small_config(
        mask_text_padding=True,
        mask_missing_views=True,
        objective="velocity",
        action_space="auto",
        real_action_dim=7,
    )
    torch.manual_seed(0)
    exported = _export(XVLA(cfg).eval(), tmp_path)
    m = exported.runtime.manifest
    assert "attention_mask" in m.encoder_inputs and list(m.encoder_outputs) == ["context", "key_mask"]
    assert (m.sampler.objective, m.sampler.output_dim, m.sampler.sigmoid_channels) == ("velocity", 7, ())
    batch = make_batch(cfg, b=3, seed=3)
    noise = _noise(exported.model, 3)
    want = exported.model.generate(batch, noise=noise)
    got = exported.runtime.generate(_numpy(batch), noise.numpy())
    assert got.shape == (3, cfg.num_actions, 7)
    assert _rel(got, want) < TOL
