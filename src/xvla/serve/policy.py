"""`Policy`: a checkpoint plus a robot description (`Source`) -> native actions at the robot's control rate.

Requests come in one of the formats of `xvla.serve.codecs`: **source** when the policy has a Source (the robot's
native state and camera images in, native actions at its control rate out), else **raw** (the model's fields as
the authors name them, the 30 canonical anchors out). Either way the same `ObservationTransform` (train=False) as
training builds the model batch.

`step(obs)` drives a robot one action per control tick with an execution strategy (`xvla.serve.execution`:
synchronous by default, temporal ensembling, real-time chunking), through the same `Executor` and `Session` as
the client and the server; `latency_steps` simulates an inference delay in ticks (evaluation). With
``proprio_mode="open_loop"`` (the authors' clients) the proprio of each new query is the last executed predicted
pose instead of the sensed one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from xvla import devices
from xvla.data.sources import Mixture, Source
from xvla.data.transforms import ObservationTransform, collate
from xvla.model.checkpoint import SOURCES_NAME, read_sources, resolve_folder
from xvla.model.fast.sampling import fast_generator
from xvla.model.flow import Inpainting
from xvla.model.tokenizer import load_tokenizer
from xvla.model.xvla import XVLA
from xvla.serve.codecs import RAW, SOURCE, Codec, Prepared
from xvla.serve.codecs.base import MAX_STEPS
from xvla.serve.execution import STRATEGIES, Executor, SimulatedLatency, Strategy, Synchronous
from xvla.serve.protocol import NonFiniteActionError, RequestError, check_finite_reply
from xvla.serve.session import Session

logger = logging.getLogger(__name__)

ProprioMode = Literal["sensed", "open_loop"]


@dataclass(frozen=True)
class PolicyConfig:
    steps: int = 10  # denoising steps per query (a raw request may override with `steps`)
    proprio_mode: ProprioMode = "sensed"  # "open_loop": next query's proprio = last executed predicted pose
    execution: Strategy = Synchronous()  # how `step()` turns chunks into actions
    latency_steps: int = 0  # `step()`: replies arrive this many control ticks after their query (simulated)
    seed: int | None = None  # fixed noise for every request (reproducible serving); None = fresh noise
    fast: bool | None = None  # model's fast inference path; None = on for CUDA devices, off elsewhere
    # Sampling temperature: the flow starts from noise x `noise_scale` (1: the trained distribution; 0: one
    # deterministic chunk per observation, the flow's path from the noise mean).
    noise_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"PolicyConfig.steps: expected 1..{MAX_STEPS}, got {self.steps}")
        if self.proprio_mode not in ("sensed", "open_loop"):
            raise ValueError(
                f"PolicyConfig.proprio_mode: expected 'sensed' or 'open_loop', got {self.proprio_mode!r}"
            )
        if not isinstance(self.execution, tuple(STRATEGIES.values())):
            raise ValueError(
                f"PolicyConfig.execution: expected one of {sorted(STRATEGIES)} strategies, got {self.execution!r}"
            )
        if self.latency_steps < 0:
            raise ValueError(f"PolicyConfig.latency_steps: expected >= 0, got {self.latency_steps}")
        if not 0.0 <= self.noise_scale <= 1.0:
            raise ValueError(f"PolicyConfig.noise_scale: expected a value in [0, 1], got {self.noise_scale}")


def load_sources(folder: str | Path) -> dict[str, Source]:
    """The sources of a checkpoint folder (`xvla.model.checkpoint.read_sources`), validated; {} if none."""
    specs = read_sources(folder)
    return {s.name: s for s in Mixture.from_dict(list(specs.values())).sources} if specs else {}


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
            self.check_source(source)
        self.codec: Codec = RAW if source is None else SOURCE  # the format of this policy's requests
        # The fast path is the default on GPU (where it pays: CUDA graph, 16-bit weights); eager elsewhere.
        self.fast = self.device.type == "cuda" if config.fast is None else config.fast
        self.session = Session(config.execution, model.config.num_actions)
        self.executor = Executor(
            config.execution,
            SimulatedLatency(self._answer_step, config.latency_steps),
            hold=self._hold if source is not None else None,
        )

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
        execution: Strategy = Synchronous(),
        latency_steps: int = 0,
        seed: int | None = None,
        fast: bool | None = None,
        noise_scale: float = 1.0,
        revision: str | None = None,
    ) -> Policy:
        """Load a checkpoint folder or hub id. `source`: a Source, the name of one in the checkpoint's
        `sources.json`, a path to a Source JSON/YAML file, or None (raw model protocol)."""
        folder = resolve_folder(path_or_hub_id, revision)
        if device is None:
            device = devices.resolve_device("auto")
        model = XVLA.from_pretrained(folder, device=device)
        sources = load_sources(folder)
        if isinstance(source, str):
            source = _resolve_source(source, sources, folder)
        config = PolicyConfig(
            steps=steps,
            proprio_mode=proprio_mode,
            execution=execution,
            latency_steps=latency_steps,
            seed=seed,
            fast=fast,
            noise_scale=noise_scale,
        )
        return cls(
            model, load_tokenizer(folder), source=source, sources=sources, config=config, device=device
        )

    def with_source(self, source: Source | None, config: PolicyConfig | None = None) -> Policy:
        """A policy for another robot description (or other settings) sharing this model and tokenizer."""
        return Policy(
            self.model,
            self.tokenizer,
            source=source,
            sources=self.sources,
            config=config or self.config,
            device=self.device,
        )

    def check_source(self, source: Source) -> None:
        """Refuse (ValueError) a source this model cannot serve."""
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
        source.check_views(self.model.config.num_views, self.model.config.mask_missing_views)

    # ---------------------------------------------------------------------------------------------- metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to build requests (sent by the server on connect)."""
        cfg = self.model.config
        return {
            "format": "xvla",
            "protocol": self.codec.name,
            "num_anchors": cfg.num_actions,
            "steps": self.config.steps,
            "domains": {s.name: s.domain_id for s in self.sources.values()},
            "num_domains": self.model.num_domains,
            **self.codec.metadata(self),
        }

    # ----------------------------------------------------------------------------------------------- requests
    def prepare(
        self, obs: Mapping[str, Any], *, proprio: np.ndarray | None = None, codec: Codec | None = None
    ) -> Prepared:
        """Validate one request and build its model inputs (raises RequestError). `codec`: its format (default
        this policy's); `proprio` overrides the canonical proprio (open-loop mode)."""
        if not isinstance(obs, Mapping):
            raise RequestError(f"observation must be a map, got {type(obs).__name__}")
        return (codec or self.codec).decode(self, obs, proprio)

    def model_inputs(
        self,
        images: list[np.ndarray],
        instruction: str,
        proprio: np.ndarray,
        domain_id: int,
        missing_views: str = "zeros",
    ) -> dict[str, Tensor]:
        """One request's unbatched model inputs, built by the training transform (what codecs decode into);
        `missing_views`: how views beyond `images` are filled (`xvla.data.sources.MISSING_VIEWS`)."""
        raw = {
            "images": images,
            "instruction": instruction,
            "proprio": np.asarray(proprio, dtype=np.float32),
            "domain_id": int(domain_id),
            "missing_views": missing_views,
        }
        return self.transform(raw)

    # ------------------------------------------------------------------------------------------------- model
    def _noise(self, n: int) -> Tensor:
        shape = (self.model.config.num_actions, self.model.action_space.dim)
        scale = self.config.noise_scale
        if self.config.seed is None:
            return torch.randn(n, *shape) * scale
        # The same draw for every request, whatever batch it lands in: serving is reproducible.
        one = torch.randn(*shape, generator=torch.Generator().manual_seed(self.config.seed))
        return one.expand(n, *shape) * scale

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
            chunk = generate(
                batch, steps=steps, noise=noise, inpaint=self._inpainting([prepared[i] for i in idx])
            )
            for i, a in zip(idx, chunk.float().cpu().numpy(), strict=True):
                anchors[i] = a
        replies = [p.codec.encode(p, a) for p, a in zip(prepared, anchors, strict=True)]
        for i, reply in enumerate(replies):
            check_finite_reply(
                reply, f" (request {i} of a batch of {len(replies)})" if len(replies) > 1 else ""
            )
        return replies

    def _inpainting(self, prepared: Sequence[Prepared]) -> Inpainting | None:
        """The batch's inpainting targets (weight 0, which changes nothing, for requests without); None if none
        has one: the sampler then runs exactly as without execution strategies."""
        if all(p.inpaint is None for p in prepared):
            return None
        t, dim = self.model.config.num_actions, self.model.action_space.input_dim
        actions, weight = (
            np.zeros((len(prepared), t, dim), np.float32),
            np.zeros((len(prepared), t), np.float32),
        )
        for i, p in enumerate(prepared):
            if p.inpaint is not None:
                actions[i], weight[i] = p.inpaint
        return Inpainting(torch.from_numpy(actions).to(self.device), torch.from_numpy(weight).to(self.device))

    # ------------------------------------------------------------------------------------------------ public
    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """One observation -> reply dict (`actions` [K, native_dim] with a Source, else [30, A] anchors)."""
        return self.run([self.prepare(obs)])[0]

    def infer_batch(self, observations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Several observations in one forward pass (what the server's dynamic batching calls)."""
        return self.run([self.prepare(obs) for obs in observations])

    def step(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The native action of this control tick under `config.execution` (module doc)."""
        return self.executor.step(obs)

    def reset(self) -> None:
        """Forget plans, ticks, delays and the open-loop pose (call at every episode start)."""
        self.session = Session(self.config.execution, self.model.config.num_actions)
        self.executor.reset()

    def _answer_step(self, request: dict[str, Any]) -> dict[str, Any]:
        """One `step` query through this policy's session (what the server does per connection)."""
        last = self.executor.last_canonical
        override = last if self.config.proprio_mode == "open_loop" else None
        prepared = self.session.attach(self.prepare(request, proprio=override), request)
        return self.session.finish(prepared, self.run([prepared])[0])

    def _hold(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The native action that keeps the robot where it is (what waiting for a reply means)."""
        source = self.source
        assert source is not None
        state = np.asarray(obs["state"], dtype=np.float64)
        return source.canonical_to_native(source.state_to_canonical(state)[None], state)[0].astype(np.float32)


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
        f"source {name!r}: not in {folder / SOURCES_NAME} (known: {sorted(sources)}) and not a source file"
    )


__all__ = ["NonFiniteActionError", "Policy", "PolicyConfig", "ProprioMode", "load_sources"]
