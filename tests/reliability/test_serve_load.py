"""`benchmarks/serve_load.py` reduced (8 clients x 25 requests, WebSocket and HTTP mixed; and `--mixed`: HTTP,
WebSocket, RTC and ensembling sessions): no request fails and `/healthz` answers throughout. The full runs and
their figures are in docs/serving.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
HEALTHZ_MAX_MS = 1000  # a stall bound, not a latency target: D6's 15 MiB bodies held /healthz for 5.9 s


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "kinds"), [([], ("websocket", "http")), (["--mixed"], ("websocket", "http", "rtc", "ensemble"))]
)
def test_mixed_load_has_no_failures_and_healthz_answers_throughout(
    tmp_path: Path, flags: list[str], kinds: tuple[str, ...]
) -> None:
    result = tmp_path / "serve_load.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--clients", "8", "--requests", "25", "--json", str(result), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(result.read_text())
    assert (report["ok"], report["failed"]) == (200, 0), report["errors"]
    assert set(report["by_transport"]) == set(kinds)
    for transport in kinds:
        assert report["by_transport"][transport] | {"latency_ms": None} == {
            "clients": 8 // len(kinds),
            "ok": 200 // len(kinds),
            "failed": 0,
            "latency_ms": None,
        }
    health = report["healthz_during_load_ms"]
    assert health["polls"] > 0 and health["failed"] == 0
    assert health["max"] < HEALTHZ_MAX_MS, health
