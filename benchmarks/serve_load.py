"""Load test for `xvla serve`: N concurrent clients x M requests against a local server.

    python benchmarks/serve_load.py --clients 32 --requests 1000            # tiny random model, started here
    python benchmarks/serve_load.py --checkpoint CKPT --clients 8 --requests 50

The server runs in a subprocess (`python -m xvla.cli serve ...` on 127.0.0.1, a free port). Each client is a
thread sending raw-protocol observations (64 px images): every other one over the WebSocket (its own
`PolicyClient`, no retries: a failure counts), the rest as `POST /act` (json-numpy, one connection per request).
With `--mixed`, clients take turns over four kinds: `POST /act`, a plain WebSocket client, and WebSocket clients
with an execution strategy (`rtc`: real-time chunking, `ensemble`: temporal ensembling), whose requests carry the
control tick and the measured delay as `PolicyClient.step` sends them, so the server keeps a session per
connection and inpaints (RTC) or ensembles every chunk after the first:

    python benchmarks/serve_load.py --mixed --clients 8 --requests 25     # the short mixed run (about a minute)

A further thread polls `GET /healthz` every 50 ms while the load runs: the event loop must keep answering.
Everything is bounded: per-request timeouts, a global deadline, and the server is stopped at the end. Prints a
table and writes JSON (latency p50/p90/p99/max overall and per transport, `/healthz` latency, throughput, failed
requests, server-side batch sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import json_numpy
import numpy as np

TIMING_KEYS = ("prep_ms", "queue_ms", "infer_ms")
TRANSPORTS = ("websocket", "http", "rtc", "ensemble")
TICKS_PER_REQUEST = 4  # an asynchronous client's control ticks between two requests
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xvla.serve.client import PolicyClient  # noqa: E402  (torch-free)
from xvla.serve.execution import (  # noqa: E402
    RealTimeChunking,
    Strategy,
    Synchronous,
    TemporalEnsemble,
)

EXECUTION: dict[str, Strategy] = {
    "websocket": Synchronous(),
    "rtc": RealTimeChunking(execute_steps=TICKS_PER_REQUEST),
    "ensemble": TemporalEnsemble(query_every=TICKS_PER_REQUEST),
}


def micro_config():
    """The `demo` preset shrunk further (1 view, 32 px, 1-layer text encoder and head): a load test measures the
    server, not the model."""
    from xvla.config import get_preset

    demo = get_preset("demo")
    return demo.replace(
        num_views=1,
        image_size=32,
        text=dataclasses.replace(demo.text, encoder_layers=1),
        head=dataclasses.replace(demo.head, depth=1, hidden_size=64),
    )


def make_random_checkpoint(folder: Path, preset: str, seed: int = 0) -> None:
    """A randomly initialised model (a library preset or `micro`) with a locally built tokenizer (offline)."""
    import torch

    from xvla.config import get_preset
    from xvla.model.tokenizer import build_tokenizer
    from xvla.model.xvla import XVLA

    torch.manual_seed(seed)
    config = micro_config() if preset == "micro" else get_preset(preset)
    XVLA(config).save_pretrained(folder)
    build_tokenizer(folder, vocab_size=config.text.vocab_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"server not healthy after {timeout_s} s")


@contextlib.contextmanager
def served(checkpoint: str, args: argparse.Namespace, log_path: Path) -> Iterator[int]:
    """`xvla serve` in a subprocess on 127.0.0.1 and a free port; stopped (then killed) on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "xvla.cli", "serve", checkpoint, "--host", "127.0.0.1", "--port", str(port)]
    cmd += [
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--steps",
        str(args.steps),
    ]
    cmd += ["--threads", str(args.threads), "--device", "cpu"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(port, server, timeout_s=120)
            yield port
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


def observation(rng: np.random.Generator, image_px: int, meta: dict) -> dict:
    """A raw-protocol request with every camera the model takes."""
    images = {cam: rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8) for cam in meta["cameras"]}
    return {
        **images,
        "language_instruction": "pick up the red block",
        "proprio": rng.standard_normal(meta["proprio_dim"]).astype(np.float32),
        "domain_id": int(rng.integers(meta["num_domains"])),
    }


def http_infer(port: int, obs: dict, timeout_s: float) -> dict:
    """One `POST /act` (the authors' protocol); the reply as the WebSocket client gives it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", "/act", json_numpy.dumps(obs), {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
    reply = json.loads(body)
    return {"actions": np.asarray(reply["action"]), "server_timing": reply["server_timing"]}


def client_worker(
    port: int,
    transport: str,
    meta: dict,
    requests: int,
    image_px: int,
    seed: int,
    deadline: float,
    timeout_s: float,
    out: dict,
) -> None:
    rng = np.random.default_rng(seed)
    latencies, batch_sizes, timings, failures, errors = [], [], [], 0, []
    out.update(transport=transport)
    client = None
    if transport != "http":
        try:
            client = PolicyClient(
                "127.0.0.1", port, timeout_s=timeout_s, retries=0, execution=EXECUTION[transport]
            )
        except Exception as err:
            out.update(
                latencies=[], batch_sizes=[], timings=[], failures=requests, errors=[f"connect: {err}"]
            )
            return
    for i in range(requests):
        if time.monotonic() > deadline:
            failures += 1
            errors.append("global deadline reached")
            continue
        obs = observation(rng, image_px, meta)
        if transport in ("rtc", "ensemble"):  # what `PolicyClient.step` sends: tick, delay, plan start
            tick = i * TICKS_PER_REQUEST
            obs["tick"] = tick
            if i:
                obs.update(delay=1, plan_start=tick - TICKS_PER_REQUEST)
        t0 = time.perf_counter()
        try:
            reply = client.infer(obs) if client is not None else http_infer(port, obs, timeout_s)
            if (
                reply["actions"].shape != (meta["chunk_length"], meta["action_dim"])
                or not np.isfinite(reply["actions"]).all()
            ):
                raise ValueError(f"bad actions {reply['actions'].shape}")
        except Exception as err:
            failures += 1
            errors.append(f"{transport} {type(err).__name__}: {err}")
            continue
        latencies.append((time.perf_counter() - t0) * 1000.0)
        batch_sizes.append(reply["server_timing"]["batch_size"])
        timings.append([reply["server_timing"][k] for k in TIMING_KEYS])
    if client is not None:
        client.close()
    out.update(
        latencies=latencies, batch_sizes=batch_sizes, timings=timings, failures=failures, errors=errors[:5]
    )


def health_poller(port: int, stop: Any, period_s: float, out: Any) -> None:
    """`GET /healthz` every `period_s` until `stop` is set, then the latencies (ms) and failures to `out`: how
    long the server's event loop makes anyone wait. Runs in its own process, so the client threads' work (JSON
    encoding, under this process's GIL) is not counted as the server's."""
    latencies, failures = [], 0
    while not stop.wait(period_s):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                r.read()
            latencies.append((time.perf_counter() - t0) * 1000.0)
        except OSError:
            failures += 1
    out.put({"latencies": latencies, "failures": failures})


def percentiles(values: list[float]) -> dict[str, float | None]:
    return {
        q: float(np.percentile(values, p)) if values else None
        for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }


def transport_summary(results: list[dict], transport: str) -> dict:
    mine = [r for r in results if r.get("transport") == transport]
    latencies = [x for r in mine for x in r.get("latencies", [])]
    return {
        "clients": len(mine),
        "ok": len(latencies),
        "failed": sum(r.get("failures", 0) for r in mine),
        "latency_ms": percentiles(latencies),
    }


def _pair(stats: dict, keys: tuple[str, ...] = ("p50", "p99")) -> str:
    return " / ".join("-" if stats[k] is None else f"{stats[k]:.1f}" for k in keys)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", default=None, help="checkpoint folder (default: a random model of --preset)"
    )
    ap.add_argument("--preset", default="micro", help="random checkpoint: a library preset or 'micro'")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000, help="requests per client")
    ap.add_argument("--http-clients", type=float, default=0.5, help="share of clients using POST /act")
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="clients take turns: POST /act, WebSocket, WebSocket + RTC, WebSocket + ensembling",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--image-px", type=int, default=64)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="per request")
    ap.add_argument("--deadline-s", type=float, default=3600.0, help="whole run")
    ap.add_argument("--json", default=str(REPO / "benchmarks/results/serve_load.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="xvla-serve-load-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "ckpt")
            make_random_checkpoint(Path(checkpoint), args.preset)
        with served(checkpoint, args, Path(tmp) / "server.log") as port:
            with PolicyClient("127.0.0.1", port) as probe:
                meta = probe.metadata
            deadline = time.monotonic() + args.deadline_s
            results: list[dict] = [{} for _ in range(args.clients)]
            # spread evenly: with --http-clients 0.5, clients 1, 3, 5, ... use HTTP
            transports = [
                "http" if int((i + 1) * args.http_clients) > int(i * args.http_clients) else "websocket"
                for i in range(args.clients)
            ]
            if args.mixed:
                kinds = ("http", "websocket", "rtc", "ensemble")
                transports = [kinds[i % len(kinds)] for i in range(args.clients)]
            threads = [
                threading.Thread(
                    target=client_worker,
                    args=(
                        port,
                        transports[i],
                        meta,
                        args.requests,
                        args.image_px,
                        1000 + i,
                        deadline,
                        args.timeout_s,
                        results[i],
                    ),
                    daemon=True,
                )
                for i in range(args.clients)
            ]
            stop, health_out = multiprocessing.Event(), multiprocessing.Queue()
            poller = multiprocessing.Process(
                target=health_poller, args=(port, stop, 0.05, health_out), daemon=True
            )
            t0 = time.perf_counter()
            poller.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()) + args.timeout_s * 3)
            wall = time.perf_counter() - t0
            stop.set()
            health = health_out.get(timeout=30)
            poller.join(timeout=30)

    lat = np.array([x for r in results for x in r.get("latencies", [])])
    batches = np.array([x for r in results for x in r.get("batch_sizes", [])])
    timings = np.array([x for r in results for x in r.get("timings", [])]).reshape(-1, len(TIMING_KEYS))
    total = args.clients * args.requests
    ok = len(lat)
    report = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "total_requests": total,
        "ok": ok,
        "failed": total - ok,
        "wall_s": wall,
        "throughput_rps": ok / wall if wall > 0 else 0.0,
        "latency_ms": percentiles(lat.tolist()),
        "by_transport": {t: transport_summary(results, t) for t in TRANSPORTS if t in transports},
        "healthz_during_load_ms": {
            "polls": len(health.get("latencies", [])),
            "failed": health.get("failures", 0),
            "over_50_ms": sum(x > 50 for x in health.get("latencies", [])),
            **percentiles(health.get("latencies", [])),
        },
        "mean_batch_size": float(batches.mean()) if ok else None,
        "server_mean_ms": {k: float(timings[:, i].mean()) if ok else None for i, k in enumerate(TIMING_KEYS)},
        "settings": {
            "preset": None if args.checkpoint else args.preset,
            "steps": args.steps,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "server_threads": args.threads,
            "image_px": args.image_px,
            "mixed": args.mixed,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": os.getloadavg()[0],  # other processes sharing the CPUs
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "errors": sorted({e for r in results for e in r.get("errors", [])})[:10],
    }
    rows = [
        ("clients x requests", f"{args.clients} x {args.requests}"),
        ("ok / failed", f"{ok} / {total - ok}"),
        ("wall (s)", f"{wall:.1f}"),
        ("throughput (req/s)", f"{report['throughput_rps']:.1f}"),
        *((f"latency {q} (ms)", "-" if v is None else f"{v:.1f}") for q, v in report["latency_ms"].items()),
        *(
            (f"{t} p50 / p99 (ms)", _pair(v["latency_ms"]) + f"  ({v['ok']} ok, {v['failed']} failed)")
            for t, v in report["by_transport"].items()
        ),
        ("healthz p50 / p99 / max (ms)", _pair(report["healthz_during_load_ms"], ("p50", "p99", "max"))),
        (
            "healthz polls > 50 ms",
            f"{report['healthz_during_load_ms']['over_50_ms']} of "
            f"{report['healthz_during_load_ms']['polls']} ({report['healthz_during_load_ms']['failed']} failed)",
        ),
        ("mean server batch", "-" if not ok else f"{report['mean_batch_size']:.2f}"),
        *(
            (f"server mean {k}", "-" if v is None else f"{v:.1f}")
            for k, v in report["server_mean_ms"].items()
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if report["errors"]:
        print("errors:", *report["errors"], sep="\n  ")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok == total and not report["healthz_during_load_ms"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
