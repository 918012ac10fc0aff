"""The authors' HTTP `POST /act`: raw model fields (`xvla.serve.codecs.raw`) as a json-numpy JSON body, whatever
format the WebSocket speaks. Reply: ``{"action": [[A floats] x 30], "server_timing": {...}}``, what the authors'
evaluation clients read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from xvla.serve.codecs.raw import RawCodec
from xvla.serve.protocol import RequestError


class ActCodec(RawCodec):
    name = "act"

    def loads(self, data: bytes) -> dict[str, Any]:
        import json_numpy  # server side only: the robot client never needs it

        try:
            obj = json_numpy.loads(data)
        except Exception as err:
            raise RequestError(f"invalid JSON / json-numpy body: {type(err).__name__}: {err}") from None
        if not isinstance(obj, dict):
            raise RequestError(f"request body must be a JSON object, got {type(obj).__name__}")
        return obj

    def dumps(self, reply: Mapping[str, Any]) -> bytes:
        # numpy arrays become nested lists
        return json.dumps(
            {"action": reply["actions"], "server_timing": reply["server_timing"]},
            default=lambda o: o.tolist() if isinstance(o, (np.ndarray, np.generic)) else str(o),
        ).encode()


ACT = ActCodec()
