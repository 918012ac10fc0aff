"""The connection side of an execution strategy (`xvla.serve.execution`): one `Session` per client.

The server keeps one per WebSocket connection (created by the client's ``{"execution": {...}}`` message, freed
when the connection closes); an in-process `Policy` keeps one for its `step` loop. It holds what the strategy needs
between requests:

- the committed plan: the canonical poses of the latest reply (`RealTimeChunking`), or of every reply that still
  covers future ticks (`TemporalEnsemble`), each with the tick of its first action (its observation's, or the
  ``plan_start`` the client reports when it held still for that reply);
- the latency estimate: the largest delay (in control ticks) that the client measured over its last
  `DELAY_WINDOW` replies (RTC freezes that many steps, so an estimate on the high side is the safe one).

`attach` adds to a prepared request its tick and, for RTC, the inpainting target: the committed trajectory read
at the new chunk's anchor times with the training interpolation (`xvla.data.anchors.interpolate`, the
Source's conventions), in the same canonical space as the anchors, and the weight of each anchor. Times: anchor
j of a chunk answering tick t is the pose at ``t + (j + 1) * horizon_s / 30``; a plan's row k is the pose after
tick ``tick + k``, at ``(tick + k + 1) / control_hz``. Raw requests (no Source) count ticks in anchors. An anchor
is frozen when it is needed to interpolate a frozen tick (it lies at or just after the d-th tick); the overlap
ends where the committed plan ends.

`finish` records the reply and, for `TemporalEnsemble`, replaces its actions by the ensemble of every plan's
prediction for ticks ``tick, tick + 1, ...`` (canonical poses averaged, rot6d re-orthonormalised by the Source's
conversion to native actions).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xvla.data.anchors import interpolate
from xvla.serve import protocol
from xvla.serve.codecs import Prepared
from xvla.serve.execution import RealTimeChunking, Strategy, Synchronous, TemporalEnsemble

DELAY_WINDOW = 8  # replies the latency estimate looks back over
MAX_TICK = 2**62


@dataclass(frozen=True)
class Plan:
    """A reply's canonical poses [K, P]: row k is reached after tick `tick + k`."""

    tick: int
    canonical: np.ndarray

    @property
    def end(self) -> int:
        """The first tick it does not cover."""
        return self.tick + len(self.canonical)


@dataclass(frozen=True)
class Timing:
    """Seconds per control tick and per anchor (both 1 for raw requests: ticks are anchors)."""

    tick_s: float
    anchor_s: float

    @classmethod
    def of(cls, prepared: Prepared, num_anchors: int) -> Timing:
        s = prepared.source
        return cls(1.0, 1.0) if s is None else cls(1.0 / s.control_hz, s.horizon_s / num_anchors)


class Session:
    """Per-connection state of a strategy (module doc)."""

    def __init__(self, strategy: Strategy = Synchronous(), num_anchors: int = 30) -> None:
        self.strategy = strategy
        self.num_anchors = num_anchors  # anchors per chunk (the model's `num_actions`)
        self.plans: list[Plan] = []  # oldest first
        self.delays: deque[int] = deque(maxlen=DELAY_WINDOW)
        self.last_tick: int | None = None

    @property
    def delay_estimate(self) -> int:
        """Inference delay in ticks that the next chunk must absorb."""
        return max(self.delays, default=0)

    # ---------------------------------------------------------------------------------------------- requests
    def attach(self, prepared: Prepared, obs: Mapping[str, Any]) -> Prepared:
        """Validate a prepared request's ``tick`` / ``delay`` fields (RequestError naming the field), record the
        delay and, for RTC, attach the inpainting target. Returns `prepared`."""
        tick, delay, plan_start = self._timing_fields(obs)
        prepared.tick = tick
        if delay is not None:
            self.delays.append(delay)
        if plan_start is not None and self.plans:  # where the client really started the latest plan
            self.plans[-1] = Plan(plan_start, self.plans[-1].canonical)
        if isinstance(self.strategy, RealTimeChunking) and tick is not None and self.plans:
            prepared.inpaint = self.inpainting(prepared, tick)
        return prepared

    def _timing_fields(self, obs: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
        needs_tick = not isinstance(self.strategy, Synchronous)
        if obs.get("tick") is None:
            if needs_tick:
                raise protocol.RequestError(
                    f"tick: required with the {self.strategy.name!r} execution strategy (the control tick of "
                    "the observation, counted by the client)"
                )
            return None, None, None
        tick = protocol.integer(obs["tick"], "tick", 0, MAX_TICK)
        if self.last_tick is not None and tick < self.last_tick:
            raise protocol.RequestError(f"tick: {tick} is before the previous request's {self.last_tick}")
        delay, start = (
            None if obs.get(key) is None else protocol.integer(obs[key], key, 0, tick)
            for key in ("delay", "plan_start")
        )
        return tick, delay, start

    def inpainting(self, prepared: Prepared, tick: int) -> tuple[np.ndarray, np.ndarray]:
        """(target [30, A] canonical anchors, weight [30]) continuing the committed plan from `tick`."""
        assert isinstance(self.strategy, RealTimeChunking)
        plan = self.plans[-1]
        timing = Timing.of(prepared, self.num_anchors)
        tau = (np.arange(self.num_anchors) + 1) * timing.anchor_s  # anchor times after the observation
        rows = (
            np.arange(len(plan.canonical)) + plan.tick + 1 - tick
        ) * timing.tick_s  # plan times, same origin
        target = _trajectory_at(prepared, rows, plan.canonical, tau)
        overlap_end = (plan.end - tick) * timing.tick_s
        frozen_end = min(self.delay_estimate * timing.tick_s, overlap_end)
        c = (overlap_end - tau) / max(overlap_end - frozen_end, 1e-9)
        weight = self.strategy.weight * self.strategy.mask(c)
        frozen = tau - timing.anchor_s < frozen_end - 1e-9
        weight = np.where(frozen, self.strategy.weight, np.where(tau <= overlap_end + 1e-9, weight, 0.0))
        return target.astype(np.float32), weight.astype(np.float32)

    # ----------------------------------------------------------------------------------------------- replies
    def finish(self, prepared: Prepared, reply: dict[str, Any]) -> dict[str, Any]:
        """Record a reply (its plan) and return what the client executes (module doc)."""
        tick = prepared.tick
        if tick is None:
            return reply
        self.last_tick = tick
        canonical = np.asarray(reply.get("canonical", reply["actions"]), dtype=np.float64)
        plan = Plan(tick, canonical)
        if isinstance(self.strategy, TemporalEnsemble):
            self.plans = [p for p in self.plans if p.end > tick] + [plan]
            ensembled = _ensemble(self.strategy, self.plans, plan)
            reply = {**reply, "canonical": ensembled.astype(np.float32)}
            if prepared.source is not None and prepared.state is not None:
                native = prepared.source.canonical_to_native(ensembled, prepared.state)
                reply["actions"] = native.astype(np.float32)
            else:
                reply["actions"] = ensembled.astype(np.float32)
            protocol.check_finite_reply(reply)
        else:
            self.plans = [plan]
        return {**reply, "tick": tick}


def _trajectory_at(prepared: Prepared, times: np.ndarray, traj: np.ndarray, query: np.ndarray) -> np.ndarray:
    """A canonical trajectory [N, A] at `times` [N] read at `query` [Q] -> [Q, A]: the training interpolation
    with the Source's conventions, per-dimension linear for raw requests; held before / after its ends."""
    s = prepared.source
    if s is not None:
        return interpolate(
            times,
            traj,
            query,
            num_arms=s.num_arms,
            rot6d_layout=s.rot6d_layout,
            binary_grippers=s.binary_grippers,
        )
    return np.stack([np.interp(query, times, traj[:, i]) for i in range(traj.shape[1])], axis=1)


def _ensemble(strategy: TemporalEnsemble, plans: list[Plan], newest: Plan) -> np.ndarray:
    """Every plan's prediction of ticks newest.tick .. newest.end - 1 averaged with ACT's weights -> [K, P]."""
    out = np.empty_like(newest.canonical)
    for k in range(len(newest.canonical)):
        tick = newest.tick + k
        rows = [p.canonical[tick - p.tick] for p in plans if p.tick <= tick < p.end]
        out[k] = np.tensordot(strategy.weights(len(rows)), np.stack(rows), axes=1)
    return out


__all__ = ["DELAY_WINDOW", "Plan", "Session", "Timing"]
