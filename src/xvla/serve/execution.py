"""Execution strategies: how a robot turns action chunks into one action per control tick.

A robot does not stop while the model thinks. Three strategies, each a frozen config, selectable per connection:

- `Synchronous` (the default, the authors' behaviour): query, wait for the chunk, execute its first
  `execute_steps` actions, query again. While it waits the robot holds still.
- `TemporalEnsemble` (ACT, Zhao et al. 2023): query every `query_every` ticks; the action of a tick is the
  average of every received chunk's prediction for that tick, weighted ``exp(-coeff * i)`` with i = 0 the oldest
  chunk (ACT's convention: older predictions weigh more, so the executed trajectory changes slowly).
- `RealTimeChunking` (Black et al. 2025): the next chunk is requested every `execute_steps` ticks while the
  current one keeps executing; the server inpaints the new chunk so it continues the committed one: the d steps
  that execute during inference (d = the latency estimate in ticks) are frozen (weight `weight`), the rest of the
  overlap follows a soft mask decaying to 0 where the committed chunk ends (`schedule`).

Two halves share these configs. The robot side is `Executor` (here: numpy only, so the torch-free client uses
it): it counts ticks, decides when to query, measures each reply's delay in ticks and serves the action of the
current tick from the latest plan. The connection side is `xvla.serve.session.Session` (the committed plan, the
latency estimate, inpainting targets, ensembling), kept by the server per WebSocket connection and by an
in-process `Policy`. A request carries ``tick`` (the executor's tick of the observation) and ``delay`` (the
measured delay of the previous reply, in ticks); a reply's ``actions`` are the plan for ticks ``tick, tick+1,
...`` (`Synchronous`: from the tick the reply arrives, since the robot waited).

Delta action conventions: a plan's native actions chain from the request's state (row k is the step from row
k-1's pose), so starting a plan d rows in is right when the robot followed the rows before, which the frozen
prefix of real-time chunking makes true; for absolute conventions nothing depends on it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

Schedule = Literal["exp", "linear", "none"]
SCHEDULES = ("exp", "linear", "none")


@dataclass(frozen=True)
class Synchronous:
    """Query, wait, execute `execute_steps` actions (None: the whole chunk)."""

    name: ClassVar[str] = "sync"
    execute_steps: int | None = None

    def __post_init__(self) -> None:
        _check_steps("Synchronous.execute_steps", self.execute_steps)


@dataclass(frozen=True)
class TemporalEnsemble:
    """ACT's temporal ensembling: query every `query_every` ticks (one request in flight at most), execute the
    ``exp(-coeff * i)``-weighted average (i = 0 the oldest) of every chunk's prediction for the tick."""

    name: ClassVar[str] = "ensemble"
    coeff: float = 0.01  # ACT's default
    query_every: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.coeff) and self.coeff >= 0):
            raise ValueError(f"TemporalEnsemble.coeff: expected a finite number >= 0, got {self.coeff}")
        _check_steps("TemporalEnsemble.query_every", self.query_every)

    def weights(self, n: int) -> np.ndarray:
        """[n] normalised weights of n predictions of one tick, oldest first."""
        w = np.exp(-self.coeff * np.arange(n))
        return w / w.sum()


@dataclass(frozen=True)
class RealTimeChunking:
    """Asynchronous inference with inpainting: a query every `execute_steps` ticks (None: half the chunk) while
    the current chunk executes; the next chunk's first d steps (the latency estimate) are frozen to the committed
    actions with `weight`, the rest of the overlap gets `weight` times the soft mask `schedule` ("exp": Black et
    al.'s ``c * (e^c - 1) / (e - 1)`` with c falling linearly from 1 to 0 over the overlap; "linear": c; "none":
    only the frozen steps are constrained)."""

    name: ClassVar[str] = "rtc"
    execute_steps: int | None = None
    schedule: Schedule = "exp"
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_steps("RealTimeChunking.execute_steps", self.execute_steps)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"RealTimeChunking.schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"RealTimeChunking.weight: expected a number in [0, 1], got {self.weight}")

    def mask(self, c: np.ndarray) -> np.ndarray:
        """Soft-mask values for c in [0, 1] (1 where the overlap starts, 0 where the committed chunk ends)."""
        c = np.clip(c, 0.0, 1.0)
        if self.schedule == "exp":
            return c * np.expm1(c) / math.expm1(1.0)
        return c if self.schedule == "linear" else np.zeros_like(c)


Strategy = Synchronous | TemporalEnsemble | RealTimeChunking
STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Synchronous, TemporalEnsemble, RealTimeChunking)}


def _check_steps(field: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{field}: expected an integer >= 1 or None, got {value!r}")


def strategy_to_dict(strategy: Strategy) -> dict[str, Any]:
    """``{"strategy": name, **fields}`` (what a client sends to select it)."""
    return {"strategy": strategy.name, **asdict(strategy)}


def strategy_from_dict(spec: Mapping[str, Any]) -> Strategy:
    """Inverse of `strategy_to_dict`; raises ValueError naming the field."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"execution: expected a map with 'strategy', got {type(spec).__name__}")
    name = spec.get("strategy")
    if name not in STRATEGIES:
        raise ValueError(f"execution.strategy: expected one of {sorted(STRATEGIES)}, got {name!r}")
    cls = STRATEGIES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(map(str, spec)) - known - {"strategy"})
    if unknown:
        raise ValueError(
            f"execution: unknown field(s) {unknown} for strategy {name!r}; known: {sorted(known)}"
        )
    try:
        return cls(**{k: v for k, v in spec.items() if k != "strategy"})
    except TypeError as err:
        raise ValueError(f"execution: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# Robot side


class Requester(Protocol):
    """How an `Executor` gets replies: `submit` one request, then `poll` for its reply."""

    def submit(self, request: dict[str, Any], tick: int) -> None: ...

    def poll(self, tick: int, block: bool) -> dict[str, Any] | None:
        """The reply if it has arrived by `tick` (or, with `block`, once it does), else None."""
        ...


class SimulatedLatency:
    """In-process requests with a latency in control ticks (deterministic: the reply is computed at once from
    the observation of the request's tick and released `latency_steps` ticks later)."""

    def __init__(self, answer: Callable[[dict[str, Any]], dict[str, Any]], latency_steps: int = 0) -> None:
        if latency_steps < 0:
            raise ValueError(f"latency_steps: expected >= 0, got {latency_steps}")
        self.answer = answer
        self.latency_steps = latency_steps
        self._reply: tuple[int, dict[str, Any]] | None = None

    def submit(self, request: dict[str, Any], tick: int) -> None:
        self._reply = (tick + self.latency_steps, self.answer(request))

    def poll(self, tick: int, block: bool) -> dict[str, Any] | None:
        if self._reply is None or not (block or tick >= self._reply[0]):
            return None
        reply, self._reply = self._reply[1], None
        return reply


class ThreadedRequester:
    """Real requests on a background thread (`PolicyClient.step`): the robot keeps executing meanwhile."""

    def __init__(self, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.answer = answer
        self._done: queue.Queue[tuple[dict[str, Any] | None, BaseException | None]] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None

    def submit(self, request: dict[str, Any], tick: int) -> None:
        def work() -> None:
            try:
                self._done.put((self.answer(request), None))
            except BaseException as err:  # re-raised on the robot's thread by poll
                self._done.put((None, err))

        self._thread = threading.Thread(target=work, name="xvla-execution", daemon=True)
        self._thread.start()

    def poll(self, tick: int, block: bool) -> dict[str, Any] | None:
        try:
            reply, error = self._done.get(block=block)
        except queue.Empty:
            return None
        self._thread = None
        if error is not None:
            raise error
        return reply

    def wait_idle(self) -> None:
        """Wait for a request in flight (its reply is dropped): before a reset."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._done.get_nowait()


class Executor:
    """One action per `step(obs)` (a control tick) from the strategy's plans; see the module doc.

    `hold(obs)` is the action that keeps the robot still (a policy that knows the robot's conventions gives it;
    simulated latency needs it). Without it, a tick with no action to execute waits for the reply in flight."""

    def __init__(
        self,
        strategy: Strategy,
        requester: Requester,
        hold: Callable[[Mapping[str, Any]], np.ndarray] | None = None,
    ) -> None:
        self.strategy = strategy
        self.requester = requester
        self.hold = hold
        self.reset()

    def reset(self) -> None:
        self.tick = 0
        self.plan: np.ndarray | None = (
            None  # [K, native_dim] actions of ticks plan_start, plan_start + 1, ...
        )
        self.plan_canonical: np.ndarray | None = None  # [K, P] the poses they reach (when the reply has them)
        self.plan_start = 0
        self.plan_id = -1  # counts accepted replies: an action's plan (chunk boundaries are where it changes)
        self.last_query = -1
        self.in_flight: int | None = None  # tick of the request in flight
        self.last_delay: int | None = None  # measured delay of the latest reply, in ticks
        self.last_canonical: np.ndarray | None = None  # pose of the last executed action (open-loop proprio)
        self.executed_from: int | None = None  # plan_id of the last action (None: a hold)

    def step(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The action of this tick (then the tick advances)."""
        t = self.tick
        if self.in_flight is not None:
            self._accept(self.requester.poll(t, block=False), t)
        if self.in_flight is None and self._due(t):
            request = {**obs, "tick": t}
            if self.last_delay is not None:
                request["delay"] = self.last_delay
                request["plan_start"] = self.plan_start
            self.requester.submit(request, t)  # a request that fails leaves no state behind
            self.in_flight = self.last_query = t
            self._accept(self.requester.poll(t, block=False), t)  # a reply due at once is used at once
        action = self._action(t)
        if action is None and self.hold is not None:
            self.executed_from = None
            self.tick += 1
            return self.hold(obs)
        while action is None:  # nothing to execute and no hold: wait for the reply in flight
            if self.in_flight is None:
                raise RuntimeError("executor: no plan covers this tick and no request is in flight")
            self._accept(self.requester.poll(t, block=True), t)
            action = self._action(t)
        self.tick += 1
        return action

    def _due(self, t: int) -> bool:
        s = self.strategy
        if self.plan is None:
            return True
        if isinstance(s, Synchronous):
            return t - self.plan_start >= len(self.plan)
        if isinstance(s, TemporalEnsemble):
            return t - self.last_query >= s.query_every
        period = s.execute_steps or max(1, len(self.plan) // 2)
        return t - self.last_query >= period

    def _accept(self, reply: dict[str, Any] | None, t: int) -> None:
        if reply is None or self.in_flight is None:
            return
        actions = np.asarray(reply["actions"])
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"reply 'actions': expected [K, native_dim] with K >= 1, got {actions.shape}")
        canonical = reply.get("canonical", reply["actions"])
        self.last_delay = t - self.in_flight
        if isinstance(self.strategy, Synchronous):  # the robot waited: the chunk starts now
            n = min(self.strategy.execute_steps or len(actions), len(actions))
            self.plan, self.plan_canonical, self.plan_start = actions[:n], np.asarray(canonical)[:n], t
        else:
            # Row k is the action of tick `request + k`, unless no plan covered the request's tick: then the
            # robot held still meanwhile (the first chunk of an episode) and the chunk starts now, as a waited one.
            held = self.plan is None or not 0 <= self.in_flight - self.plan_start < len(self.plan)
            start = t if held else self.in_flight
            self.plan, self.plan_canonical, self.plan_start = actions, np.asarray(canonical), start
        self.plan_id += 1
        self.in_flight = None

    def _action(self, t: int) -> np.ndarray | None:
        if self.plan is None or not 0 <= t - self.plan_start < len(self.plan):
            return None
        k = t - self.plan_start
        self.executed_from = self.plan_id
        if self.plan_canonical is not None and len(self.plan_canonical) > k:
            self.last_canonical = np.asarray(self.plan_canonical[k], dtype=np.float64)
        return np.asarray(self.plan[k])


__all__ = [
    "Executor",
    "RealTimeChunking",
    "Requester",
    "STRATEGIES",
    "SimulatedLatency",
    "Strategy",
    "Synchronous",
    "TemporalEnsemble",
    "ThreadedRequester",
    "strategy_from_dict",
    "strategy_to_dict",
]
