"""Closed-loop evaluation in the simulated sources, and the oracle check of the action path.

A policy is anything with `infer(obs) -> {"actions": [K, native_dim], ...}` and `reset()`, where `obs` is the
Source request format of `xvla.serve.policy.Policy`: ``{"images": {camera_key: uint8 [H, W, 3]}, "state":
native [S], "instruction": str}``. Each query's first `execute` actions are executed at the source's control
rate (`execute = round(replan_s * fps)`), then the policy is queried again. Evaluation seeds come from their
own namespace, so they never coincide with the seeds of generated training episodes.

The **oracle** replays recorded episodes from their initial state: at each query it feeds the episode's own
30 anchors (built by the data layer, `MixtureDataset.episode` + `anchors.intention_targets`) through the
serving post-processing (`resample_anchors`, `Source.canonical_to_native`) exactly as a model's output would
go, which checks the whole action path independently of learning.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from xvla.sim.base import SimSource
from xvla.sim.suite import camera_key, entry

EVAL_NAMESPACE = "eval"


class ChunkPolicy(Protocol):
    def infer(self, obs: Mapping[str, Any]) -> Mapping[str, Any]: ...

    def reset(self) -> None: ...


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (n = 0 -> (0, 1))."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def eval_seed(seed: int, episode: int) -> int:
    digest = hashlib.sha256(f"{EVAL_NAMESPACE}:{seed}:{episode}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def request(env: SimSource, obs: Any) -> dict[str, Any]:
    """A simulator observation as a Policy request (Source format, native image orientation)."""
    return {
        "images": {camera_key(c): obs.images[c] for c in env.spec.cameras},
        "state": obs.state,
        "instruction": obs.instruction,
    }


def run_episode(
    env: SimSource,
    policy: ChunkPolicy,
    task: str,
    seed: int,
    *,
    execute: int,
    max_steps: int | None = None,
    video: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """One closed-loop episode; returns {"success", "steps", "queries", "seconds", "milestones"}, where
    `milestones` names each of the source's sub-goals (`SimSource.milestones`) with whether the episode ever
    reached it."""
    start = time.perf_counter()
    env.reset(seed, task)
    policy.reset()
    limit = max_steps or env.max_steps
    queue: list[np.ndarray] = []
    queries = 0
    success = False
    reached = dict.fromkeys(env.milestones(), False)
    flip = env.spec.flipped_cameras
    for _ in range(limit):
        if not queue:
            obs = env.observe(render=True)
            actions = np.asarray(policy.infer(request(env, obs))["actions"])
            if actions.ndim != 2 or len(actions) == 0:
                raise ValueError(
                    f"policy reply 'actions': expected [K, native_dim] with K >= 1, got {actions.shape}"
                )
            queue = list(actions[:execute])
            queries += 1
        if video is not None:
            cam = env.spec.cameras[0]
            image = env.observe(render=True).images[cam]
            video.append(image[::-1, ::-1] if cam in flip else image)
        env.step(queue.pop(0))
        for name, now in env.milestones().items():
            reached[name] = reached.get(name, False) or now
        if env.success():
            success = True
            break
    return {
        "success": success,
        "steps": env.steps,
        "queries": queries,
        "seconds": time.perf_counter() - start,
        "milestones": reached,
    }


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """MP4 of RGB frames [H, W, 3] (H.264 when available)."""
    import av

    from xvla.data.lerobot_writer import available_video_encoder

    try:
        encoder, _, options = available_video_encoder("libx264")
    except ValueError:
        encoder, _, options = available_video_encoder()
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        # a video encoder of VIDEO_ENCODERS; PyAV types a stream by the codec name's literal
        stream = cast(
            "av.VideoStream",
            container.add_stream(
                encoder, rate=max(1, round(fps)), options={k: v for k, v in options.items() if k != "g"}
            ),
        )
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def count_milestones(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Episodes that reached each sub-goal, summed over episodes' flags or over summaries' counts."""
    total: dict[str, int] = {}
    for part in parts:
        for name, count in part.items():
            total[name] = total.get(name, 0) + int(count)
    return total


def _summary(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    k, n = sum(o["success"] for o in outcomes), len(outcomes)
    low, high = wilson_interval(k, n)
    milestones = count_milestones(o.get("milestones", {}) for o in outcomes)
    return {
        "successes": k,
        "episodes": n,
        "success_rate": k / n if n else 0.0,
        "ci95": [low, high],
        "mean_steps": float(np.mean([o["steps"] for o in outcomes])) if n else 0.0,
        "milestones": milestones,
    }


def merge_evaluations(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task `evaluate` results of one policy on one source -> totals with a 95% Wilson interval."""
    tasks: dict[str, Any] = {}
    for part in parts:
        for task, value in part["tasks"].items():
            tasks[task] = {k: v for k, v in value.items() if k != "outcomes"}
    k = sum(t["successes"] for t in tasks.values())
    n = sum(t["episodes"] for t in tasks.values())
    steps = sum(t["mean_steps"] * t["episodes"] for t in tasks.values())
    milestones = count_milestones(t.get("milestones", {}) for t in tasks.values())
    return {
        "successes": k,
        "episodes": n,
        "success_rate": k / n if n else 0.0,
        "ci95": list(wilson_interval(k, n)),
        "mean_steps": steps / n if n else 0.0,
        "milestones": milestones,
        "tasks": tasks,
    }


def _execute_steps(env: SimSource, replan_s: float) -> int:
    return max(1, round(replan_s * env.spec.fps))


def evaluate(
    policy_factory: Callable[[], ChunkPolicy],
    source: str,
    episodes: int = 50,
    *,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    image_size: int = 64,
    replan_s: float = 0.25,
    video_dir: str | Path | None = None,
    videos: int = 4,
    progress: bool = True,
    env: SimSource | None = None,
) -> dict[str, Any]:
    """Closed-loop success of a policy on one simulated source.

    `episodes` per task (all of the source's tasks unless `tasks`); episode i of a task starts from
    `eval_seed(seed, i)`. Returns per-task and overall success with 95% Wilson intervals; with `video_dir`
    the first `videos` episodes of each task are written as MP4 (primary camera).
    """
    spec = entry(source).spec
    chosen = [spec.check_task(t) for t in tasks] if tasks else list(spec.tasks)
    own_env = env is None
    env = env or entry(source).factory(image_size)
    policy = policy_factory()
    execute = _execute_steps(env, replan_s)
    bar = _bar(episodes * len(chosen), f"eval {source}", progress)
    per_task: dict[str, list[dict[str, Any]]] = {}
    try:
        for task in chosen:
            per_task[task] = []
            for i in range(episodes):
                frames: list[np.ndarray] | None = [] if video_dir is not None and i < videos else None
                outcome = run_episode(env, policy, task, eval_seed(seed, i), execute=execute, video=frames)
                outcome["seed"] = eval_seed(seed, i)
                per_task[task].append(outcome)
                if frames and video_dir is not None:  # frames is None without video_dir
                    write_video(Path(video_dir) / source / f"{task}-{i:03d}.mp4", frames, spec.fps)
                bar.update(1)
                done = [o["success"] for outs in per_task.values() for o in outs]
                bar.set_postfix(success=f"{sum(done)}/{len(done)}")
    finally:
        bar.close()
        if own_env:
            env.close()
    everything = [o for outs in per_task.values() for o in outs]
    return {
        "source": source,
        "seed": seed,
        "replan_s": replan_s,
        "execute_steps": execute,
        "tasks": {t: {**_summary(outs), "outcomes": outs} for t, outs in per_task.items()},
        **_summary(everything),
    }


# ------------------------------------------------------------------ replays and the oracle


def replay_actions(env: SimSource, task: str, seed: int, actions: np.ndarray) -> bool:
    """Execute recorded native actions [N, A] open loop from `reset(seed, task)`; True if the task succeeds."""
    env.reset(seed, task)
    for action in actions:
        env.step(action)
        if env.success():
            return True
    return False


class OraclePolicy:
    """Serves one recorded episode's own anchors through the serving post-processing (module doc).

    `clock()` gives the current episode time in seconds: the anchors are those of the recording at that time.
    """

    def __init__(self, source: Any, episode: Any, clock: Callable[[], float]) -> None:
        self.source = source
        self.episode = episode
        self.clock = clock

    def reset(self) -> None:
        pass

    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        from xvla.data.anchors import intention_targets
        from xvla.serve.codecs.source import resample_anchors

        s, ep = self.source, self.episode
        state = np.asarray(obs["state"], dtype=np.float64)
        anchors = intention_targets(
            ep.target_times,
            ep.targets,
            self.clock(),
            s.horizon_s,
            num_arms=s.num_arms,
            rot6d_layout=s.rot6d_layout,
            binary_grippers=s.binary_grippers,
        )
        canonical = resample_anchors(s, s.state_to_canonical(state), anchors)
        return {"actions": s.canonical_to_native(canonical, state).astype(np.float32), "anchors": anchors}


def oracle_check(
    mixture: str | Path,
    source: str,
    episodes: int | None = None,
    *,
    replan_s: float = 0.25,
    image_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Replay recorded episodes of `source` (from `mixture`, a generated suite's mixture file) through the
    policy action path; returns the oracle success rate next to the expert's and their ratio."""
    from xvla.data.mixture import MixtureDataset
    from xvla.data.sources import Mixture
    from xvla.sim.generate import read_manifest

    described = Mixture.load(mixture)[source]
    manifest = read_manifest(described.path)
    recorded = manifest["episodes"]
    n = len(recorded) if episodes is None else min(episodes, len(recorded))
    data = MixtureDataset(Mixture((described,)))
    env = entry(source).factory(image_size or manifest["settings"]["image_size"])
    execute = _execute_steps(env, replan_s)
    outcomes = []
    bar = _bar(n, f"oracle {source}", progress)
    try:
        for ep in range(n):
            oracle = OraclePolicy(described, data.episode(0, ep), lambda: env.steps / env.spec.fps)
            outcome = run_episode(env, oracle, recorded[ep]["task"], recorded[ep]["seed"], execute=execute)
            outcomes.append({**outcome, "task": recorded[ep]["task"], "seed": recorded[ep]["seed"]})
            bar.update(1)
            bar.set_postfix(success=f"{sum(o['success'] for o in outcomes)}/{len(outcomes)}")
    finally:
        bar.close()
        env.close()
    expert = manifest["stats"]["expert_success_rate"]
    summary = _summary(outcomes)
    return {
        "source": source,
        "replan_s": replan_s,
        "execute_steps": execute,
        **summary,
        "expert_success_rate": expert,
        "ratio_to_expert": summary["success_rate"] / expert if expert else 0.0,
        "tasks": {
            t: _summary([o for o in outcomes if o["task"] == t])
            for t in dict.fromkeys(o["task"] for o in outcomes)
        },
        "outcomes": outcomes,
    }


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ep")


def save_results(results: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
