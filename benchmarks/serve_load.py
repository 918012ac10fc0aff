"""Load test for `xvla serve`: N concurrent clients x M requests against a local server.

    python benchmarks/serve_load.py --clients 32 --requests 1000            # tiny random model, started here
    python benchmarks/serve_load.py --checkpoint CKPT --clients 8 --requests 50

The server runs in a subprocess (`python -m xvla.cli serve ...` on 127.0.0.1, a free port); each client is a
thread with its own `PolicyClient` sending raw-protocol observations (64 px images). Everything is bounded:
per-request timeouts, a global deadline, and the server is stopped at the end. Prints a table and writes JSON
(latency p50/p90/p99/max, throughput, failed requests, server-side batch sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
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

import numpy as np

TIMING_KEYS = ("prep_ms", "queue_ms", "infer_ms")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xvla.serve.client import PolicyClient  # noqa: E402  (torch-free)


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


def client_worker(
    port: int, requests: int, image_px: int, seed: int, deadline: float, timeout_s: float, out: dict
) -> None:
    rng = np.random.default_rng(seed)
    latencies, batch_sizes, timings, failures, errors = [], [], [], 0, []
    try:
        client = PolicyClient("127.0.0.1", port, timeout_s=timeout_s, retries=2)
    except Exception as err:
        out.update(latencies=[], batch_sizes=[], timings=[], failures=requests, errors=[f"connect: {err}"])
        return
    meta = client.metadata
    for _ in range(requests):
        if time.monotonic() > deadline:
            failures += 1
            errors.append("global deadline reached")
            continue
        obs = observation(rng, image_px, meta)
        t0 = time.perf_counter()
        try:
            reply = client.infer(obs)
            if (
                reply["actions"].shape != (meta["chunk_length"], meta["action_dim"])
                or not np.isfinite(reply["actions"]).all()
            ):
                raise ValueError(f"bad actions {reply['actions'].shape}")
        except Exception as err:
            failures += 1
            errors.append(f"{type(err).__name__}: {err}")
            continue
        latencies.append((time.perf_counter() - t0) * 1000.0)
        batch_sizes.append(reply["server_timing"]["batch_size"])
        timings.append([reply["server_timing"][k] for k in TIMING_KEYS])
    client.close()
    out.update(
        latencies=latencies, batch_sizes=batch_sizes, timings=timings, failures=failures, errors=errors[:5]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", default=None, help="checkpoint folder (default: a random model of --preset)"
    )
    ap.add_argument("--preset", default="micro", help="random checkpoint: a library preset or 'micro'")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000, help="requests per client")
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
            deadline = time.monotonic() + args.deadline_s
            results: list[dict] = [{} for _ in range(args.clients)]
            threads = [
                threading.Thread(
                    target=client_worker,
                    args=(port, args.requests, args.image_px, 1000 + i, deadline, args.timeout_s, results[i]),
                    daemon=True,
                )
                for i in range(args.clients)
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()) + args.timeout_s * 3)
            wall = time.perf_counter() - t0

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
        "latency_ms": {
            q: float(np.percentile(lat, p)) if ok else None
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
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
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
