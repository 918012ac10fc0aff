"""Run an exported X-VLA (`xvla.model.onnx_export`) with onnxruntime and numpy only: no torch, no model code.

    policy = OnnxGenerator("exported/")                        # manifest.json + encoder.onnx + denoise_step.onnx
    actions = policy.generate(inputs, noise=None)              # [B, T, A_out] float32

Input contract: `inputs` are the **model inputs**, already prepared as `xvla.data.transforms.ObservationTransform`
(train=False) + `collate` prepare them for `XVLA.generate` (numpy arrays, batch first):

| key | shape, dtype | |
|---|---|---|
| `pixel_values` | `[B, V, 3, S, S]` float32 | ImageNet-normalised RGB, primary view first, V <= num_views (padded here) |
| `image_mask` | `[B, V]` bool | True where the view exists |
| `input_ids` | `[B, L]` int64 | tokenised instruction, padded/truncated to exactly L = max_text_len |
| `attention_mask` | `[B, L]` int64 | read only when the manifest lists it as a graph input (`config.mask_text_padding`) |
| `proprio` | `[B, P]` float32 | canonical proprio (raw gripper: the graph zeroes it where the model does) |
| `domain_id` | `[B]` int64 | soft-prompt / per-domain layer index (gathered inside the graphs) |

Images are resized and normalised, and instructions tokenised, by the caller (the training transform uses torch).
The output is what `XVLA.generate` returns: canonical anchors `[B, T, A_out]` (gripper sigmoid or `auto` trim
applied); converting them to robot-native actions is the caller's (`Source.canonical_to_native` on the server).

The sampler loop of `xvla.model.flow` runs here in numpy over the step graph, with the same single noise draw
(`noise` [B, T, A] float32, given or drawn from `rng`), so the result matches the eager model on the same noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xvla.serve.protocol import NonFiniteActionError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "xvla-onnx"
MANIFEST_VERSION = 1

# dtype of each model input as the graphs read it
INPUT_DTYPES: dict[str, Any] = {
    "pixel_values": np.float32,
    "image_mask": np.bool_,
    "input_ids": np.int64,
    "attention_mask": np.int64,
    "proprio": np.float32,
    "domain_id": np.int64,
}


@dataclass(frozen=True)
class Sampler:
    """How the runtime turns step-graph calls into an action chunk (written by the exporter from the model).

    objective: name in `xvla.model.flow.OBJECTIVES` (a numpy twin in `SAMPLER_LOOPS`); steps: default network calls;
    num_actions T, action_dim A: the noise / state shape [B, T, A]; output_dim: channels kept by the finish;
    sigmoid_channels: channels the finish passes through a sigmoid (gripper logits)."""

    objective: str
    steps: int
    num_actions: int
    action_dim: int
    output_dim: int
    sigmoid_channels: tuple[int, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: the graphs, their inputs/outputs ({name: [dims]}, "batch" for the dynamic axis), the sampler
    and the model's input sizes and domains."""

    encoder: str
    step: str
    encoder_inputs: dict[str, list[int | str]]
    encoder_outputs: dict[str, list[int | str]]
    step_inputs: dict[str, list[int | str]]
    step_outputs: dict[str, list[int | str]]
    sampler: Sampler
    num_views: int
    image_size: int
    max_text_len: int
    vocab_size: int
    proprio_dim: int
    num_domains: int
    domains: dict[str, int] = field(default_factory=dict)  # source name -> domain id (from sources.json)
    opset: int = 18
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sampler"]["sigmoid_channels"] = list(self.sampler.sigmoid_channels)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{MANIFEST_NAME}: expected format {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}, "
                f"got {data.get('format')!r} version {data.get('version')!r}"
            )
        try:
            sampler = dict(data["sampler"])
            sampler["sigmoid_channels"] = tuple(sampler.get("sigmoid_channels", ()))
            return cls(**{**data, "sampler": Sampler(**sampler)})
        except (KeyError, TypeError) as err:
            raise ValueError(f"{MANIFEST_NAME}: malformed ({err})") from None


# ------------------------------------------------------------------------------------------------ sampler loops
Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SamplerLoop:
    """numpy twin of a `xvla.model.flow.FlowObjective`'s sampler (grid, start, net_input, step), float32
    arithmetic as the eager loop does it; tests check each against the torch objective."""

    grid: Callable[[int], list[float]]
    start: Callable[[np.ndarray], np.ndarray]
    net_input: Callable[[np.ndarray, np.ndarray, np.float32], np.ndarray]
    step: Callable[[np.ndarray, np.ndarray, int], np.ndarray]

    def sample(self, denoise: Denoiser, noise: np.ndarray, steps: int) -> np.ndarray:
        """Raw sampler output [B, T, A] (not finished) from noise [B, T, A] float32 in `steps` calls of
        `denoise(x_t [B, T, A], t [B]) -> [B, T, A]`."""
        b = noise.shape[0]
        state = self.start(noise)
        for tk in self.grid(steps):
            t = np.float32(tk)
            state = self.step(state, denoise(self.net_input(state, noise, t), np.full((b,), t)), steps)
        return state


SAMPLER_LOOPS: dict[str, SamplerLoop] = {
    # re-noise the current clean estimate with the one noise draw at t = 1, (N-1)/N, ..., 1/N
    "x0_renoise": SamplerLoop(
        grid=lambda n: [i / n for i in range(n, 0, -1)],
        start=np.zeros_like,
        net_input=lambda state, noise, t: t * noise + (np.float32(1) - t) * state,
        step=lambda state, pred, n: pred,
    ),
    # Euler from t = 0 (noise) to t = 1 (action)
    "velocity": SamplerLoop(
        grid=lambda n: [i * (1.0 / n) for i in range(n)],
        start=lambda noise: noise,
        net_input=lambda state, noise, t: state,
        step=lambda state, pred, n: state + np.float32(1.0 / n) * pred,
    ),
}


def finish(state: np.ndarray, sampler: Sampler) -> np.ndarray:
    """Final sampler state [B, T, A] -> chunk [B, T, output_dim]: sigmoid on `sigmoid_channels`, then the trim."""
    out = state.copy()
    if sampler.sigmoid_channels:
        idx = list(sampler.sigmoid_channels)
        out[..., idx] = 1.0 / (1.0 + np.exp(-out[..., idx]))
    return out[..., : sampler.output_dim]


# ------------------------------------------------------------------------------------------------------ runtime
def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "the ONNX runtime needs onnxruntime: pip install 'xvla[onnx]' (or onnxruntime / onnxruntime-gpu)"
        ) from None
    return onnxruntime


class OnnxGenerator:
    """The two exported graphs plus the numpy sampler: `generate(inputs, noise) -> [B, T, A_out]` like
    `XVLA.generate` (see the module doc for the input contract)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        seed: int | None = None,
    ) -> None:
        """folder: an export (`manifest.json` + graphs); providers: onnxruntime execution providers (default CPU);
        threads: intra-op threads (None: onnxruntime's default); seed: of the noise drawn when none is given."""
        self.folder = Path(folder)
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"not an ONNX export: {path} is missing (write one with `xvla export CKPT OUT --format onnx`)"
            )
        ort = _import_onnxruntime()
        self.manifest = Manifest.from_dict(json.loads(path.read_text()))
        sampler = self.manifest.sampler
        if sampler.objective not in SAMPLER_LOOPS:
            raise ValueError(
                f"{path}: sampler.objective {sampler.objective!r} has no numpy sampler here; "
                f"known: {sorted(SAMPLER_LOOPS)}"
            )
        self.loop = SAMPLER_LOOPS[sampler.objective]
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])
        self.encoder_session = ort.InferenceSession(
            str(self.folder / self.manifest.encoder), options, providers=providers
        )
        self.step_session = ort.InferenceSession(
            str(self.folder / self.manifest.step), options, providers=providers
        )
        self.rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------------------------------------ inputs
    def prepare(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validated encoder inputs (dtypes cast, views padded to num_views); raises ValueError naming the field."""
        m = self.manifest
        needed = list(dict.fromkeys([*m.encoder_inputs, "domain_id", "proprio"]))  # the step graph's too
        missing = [k for k in needed if k not in inputs]
        if missing:
            raise KeyError(f"model inputs are missing {missing}; expected keys {needed}")
        arrays = {k: np.asarray(inputs[k]) for k in needed}
        for k, a in arrays.items():
            if a.dtype.kind not in "biuf":
                raise ValueError(f"{k}: expected a numeric array, got dtype {a.dtype}")
            arrays[k] = a.astype(INPUT_DTYPES[k], copy=False)
        pv = arrays["pixel_values"]
        s = m.image_size
        if pv.ndim != 5 or pv.shape[2:] != (3, s, s) or not 1 <= pv.shape[1] <= m.num_views:
            raise ValueError(
                f"pixel_values: expected [B, V, 3, {s}, {s}] with 1 <= V <= {m.num_views}, got {pv.shape}"
            )
        b, v = pv.shape[:2]
        expected = {
            "image_mask": (b, v),
            "input_ids": (b, m.max_text_len),
            "attention_mask": (b, m.max_text_len),
            "proprio": (b, m.proprio_dim),
            "domain_id": (b,),
        }
        for k, shape in expected.items():
            if k in arrays and arrays[k].shape != shape:
                raise ValueError(f"{k}: expected shape {shape}, got {arrays[k].shape}")
        dom, ids = arrays["domain_id"], arrays["input_ids"]
        if dom.size and (dom.min() < 0 or dom.max() >= m.num_domains):
            raise ValueError(f"domain_id: expected values in [0, {m.num_domains}), got {dom.tolist()}")
        if ids.size and (ids.min() < 0 or ids.max() >= m.vocab_size):
            raise ValueError(f"input_ids: token ids must lie in [0, {m.vocab_size}) (the model's vocabulary)")
        if not np.isfinite(arrays["proprio"]).all():
            raise ValueError("proprio: contains NaN or inf")
        if not np.isfinite(pv).all():
            raise ValueError("pixel_values: contains NaN or inf")
        if v < m.num_views:  # missing views: zero images, masked (what the eager encoder does)
            arrays["pixel_values"] = np.concatenate(
                [pv, np.zeros((b, m.num_views - v, 3, s, s), pv.dtype)], 1
            )
            arrays["image_mask"] = np.concatenate(
                [arrays["image_mask"], np.zeros((b, m.num_views - v), bool)], 1
            )
        return arrays

    # ---------------------------------------------------------------------------------------------- sampling
    def generate(
        self, inputs: Mapping[str, Any], noise: np.ndarray | None = None, *, steps: int | None = None
    ) -> np.ndarray:
        """Action chunk [B, T, A_out] float32 from model inputs (module doc) and noise [B, T, A] (drawn from
        `self.rng` when None); `steps` network calls (default: the manifest's)."""
        sampler = self.manifest.sampler
        arrays = self.prepare(inputs)
        b = arrays["proprio"].shape[0]
        shape = (b, sampler.num_actions, sampler.action_dim)
        if noise is None:
            noise = self.rng.standard_normal(shape, dtype=np.float32)
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != shape:
            raise ValueError(f"noise: expected shape {shape}, got {noise.shape}")
        steps = sampler.steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")

        encoded = self.encoder_session.run(None, {k: arrays[k] for k in self.manifest.encoder_inputs})
        fixed = dict(zip(self.manifest.encoder_outputs, encoded, strict=True))
        fixed.update(proprio=arrays["proprio"], domain_id=arrays["domain_id"])

        def denoise(x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
            return self.step_session.run(None, {**fixed, "x_t": x_t, "t": t})[0]

        actions = finish(self.loop.sample(denoise, noise, steps), sampler)
        if not np.isfinite(actions).all():
            raise NonFiniteActionError("the exported model produced NaN or inf actions")
        return actions
