"""What every request format does, and the parts two of them share.

A codec takes one request from the bytes a transport carries to model inputs, and the model's anchors back to the
bytes of its reply, in four steps, each on the thread where it costs nobody else anything:

- `loads`: bytes -> request fields (a worker thread: the bytes are untrusted and may be large);
- `decode`: fields -> `Prepared` model inputs, refusing a bad request with a `RequestError` naming the field (the
  validation thread);
- `encode`: the request's 30 anchors -> reply fields (the model thread, inside `Policy.run`);
- `dumps`: reply fields plus `server_timing` -> bytes (the event loop: replies are small).

`Policy` calls `decode` and `encode` for in-process requests; the server calls all four, on both transports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from xvla.serve import protocol

if TYPE_CHECKING:
    from torch import Tensor

    from xvla.data.sources import Source
    from xvla.serve.policy import Policy

MAX_STEPS = 100
# Canonical proprio is metres, rot6d columns and a 0..1 gripper: beyond this it is a unit or encoding error,
# and the float32 network turns such values into meaningless or non-finite actions.
MAX_PROPRIO_ABS = 1e4
PROPRIO_HINT = " (canonical poses are metres, rot6d columns and a 0..1 gripper: check the units)"


@dataclass
class Prepared:
    """One validated request: unbatched model inputs plus what its codec's `encode` needs."""

    inputs: dict[str, Tensor]
    steps: int
    proprio: np.ndarray  # canonical [P] given to the model
    codec: Codec  # the format it came in, which writes its reply
    source: Source | None = None  # the robot of a Source request
    state: np.ndarray | None = None  # its native reference state [S]
    tick: int | None = None  # the client's control tick of the observation (execution strategies)
    # real-time chunking (`serve.session`): canonical anchors [30, A] to continue and their weights [30]
    inpaint: tuple[np.ndarray, np.ndarray] | None = None


class Codec(ABC):
    """One request format. The defaults are the WebSocket's wire: msgpack with openpi's numpy encoding."""

    name: ClassVar[str]  # what the WebSocket metadata calls it (`protocol`)

    def loads(self, data: bytes) -> Any:
        return protocol.unpackb(data)

    @abstractmethod
    def decode(self, policy: Policy, obs: Mapping[str, Any], proprio: np.ndarray | None = None) -> Prepared:
        """Validate `obs` and build its model inputs; `proprio` overrides the canonical proprio (open loop)."""

    @abstractmethod
    def encode(self, prepared: Prepared, anchors: np.ndarray) -> dict[str, Any]:
        """The reply fields for `prepared` given its sampled anchors [30, A]."""

    @abstractmethod
    def metadata(self, policy: Policy) -> dict[str, Any]:
        """What a client needs to build requests in this format (sent when a WebSocket opens)."""

    def dumps(self, reply: Mapping[str, Any]) -> bytes:
        return protocol.packb(dict(reply))


def steps(policy: Policy, obs: Mapping[str, Any]) -> int:
    """The optional `steps` field (denoising steps for this request), else the policy's."""
    value = obs.get("steps")
    return policy.config.steps if value is None else protocol.integer(value, "steps", 1, MAX_STEPS)
