"""`Policy`: a checkpoint plus a robot description (`Source`) -> native actions at the robot's control rate.

Two request formats:

- **Source** (a robot described by `xvla.data.sources.Source`): ``{"images": {camera_key: uint8 [H, W, 3]},
  "state": native [S], "instruction": str, "domain": optional source name}``. The state goes to canonical
  space through the Source, images are flipped as the Source says, and the same `ObservationTransform`
  (train=False) as training builds the model batch. The 30 canonical anchors, which span the source's
  horizon, are resampled to ``round(horizon_s * control_hz)`` steps at the control rate (same interpolation
  as the training targets: `xvla.data.anchors.interpolate`) and converted back by `Source.canonical_to_native`.
  Reply: ``actions`` [K, native_dim], ``anchors`` [30, A] (canonical), ``domain``.
- **Raw model protocol** (no Source; the authors' `/act` fields): ``image0`` (required), ``image1``,
  ``image2``, ``language_instruction``, ``proprio`` (canonical [P]), ``domain_id``, optional ``steps``.
  Reply: ``actions`` = the 30 canonical anchors [30, A].

`step(obs)` drives a robot one action at a time from a chunk queue (re-querying when `execute_steps` actions
have been used); with ``proprio_mode="open_loop"`` (the authors' clients) the proprio of each new query is
the last executed predicted pose instead of the sensed one.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from xvla.data.anchors import resample_chunk
from xvla.data.sources import Mixture, Source
from xvla.data.transforms import ObservationTransform, collate
from xvla.model.checkpoint import resolve_folder
from xvla.model.fast.sampling import fast_generator
from xvla.model.tokenizer import load_tokenizer
from xvla.model.xvla import XVLA
from xvla.serve import protocol
from xvla.serve.protocol import RequestError

logger = logging.getLogger(__name__)

SOURCES_FILE = "sources.json"
RAW_CAMERAS = ("image0", "image1", "image2")
MAX_STEPS = 100
# Canonical proprio is metres, rot6d columns and a 0..1 gripper: beyond this it is a unit or encoding error,
# and the float32 network turns such values into meaningless or non-finite actions.
MAX_PROPRIO_ABS = 1e4
_PROPRIO_HINT = " (canonical poses are metres, rot6d columns and a 0..1 gripper: check the units)"
ProprioMode = Literal["sensed", "open_loop"]


class NonFiniteActionError(RuntimeError):
    """The model's output for a request holds NaN or inf: it is never sent to a robot."""


@dataclass(frozen=True)
class PolicyConfig:
    steps: int = 10  # denoising steps per query (a raw request may override with `steps`)
    proprio_mode: ProprioMode = "sensed"  # "open_loop": next query's proprio = last executed predicted pose
    execute_steps: int | None = None  # actions `step()` executes per query; None = the whole chunk
    seed: int | None = None  # fixed noise for every request (reproducible serving); None = fresh noise
    fast: bool | None = None  # model's fast inference path; None = on for CUDA devices, off elsewhere

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"PolicyConfig.steps: expected 1..{MAX_STEPS}, got {self.steps}")
        if self.proprio_mode not in ("sensed", "open_loop"):
            raise ValueError(
                f"PolicyConfig.proprio_mode: expected 'sensed' or 'open_loop', got {self.proprio_mode!r}"
            )
        if self.execute_steps is not None and self.execute_steps < 1:
            raise ValueError(f"PolicyConfig.execute_steps: expected >= 1 or None, got {self.execute_steps}")


@dataclass
class Prepared:
    """One validated request: unbatched model inputs plus what post-processing needs."""

    inputs: dict[str, Tensor]
    steps: int
    proprio: np.ndarray  # canonical [P] given to the model
    source: Source | None  # None: raw protocol, anchors are the answer
    state: np.ndarray | None  # native reference state [S] (Source requests)


def load_sources(folder: str | Path) -> dict[str, Source]:
    """`sources.json` of a checkpoint folder (a mixture dict, a list, or a name -> source map); {} if absent."""
    path = Path(folder) / SOURCES_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "sources" not in data:
        data = [{"name": name, **spec} for name, spec in data.items()]
    return {s.name: s for s in Mixture.from_dict(data).sources}


class Policy:
    """Serving-side wrapper of an `XVLA` model (see the module doc for the request formats)."""

    def __init__(
        self,
        model: XVLA,
        tokenizer: Any,
        *,
        source: Source | None = None,
        sources: Mapping[str, Source] | None = None,
        config: PolicyConfig = PolicyConfig(),
        device: str | torch.device | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.transform = ObservationTransform(model.config, tokenizer, train=False)
        self.sources: dict[str, Source] = dict(sources or {})
        if source is not None:
            self.sources[source.name] = source
        self.source = source
        if source is not None:
            self._check_source(source)
        # The fast path is the default on GPU (where it pays: CUDA graph, 16-bit weights); eager elsewhere.
        self.fast = self.device.type == "cuda" if config.fast is None else config.fast
        self._queue: list[np.ndarray] = []
        self._next_proprio: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(
        cls,
        path_or_hub_id: str | Path,
        source: Source | str | None = None,
        device: str | torch.device | None = None,
        steps: int = 10,
        *,
        proprio_mode: ProprioMode = "sensed",
        execute_steps: int | None = None,
        seed: int | None = None,
        fast: bool | None = None,
        revision: str | None = None,
    ) -> Policy:
        """Load a checkpoint folder or hub id. `source`: a Source, the name of one in the checkpoint's
        `sources.json`, a path to a Source JSON/YAML file, or None (raw model protocol)."""
        folder = resolve_folder(path_or_hub_id, revision)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = XVLA.from_pretrained(folder, device=device)
        sources = load_sources(folder)
        if isinstance(source, str):
            source = _resolve_source(source, sources, folder)
        config = PolicyConfig(
            steps=steps, proprio_mode=proprio_mode, execute_steps=execute_steps, seed=seed, fast=fast
        )
        return cls(
            model, load_tokenizer(folder), source=source, sources=sources, config=config, device=device
        )

    def with_source(self, source: Source | None) -> Policy:
        """A policy for another robot description sharing this model, tokenizer and settings."""
        return Policy(
            self.model,
            self.tokenizer,
            source=source,
            sources=self.sources,
            config=self.config,
            device=self.device,
        )

    def _check_source(self, source: Source) -> None:
        if source.action is None:
            raise ValueError(
                f"source {source.name!r} describes no action stream; serving needs `action` to write native actions"
            )
        if not 0 <= source.domain_id < self.model.num_domains:
            raise ValueError(
                f"source {source.name!r}: domain_id {source.domain_id} is not in this model's {self.model.num_domains} domains"
            )
        if source.canonical_dim != self.model.action_space.dim:
            raise ValueError(
                f"source {source.name!r}: canonical dim {source.canonical_dim} != model action dim {self.model.action_space.dim}"
            )

    # ---------------------------------------------------------------------------------------------- metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to build requests (sent by the server on connect)."""
        cfg = self.model.config
        common = {
            "format": "xvla",
            "num_anchors": cfg.num_actions,
            "steps": self.config.steps,
            "domains": {s.name: s.domain_id for s in self.sources.values()},
            "num_domains": self.model.num_domains,
        }
        if self.source is None:
            return {
                **common,
                "protocol": "raw",
                "cameras": list(RAW_CAMERAS[: cfg.num_views]),
                "required_cameras": ["image0"],
                "proprio_dim": cfg.proprio_dim,
                "action_space": cfg.action_space,
                "action_dim": self.model.action_space.dim,
                "chunk_length": cfg.num_actions,
                "control_hz": None,
            }
        s = self.source
        assert s.action is not None
        return {
            **common,
            "protocol": "source",
            "domain": s.name,
            "cameras": [c.key for c in s.cameras],
            "state_key": s.state.key,
            "state_dim": s.state.dim,
            "action_key": s.action.key,
            "action_dim": s.action.dim,
            "action_convention": s.to_dict()["action"],
            "chunk_length": _chunk_length(s),
            "control_hz": s.control_hz,
            "horizon_s": s.horizon_s,
            "instruction": s.instruction,
        }

    # ----------------------------------------------------------------------------------------------- requests
    def prepare(self, obs: Mapping[str, Any], *, proprio: np.ndarray | None = None) -> Prepared:
        """Validate one request in this policy's format and build its model inputs (raises RequestError).
        `proprio` overrides the canonical proprio (open-loop mode)."""
        if self.source is None:
            return self.prepare_raw(obs, proprio=proprio)
        if not isinstance(obs, Mapping):
            raise RequestError(f"observation must be a map, got {type(obs).__name__}")
        source = self._request_source(obs)
        state = protocol.vector(protocol.required(obs, "state"), "state", source.state.dim)
        images_in = protocol.required(obs, "images")
        if not isinstance(images_in, Mapping):
            raise RequestError(
                f"images: expected a map camera key -> uint8 [H, W, 3], got {type(images_in).__name__}"
            )
        unknown = sorted(set(map(str, images_in)) - {c.key for c in source.cameras})
        if unknown:
            raise RequestError(
                f"images: unknown camera(s) {unknown}; source {source.name!r} has {[c.key for c in source.cameras]}"
            )
        images = []
        for cam in source.cameras:
            if cam.key not in images_in:
                raise RequestError(
                    f"images: missing camera {cam.key!r} (source {source.name!r} needs {[c.key for c in source.cameras]})"
                )
            images.append(cam.apply(protocol.image(images_in[cam.key], f"images[{cam.key!r}]")))
        if "instruction" in obs or source.instruction is None:
            instruction = protocol.text(protocol.required(obs, "instruction"), "instruction")
        else:
            instruction = source.instruction
        try:
            canonical = source.state_to_canonical(state) if proprio is None else proprio
        except ValueError as err:  # e.g. a zero quaternion
            raise RequestError(f"state: {err}") from None
        if not np.isfinite(canonical).all():
            raise RequestError("state: gives a non-finite canonical pose (check units and rotation format)")
        protocol.bounded(canonical, "state: canonical proprio", MAX_PROPRIO_ABS, _PROPRIO_HINT)
        steps = self._steps(obs)
        return Prepared(
            self._inputs(images, instruction, canonical, source.domain_id), steps, canonical, source, state
        )

    def prepare_raw(self, obs: Mapping[str, Any], *, proprio: np.ndarray | None = None) -> Prepared:
        """Validate one request in the raw model protocol (the authors' /act fields)."""
        if not isinstance(obs, Mapping):
            raise RequestError(f"observation must be a map, got {type(obs).__name__}")
        cfg = self.model.config
        images = [protocol.image(protocol.required(obs, "image0"), "image0")]
        for i, key in enumerate(RAW_CAMERAS[1:], start=1):
            if obs.get(key) is None:
                continue
            if i >= cfg.num_views:
                raise RequestError(f"{key}: this model takes {cfg.num_views} view(s)")
            if len(images) != i:
                raise RequestError(
                    f"{key}: given without {RAW_CAMERAS[i - 1]} (views fill image0, image1, image2 in order)"
                )
            images.append(protocol.image(obs[key], key))
        instruction = protocol.text(protocol.required(obs, "language_instruction"), "language_instruction")
        canonical = (
            protocol.vector(
                protocol.required(obs, "proprio"), "proprio", cfg.proprio_dim, MAX_PROPRIO_ABS, _PROPRIO_HINT
            )
            if proprio is None
            else proprio
        )
        domain_id = protocol.integer(
            protocol.required(obs, "domain_id"), "domain_id", 0, self.model.num_domains - 1
        )
        return Prepared(
            self._inputs(images, instruction, canonical, domain_id), self._steps(obs), canonical, None, None
        )

    def _request_source(self, obs: Mapping[str, Any]) -> Source:
        name = obs.get("domain")
        if name is None:
            assert self.source is not None
            return self.source
        name = protocol.text(name, "domain")
        if name not in self.sources:
            raise RequestError(f"domain: unknown domain {name!r}; known domains: {sorted(self.sources)}")
        source = self.sources[name]
        if source is not self.source:
            try:
                self._check_source(source)
            except ValueError as err:
                raise RequestError(f"domain: {err}") from None
        return source

    def _steps(self, obs: Mapping[str, Any]) -> int:
        return (
            protocol.integer(obs["steps"], "steps", 1, MAX_STEPS)
            if obs.get("steps") is not None
            else self.config.steps
        )

    def _inputs(
        self, images: list[np.ndarray], instruction: str, proprio: np.ndarray, domain_id: int
    ) -> dict[str, Tensor]:
        raw = {
            "images": images,
            "instruction": instruction,
            "proprio": np.asarray(proprio, dtype=np.float32),
            "domain_id": int(domain_id),
        }
        return self.transform(raw)

    # ------------------------------------------------------------------------------------------------- model
    def _noise(self, n: int) -> Tensor:
        shape = (self.model.config.num_actions, self.model.action_space.dim)
        if self.config.seed is None:
            return torch.randn(n, *shape)
        # The same draw for every request, whatever batch it lands in: serving is reproducible.
        one = torch.randn(*shape, generator=torch.Generator().manual_seed(self.config.seed))
        return one.expand(n, *shape).clone()

    @torch.inference_mode()
    def run(self, prepared: Sequence[Prepared]) -> list[dict[str, Any]]:
        """Batched sampling for validated requests (grouped by step count) -> one reply per request.
        Raises NonFiniteActionError rather than return a reply holding NaN or inf."""
        anchors: list[np.ndarray] = [np.empty(0)] * len(prepared)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prepared):
            groups[p.steps].append(i)
        for steps, idx in groups.items():
            batch = {k: v.to(self.device) for k, v in collate([prepared[i].inputs for i in idx]).items()}
            noise = self._noise(len(idx)).to(self.device)
            generate = fast_generator(self.model) if self.fast else self.model.generate
            chunk = generate(batch, steps=steps, noise=noise)
            for i, a in zip(idx, chunk.float().cpu().numpy(), strict=True):
                anchors[i] = a
        replies = [self._reply(p, a) for p, a in zip(prepared, anchors, strict=True)]
        for i, reply in enumerate(replies):
            for key, value in reply.items():
                if isinstance(value, np.ndarray) and not np.isfinite(value).all():
                    which = f" (request {i} of a batch of {len(replies)})" if len(replies) > 1 else ""
                    raise NonFiniteActionError(
                        f"the model produced non-finite {key} (NaN or inf){which}; they are not returned "
                        "(check the checkpoint's weights and the request's magnitudes)"
                    )
        return replies

    def _reply(self, p: Prepared, anchors: np.ndarray) -> dict[str, Any]:
        if p.source is None:
            return {"actions": anchors}
        canonical = resample_anchors(p.source, p.proprio, anchors)
        assert p.state is not None
        native = p.source.canonical_to_native(canonical, p.state).astype(np.float32)
        return {
            "actions": native,
            "anchors": anchors,
            "canonical": canonical.astype(np.float32),
            "domain": p.source.name,
        }

    # ------------------------------------------------------------------------------------------------ public
    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """One observation -> reply dict (`actions` [K, native_dim] with a Source, else [30, A] anchors)."""
        return self.run([self.prepare(obs)])[0]

    def infer_batch(self, observations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Several observations in one forward pass (what the server's dynamic batching calls)."""
        return self.run([self.prepare(obs) for obs in observations])

    def step(self, obs: Mapping[str, Any]) -> np.ndarray:
        """One native action; queries the model when the queue is empty (every `execute_steps` actions)."""
        if not self._queue:
            override = self._next_proprio if self.config.proprio_mode == "open_loop" else None
            reply = self.run([self.prepare(obs, proprio=override)])[0]
            n = min(self.config.execute_steps or len(reply["actions"]), len(reply["actions"]))
            self._queue = list(reply["actions"][:n])
            predicted = reply.get("canonical", reply["actions"])
            self._next_proprio = np.asarray(predicted[n - 1], dtype=np.float64)
        return self._queue.pop(0)

    def reset(self) -> None:
        """Forget the action queue and the open-loop pose (call at every episode start)."""
        self._queue = []
        self._next_proprio = None


def _chunk_length(source: Source) -> int:
    return max(1, round(source.horizon_s * source.control_hz))


def resample_anchors(source: Source, proprio: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Canonical anchors [30, P] spanning `source.horizon_s` (the proprio at 0) -> canonical poses [K, P] at the
    control rate, K = horizon * hz: the training interpolation (`anchors.resample_chunk`) with the source's
    conventions."""
    return resample_chunk(
        np.asarray(proprio)[: anchors.shape[1]],
        anchors,
        source.horizon_s,
        source.control_hz,
        num_arms=source.num_arms,
        rot6d_layout=source.rot6d_layout,
        binary_grippers=source.binary_grippers,
    )


def _resolve_source(name: str, sources: Mapping[str, Source], folder: Path) -> Source:
    if name in sources:
        return sources[name]
    path = Path(name)
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        import yaml  # JSON is YAML

        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "name" in data:
            return Source.from_dict(data)
        found = Mixture.load(path).sources
        if len(found) != 1:
            raise ValueError(
                f"source file {path}: expected one source (or name it with --source NAME), found {[s.name for s in found]}"
            )
        return found[0]
    raise ValueError(
        f"source {name!r}: not in {folder / SOURCES_FILE} (known: {sorted(sources)}) and not a source file"
    )
