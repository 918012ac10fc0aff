"""Scripted-expert data generation: LeRobot v3.0 datasets plus a mixture file for the suite.

Attempt `a` of a source runs task `tasks[a % len(tasks)]` from seed `episode_seed(seed, a)`; only successful
attempts are kept, the first `episodes` of them in attempt order, so the result does not depend on the number
of workers or on interruptions. Each attempt is cached in `<out>/.staging/<source>/` as soon as it finishes
(atomic rename); a rerun skips cached attempts and a finished dataset (same settings) is not rebuilt. The
dataset itself is written once, atomically, by `LeRobotV3Writer`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xvla.sim.suite import camera_key, entry, parse_selection

MANIFEST = "meta/xvla_sim.json"  # per dataset: settings, per-episode (task, seed), expert statistics
MIXTURE = "mixture.json"


def cache_dir() -> Path:
    """Where generated suites live by default: `$XVLA_CACHE/sim` or `~/.cache/xvla/sim`."""
    root = (
        os.environ.get("XVLA_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xvla"
    )
    return Path(root).expanduser() / "sim"


def episode_seed(seed: int, attempt: int) -> int:
    """Simulator seed of one attempt (stable, independent of worker count)."""
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Attempt:
    source: str
    task: str
    attempt: int
    seed: int
    image_size: int


@dataclass
class EpisodeRecord:
    """One expert rollout: frames [N] of images per camera, states [N, S], actions [N, A]."""

    success: bool
    task: str
    seed: int
    seconds: float
    states: np.ndarray
    actions: np.ndarray
    images: dict[str, np.ndarray]  # camera -> [N, H, W, 3] uint8


def rollout_expert(env: Any, task: str, seed: int, render: bool = True) -> EpisodeRecord:
    """Run the scripted expert from `reset(seed, task)` until success (or the step limit), then one more
    query horizon of expert steps: the anchors of a frame span [t, min(t + horizon, t_end)], so without this
    tail the last second of the task would be time-compressed in the training targets."""
    start = time.perf_counter()
    obs = env.reset(seed, task)
    states, actions = [], []
    frames: dict[str, list[np.ndarray]] = {c: [] for c in env.spec.cameras}
    tail = round(env.spec.horizon_s * env.spec.fps)
    success, remaining = False, env.max_steps
    while remaining > 0:
        action = env.expert(obs)
        states.append(obs.state)
        actions.append(action)
        for cam, image in obs.images.items():
            frames[cam].append(image)
        env.step(action)
        remaining -= 1
        if not success and env.success():
            success, remaining = True, tail
        obs = env.observe(render=render)
    return EpisodeRecord(
        success=success,
        task=task,
        seed=seed,
        seconds=time.perf_counter() - start,
        states=np.stack(states).astype(np.float32),
        actions=np.stack(actions).astype(np.float32),
        images={c: np.stack(v) for c, v in frames.items() if v},
    )


# ------------------------------------------------------------------ staging (one file per attempt)


def _staged_path(staging: Path, a: Attempt) -> Path:
    return staging / a.source / f"{a.attempt:06d}-{a.task}-{a.seed}.npz"


def _save_record(path: Path, record: EpisodeRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    arrays: dict[str, Any] = {"success": record.success, "seconds": record.seconds}
    if record.success:  # failed attempts only need their outcome
        arrays.update(states=record.states, actions=record.actions)
        arrays.update({f"image:{c}": v for c, v in record.images.items()})
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_record(path: Path, a: Attempt) -> EpisodeRecord:
    with np.load(path) as z:
        images = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("image:")}
        success = bool(z["success"])
        empty = np.zeros((0, 0), np.float32)
        return EpisodeRecord(
            success,
            a.task,
            a.seed,
            float(z["seconds"]),
            z["states"] if success else empty,
            z["actions"] if success else empty,
            images,
        )


_WORKER_ENVS: dict[str, Any] = {}


def _run_attempt(args: tuple[Attempt, str]) -> tuple[Attempt, bool, float]:
    """Worker: roll out one attempt and stage it (environments are cached per process)."""
    a, staging = args
    key = f"{a.source}@{a.image_size}"
    if key not in _WORKER_ENVS:
        _WORKER_ENVS[key] = entry(a.source).factory(a.image_size)
    record = rollout_expert(_WORKER_ENVS[key], a.task, a.seed)
    _save_record(_staged_path(Path(staging), a), record)
    return a, record.success, record.seconds


# ------------------------------------------------------------------ datasets


def _features(name: str, image_size: int) -> dict[str, dict]:
    spec = entry(name).spec
    feats: dict[str, dict] = {
        camera_key(c): {
            "dtype": "video",
            "shape": [image_size, image_size, 3],
            "names": ["height", "width", "channels"],
        }
        for c in spec.cameras
    }
    feats["observation.state"] = {
        "dtype": "float32",
        "shape": [len(spec.state_names)],
        "names": list(spec.state_names),
    }
    feats["action"] = {
        "dtype": "float32",
        "shape": [len(spec.action_names)],
        "names": list(spec.action_names),
    }
    return feats


def _settings(name: str, tasks: Sequence[str], episodes: int, image_size: int, seed: int) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "source": name,
        "tasks": list(tasks),
        "episodes": episodes,
        "image_size": image_size,
        "seed": seed,
    }
    spec = entry(name).spec
    # absent at 0, so datasets of sources whose images and expert never changed stay valid
    for key, revision in (
        ("render_revision", spec.render_revision),
        ("expert_revision", spec.expert_revision),
    ):
        if revision:
            settings[key] = revision
    return settings


def read_manifest(dataset: str | Path) -> dict[str, Any]:
    """The generation manifest of a suite dataset (settings, episodes [(task, seed)], expert statistics)."""
    path = Path(dataset) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a dataset generated by `xvla sim generate` (no manifest)")
    return json.loads(path.read_text())


def generate_source(
    name: str,
    tasks: Sequence[str],
    episodes: int,
    out: Path,
    *,
    image_size: int,
    seed: int,
    pool: Any | None,
    progress: bool = True,
    max_attempts_factor: float = 2.0,
) -> dict[str, Any]:
    """Build (or reuse) the dataset `out/<name>`; returns its manifest."""
    spec = entry(name).spec
    root = out / name
    settings = _settings(name, tasks, episodes, image_size, seed)
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        if manifest.get("settings") == settings:
            return manifest
    staging = out / ".staging" / f"{name}-{hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]}"
    outcomes: dict[int, tuple[Attempt, bool, float]] = {}
    max_attempts = max(int(episodes * max_attempts_factor), episodes + 5)
    bar = _progress(episodes, f"{name}", progress)
    next_attempt = 0
    while sum(ok for _, ok, _ in outcomes.values()) < episodes and next_attempt < max_attempts:
        # Launch enough attempts to cover the missing successes at the observed success rate.
        done_ok = sum(ok for _, ok, _ in outcomes.values())
        rate = max(done_ok / len(outcomes), 0.5) if outcomes else 1.0
        need = min(int(np.ceil((episodes - done_ok) / rate)), max_attempts - next_attempt)
        batch = [
            Attempt(name, tasks[i % len(tasks)], i, episode_seed(seed, i), image_size)
            for i in range(next_attempt, next_attempt + need)
        ]
        next_attempt += need
        todo = []
        for a in batch:
            path = _staged_path(staging, a)
            if path.is_file():
                with np.load(path) as z:
                    outcomes[a.attempt] = (a, bool(z["success"]), float(z["seconds"]))
                bar.update(int(outcomes[a.attempt][1]))
            else:
                todo.append((a, str(staging)))
        results: Iterable[tuple[Attempt, bool, float]] = (
            pool.imap_unordered(_run_attempt, todo)
            if pool is not None and len(todo) > 1
            else map(_run_attempt, todo)
        )
        for a, ok, seconds in results:
            outcomes[a.attempt] = (a, ok, seconds)
            bar.update(int(ok))
    bar.close()
    ordered = [outcomes[i] for i in sorted(outcomes)]
    kept = [a for a, ok, _ in ordered if ok][:episodes]
    if len(kept) < episodes:
        raise RuntimeError(
            f"source {name!r}: the expert succeeded in only {len(kept)} of {len(ordered)} attempts; "
            f"{episodes} episodes were asked for"
        )
    # Statistics over the attempts up to the last kept one (the ones a sequential run would have made).
    last = kept[-1].attempt
    used = [(a, ok, s) for a, ok, s in ordered if a.attempt <= last]
    per_task = {t: [ok for a, ok, _ in used if a.task == t] for t in tasks}
    stats = {
        "expert_success_rate": sum(ok for _, ok, _ in used) / len(used),
        "expert_success_by_task": {t: (sum(v) / len(v) if v else None) for t, v in per_task.items()},
        "attempts": len(used),
        "seconds_per_episode": float(np.mean([s for _, _, s in used])),
    }
    _write_dataset(root, name, kept, staging, image_size)
    manifest = {
        "settings": settings,
        "fps": spec.fps,
        "robot": spec.robot,
        "held_out": spec.held_out,
        "episodes": [{"task": a.task, "seed": a.seed, "attempt": a.attempt} for a in kept],
        "stats": stats,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_dataset(root: Path, name: str, kept: list[Attempt], staging: Path, image_size: int) -> None:
    from xvla.data.lerobot_writer import LeRobotV3Writer

    spec = entry(name).spec
    writer = LeRobotV3Writer(
        root,
        int(spec.fps),
        _features(name, image_size),
        robot_type=spec.robot,
        video_codec=_video_codec(),
        overwrite=True,
    )
    try:
        for a in kept:
            record = _load_record(_staged_path(staging, a), a)
            instruction = spec.tasks[a.task]
            for i in range(len(record.states)):
                frame = {camera_key(c): record.images[c][i] for c in spec.cameras}
                frame["observation.state"] = record.states[i]
                frame["action"] = record.actions[i]
                writer.add_frame(frame, task=instruction)
            writer.save_episode()
        writer.finalize()
    except BaseException:
        writer.abort()
        raise


def _video_codec() -> str | None:
    """H.264 when this PyAV build has it: SVT-AV1 (the writer's default) was seen to deadlock inside
    `svt_av1_enc_send_picture` on a loaded 2-core machine, and H.264 also decodes faster for training."""
    from xvla.data.lerobot_writer import available_video_encoder

    try:
        available_video_encoder("libx264")
    except ValueError:
        return None
    return "libx264"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ep", leave=True)


def generate_suite(
    sources: Sequence[str] | None = None,
    episodes: int = 20,
    out: str | Path | None = None,
    workers: int = 1,
    image_size: int = 64,
    seed: int = 0,
    *,
    episodes_by_source: Mapping[str, int] | None = None,
    progress: bool = True,
) -> Path:
    """Generate (or reuse) one dataset per source and write `<out>/mixture.json`; returns its path.

    sources: names, optionally with tasks (`"mw_sawyer:pick-place,push"`), or "all" / "pretrain"; default
        all pre-training sources. `episodes` successful episodes per source (`episodes_by_source[name]` for the
        sources it names), spread round-robin over its tasks.
    The mixture lists the requested sources with fixed domain ids; when held-out sources are among them,
    `pretrain.json` and `heldout.json` split it for pre-training and adaptation.
    """
    from xvla.data.sources import Mixture

    counts = dict(episodes_by_source or {})
    if episodes < 1 or any(n < 1 for n in counts.values()):
        raise ValueError(f"episodes: expected >= 1, got {episodes} (by source: {counts})")
    if image_size < 16 or image_size % 2:
        raise ValueError(f"image_size: expected an even number >= 16, got {image_size}")
    selection = parse_selection(list(sources) if sources else ["pretrain"])
    if unknown := sorted(set(counts) - set(selection)):
        raise ValueError(f"episodes_by_source: {unknown} not among the sources {sorted(selection)}")
    out = Path(out) if out is not None else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    pool = None
    if workers > 1:
        pool = mp.get_context("spawn").Pool(workers)
    report = {}
    try:
        for name, tasks in selection.items():
            n = counts.get(name, episodes)
            manifest = generate_source(
                name, tasks, n, out, image_size=image_size, seed=seed, pool=pool, progress=progress
            )
            report[name] = manifest["stats"]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        for env in _WORKER_ENVS.values():  # in-process runs (workers=1) keep their environments here
            env.close()
        _WORKER_ENVS.clear()
    all_sources = [entry(n).source(n) for n in selection]
    Mixture(tuple(all_sources)).save(out / MIXTURE)
    held = [s for s in all_sources if entry(s.name).spec.held_out]
    if held and len(held) < len(all_sources):
        Mixture(tuple(s for s in all_sources if s not in held)).save(out / "pretrain.json")
        Mixture(tuple(held)).save(out / "heldout.json")
    summary = out / "suite.json"
    known = json.loads(summary.read_text())["sources"] if summary.is_file() else {}
    summary.write_text(json.dumps({"sources": {**known, **report}}, indent=2) + "\n")
    return out / MIXTURE


def suite_report(out: str | Path) -> dict[str, Any]:
    """Expert statistics of the datasets in a generated suite folder."""
    return json.loads((Path(out) / "suite.json").read_text())
