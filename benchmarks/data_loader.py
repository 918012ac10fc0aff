"""Data-loader throughput on one CPU core, and the cost of opening a large mixture's episode index.

1. Writes a synthetic LeRobot v3.0 dataset (224 px, 2 camera views, AV1 or the best available codec) with
   `LeRobotV3Writer` into a temporary folder, then draws random (episode, frame) samples in one process with
   one decoder thread:
   - reader: the episode's state and action read from parquet (no cache) + the frame of both views decoded;
   - reader, no video: the same without decoding;
   - MixtureDataset: the full raw sample (canonical proprio, 30 anchors, both views), with and without decoding.
2. Writes the metadata of a synthetic mixture of >= 100k episodes (LeRobot v3.0 episode tables and v2.1
   episodes.jsonl; no frames) and times opening every source's index, with the memory it takes.

Prints a table and writes JSON (default benchmarks/results/data_loader.json).

    python benchmarks/data_loader.py [--episodes 24 --frames 80 --size 224 --seconds 10 --out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xvla.data import rotations
from xvla.data.episodes import open_dataset
from xvla.data.lerobot_writer import LeRobotV3Writer, available_video_encoder

CAMERAS = ("observation.images.front", "observation.images.wrist")
FPS = 10


_TEXTURE: dict[int, np.ndarray] = {}


def synthetic_frame(size: int, ep: int, f: int, cam: int) -> np.ndarray:
    """Drifting gradients, a fine texture panning 1 px per frame (scene detail under camera motion) and a
    moving square: costlier to decode than flat synthetic frames, cheaper than sensor noise."""
    if size not in _TEXTURE:
        _TEXTURE[size] = np.random.default_rng(0).normal(0, 12, size=(size, 2 * size, 1)).astype(np.float32)
    y, x = np.mgrid[:size, :size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[..., 0] = 80 + 60 * np.sin(6 * x + 0.1 * f + ep)
    img[..., 1] = 90 + 50 * np.cos(5 * y - 0.07 * f + cam)
    img[..., 2] = 120 + 40 * x * y
    shift = f % size
    img += _TEXTURE[size][:, shift : shift + size]
    s = size // 8
    x0 = (7 * f + 31 * ep) % (size - s)
    y0 = (3 * f + 17 * cam) % (size - s)
    img[y0 : y0 + s, x0 : x0 + s] = (230, 60 + 20 * cam, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_video_dataset(root: Path, episodes: int, frames: int, size: int) -> float:
    """The synthetic 2-view dataset; returns the time it took (s)."""
    features: dict[str, dict[str, Any]] = {
        key: {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]}
        for key in CAMERAS
    }
    features["observation.state"] = {"dtype": "float32", "shape": [8], "names": None}
    features["action"] = {"dtype": "float32", "shape": [7], "names": None}
    start = time.perf_counter()
    writer = LeRobotV3Writer(root, FPS, features, "synthetic")
    for ep in range(episodes):
        t = np.arange(frames) / FPS
        state = np.zeros((frames, 8))
        state[:, 0] = 0.4 + 0.05 * np.sin(t + ep)
        state[:, 1] = 0.1 * np.cos(0.5 * t)
        state[:, 2] = 0.3 + 0.02 * t
        state[:, 3:7] = rotations.convert(np.outer(np.sin(t), [0.0, 0.0, 0.3]), "axis_angle", "quat_xyzw")
        state[:, 7] = (t > t[-1] / 2).astype(float)
        action = np.concatenate([state[:, :3], np.zeros((frames, 3)), state[:, 7:]], 1)
        for f in range(frames):
            frame = {key: synthetic_frame(size, ep, f, cam) for cam, key in enumerate(CAMERAS)}
            writer.add_frame(
                {**frame, "observation.state": state[f], "action": action[f]}, task=f"task {ep % 4}"
            )
        writer.save_episode()
    writer.finalize()
    return time.perf_counter() - start


class _NoVideo:
    """A dataset whose frames are blank: the same sample path without decoding."""

    def __init__(self, ds: Any) -> None:
        self._ds = ds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def read_frames(self, ep: int, camera: str, frames: Any) -> np.ndarray:
        return np.zeros((len(frames), 224, 224, 3), np.uint8)


def rate(draw: Any, seconds: float, warmup: int = 3) -> dict[str, float]:
    """Call `draw(i)` for about `seconds`; samples per wall second and per CPU second of this process."""
    for i in range(warmup):
        draw(i)
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        draw(warmup + n)
        n += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "samples": n,
        "samples_per_s": n / wall,
        "samples_per_cpu_s": n / cpu,
        "ms_per_sample": 1e3 * wall / n,
    }


def bench_reader(root: Path, seconds: float, decode: bool) -> dict[str, float]:
    """Random (episode, frame): the episode's state and action read from parquet every time (a cold cache,
    the worst case), then the frame of each view."""
    ds = open_dataset(root, decoder_threads=1)
    rng = np.random.default_rng(0)

    def draw(_: int) -> None:
        ep = int(rng.integers(ds.num_episodes))
        f = int(rng.integers(ds.episode_length(ep)))
        ds.read_lowdim(ep, "observation.state")
        ds.read_lowdim(ep, "action")
        if decode:
            for cam in CAMERAS:
                ds.read_frames(ep, cam, [f])

    return rate(draw, seconds)


def bench_mixture(root: Path, seconds: float, decode: bool) -> dict[str, float] | None:
    try:
        from xvla.data.mixture import MixtureDataset
        from xvla.data.sources import Mixture
    except ImportError:
        return None
    arm = {"position": "0:3", "rotation": "3:7", "gripper": 7, "gripper_convention": {"binary": True}}
    source = {
        "name": "synthetic",
        "domain_id": 0,
        "path": str(root),
        "cameras": [{"key": key} for key in CAMERAS],
        "state": {"key": "observation.state", "dim": 8, "arms": [arm]},
        "rot6d_layout": "contiguous",
        "control_hz": FPS,
        "horizon_s": 4.0,
    }

    def open_fn(s: Any) -> Any:
        ds = open_dataset(s.path, decoder_threads=1)
        return ds if decode else _NoVideo(ds)

    data = MixtureDataset(Mixture.from_dict({"sources": [source]}), open_fn=open_fn)
    return rate(lambda i: data.sample(0, i), seconds)


# ---------------------------------------------------------------------- large index
def write_v3_meta(root: Path, episodes: int, length: int = 200) -> None:
    """info.json, tasks and the episode table of a v3.0 dataset with `episodes` episodes (no frames)."""
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    per_file = 500  # episodes per data/video file, as size-based rolling would give
    idx = np.arange(episodes)
    cols: dict[str, Any] = {
        "episode_index": idx,
        "tasks": pa.array([[f"task {i % 50}"] for i in idx]),
        "length": np.full(episodes, length),
        "data/chunk_index": idx // per_file // 1000,
        "data/file_index": idx // per_file % 1000,
        "dataset_from_index": idx * length,
        "dataset_to_index": (idx + 1) * length,
    }
    for key in CAMERAS:
        cols[f"videos/{key}/chunk_index"] = idx // per_file // 1000
        cols[f"videos/{key}/file_index"] = idx // per_file % 1000
        cols[f"videos/{key}/from_timestamp"] = (idx % per_file) * length / FPS
        cols[f"videos/{key}/to_timestamp"] = (idx % per_file + 1) * length / FPS
    pq.write_table(pa.table(cols), root / "meta/episodes/chunk-000/file-000.parquet")
    _write_info(root, "v3.0", episodes, length)


def write_v21_meta(root: Path, episodes: int, length: int = 200) -> None:
    (root / "meta").mkdir(parents=True)
    lines = (
        json.dumps({"episode_index": i, "tasks": [f"task {i % 50}"], "length": length})
        for i in range(episodes)
    )
    (root / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    _write_info(root, "v2.1", episodes, length)


def _write_info(root: Path, version: str, episodes: int, length: int) -> None:
    video = {"dtype": "video", "shape": [224, 224, 3], "names": ["height", "width", "channels"]}
    v3 = version == "v3.0"
    info = {
        "codebase_version": version,
        "fps": FPS,
        "total_episodes": episodes,
        "total_frames": episodes * length,
        "chunks_size": 1000,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        if v3
        else "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        if v3
        else "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {
            **{key: video for key in CAMERAS},
            "observation.state": {"dtype": "float32", "shape": [8], "names": None},
            "action": {"dtype": "float32", "shape": [7], "names": None},
        },
    }
    (root / "meta/info.json").write_text(json.dumps(info))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_index(tmp: Path, sizes: dict[str, tuple[str, int]]) -> dict[str, Any]:
    for name, (version, n) in sizes.items():
        (write_v3_meta if version == "v3.0" else write_v21_meta)(tmp / name, n)
    rss0, t0 = _rss_mb(), time.perf_counter()
    datasets = [open_dataset(tmp / name) for name in sizes]
    frames = sum(int(sum(ds.episode_length(ep) for ep in range(ds.num_episodes))) for ds in datasets)
    seconds = time.perf_counter() - t0
    return {
        "sources": {name: {"version": v, "episodes": n} for name, (v, n) in sizes.items()},
        "episodes": sum(ds.num_episodes for ds in datasets),
        "frames": frames,
        "open_s": seconds,
        "rss_increase_mb": _rss_mb() - rss0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--frames", type=int, default=80, help="frames per episode")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per case")
    parser.add_argument("--index-episodes", type=int, default=120_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_loader.json")
    args = parser.parse_args()

    results: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "dataset": {
            "episodes": args.episodes,
            "frames_per_episode": args.frames,
            "size": args.size,
            "views": len(CAMERAS),
            "fps": FPS,
            "codec": available_video_encoder()[0],
        },
    }
    with tempfile.TemporaryDirectory(prefix="xvla-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        results["dataset"]["write_s"] = write_video_dataset(
            tmp / "video", args.episodes, args.frames, args.size
        )
        results["dataset"]["mb_on_disk"] = sum(p.stat().st_size for p in (tmp / "video").rglob("*")) / 2**20
        cases = {
            "reader: low-dim + 2 views decoded": bench_reader(tmp / "video", args.seconds, decode=True),
            "reader: low-dim only": bench_reader(tmp / "video", args.seconds, decode=False),
            "MixtureDataset raw sample, 2 views decoded": bench_mixture(
                tmp / "video", args.seconds, decode=True
            ),
            "MixtureDataset raw sample, no video decoding": bench_mixture(
                tmp / "video", args.seconds, decode=False
            ),
        }
        results["throughput_one_core"] = {k: v for k, v in cases.items() if v is not None}
        quarter = args.index_episodes // 4
        sizes = {
            "v3_a": ("v3.0", 2 * quarter),
            "v3_b": ("v3.0", quarter),
            "v21_a": ("v2.1", args.index_episodes - 3 * quarter),
        }
        results["index"] = bench_index(tmp / "index", sizes)

    from rich.console import Console
    from rich.table import Table

    d = results["dataset"]
    table = Table(
        title=f"data loading, one process, one decoder thread ({d['size']} px, {d['views']} views, {d['codec']})"
    )
    for col in ("case", "samples/s", "samples/CPU-s", "ms/sample"):
        table.add_column(col)
    for name, r in results["throughput_one_core"].items():
        table.add_row(
            name, f"{r['samples_per_s']:.1f}", f"{r['samples_per_cpu_s']:.1f}", f"{r['ms_per_sample']:.2f}"
        )
    console = Console()
    console.print(table)
    idx = results["index"]
    console.print(
        f"dataset written in {d['write_s']:.1f} s ({d['episodes'] * d['frames_per_episode']} frames, "
        f"{d['mb_on_disk']:.1f} MB); index of {idx['episodes']} episodes ({idx['frames']} frames) in "
        f"{len(idx['sources'])} sources opened in {idx['open_s']:.2f} s, +{idx['rss_increase_mb']:.0f} MB RSS"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
