"""Execution strategies in closed loop with injected inference latency (docs/serving.md, "Smooth real-time control").

Each cell runs `--episodes` episodes of one simulated source with one strategy at one latency, through
`Policy.step` (the same `Executor` and `Session` as the server and client). Latency is injected in simulated
time, deterministically: with latency L at control rate f a reply arrives d = ceil(L * f) ticks after its query
(`PolicyConfig.latency_steps`); meanwhile the robot executes the previous chunk (ensembling, RTC) or holds still
(synchronous: what waiting means). Reported per cell: success with a 95% Wilson interval, the mean jerk of the
commanded position (third difference x f^3, m/s^3, averaged over ticks then episodes) and the jump of the
commanded position at chunk boundaries (ticks where the executed action comes from another chunk than the tick
before, holds included): the mean over episodes of each episode's largest, and the largest of all.

    nice -n 19 python benchmarks/realtime.py --checkpoint /work/exp/demo_pg/pretrain/checkpoints/step_00001200 \\
        --source rs_ur5e --task Lift --episodes 20 --out benchmarks/results/realtime_ur5e.json
    python benchmarks/realtime.py --table benchmarks/results/realtime_ur5e*.json
    python benchmarks/realtime.py --plot benchmarks/results/realtime_ur5e*.json --plot-out docs/img/realtime_chunks.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xvla.serve.execution import (  # noqa: E402
    RealTimeChunking,
    Strategy,
    Synchronous,
    TemporalEnsemble,
    strategy_to_dict,
)
from xvla.sim.evaluate import eval_seed, request, wilson_interval  # noqa: E402
from xvla.sim.suite import camera_key, entry  # noqa: E402

LATENCIES_MS = (0, 100, 300)


def strategies(execute_steps: int, ensemble_coeff: float) -> dict[str, Strategy]:
    """The three strategies of the table; synchronous and RTC start a chunk every `execute_steps` ticks."""
    return {
        "synchronous": Synchronous(execute_steps=execute_steps),
        "ensemble": TemporalEnsemble(coeff=ensemble_coeff, query_every=1),
        "rtc": RealTimeChunking(execute_steps=execute_steps),
    }


def latency_ticks(latency_ms: float, hz: float) -> int:
    return math.ceil(latency_ms / 1000.0 * hz - 1e-9)


class LazyImages(Mapping[str, np.ndarray]):
    """The cameras of this tick, rendered only if the policy reads them (only query ticks do: rendering costs
    about half a model call on this CPU, and the simulation state does not depend on it)."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.keys_ = [camera_key(c) for c in env.spec.cameras]
        self._images: dict[str, np.ndarray] | None = None

    def __getitem__(self, key: str) -> np.ndarray:
        if self._images is None:
            self._images = request(self.env, self.env.observe(render=True))["images"]
        return self._images[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def run_episode(env: Any, policy: Any, task: str, seed: int) -> dict[str, Any]:
    """One episode through `policy.step`: success, ticks, and per tick the commanded position [3], the measured
    end-effector position [3] and the chunk the action came from (-1: a hold)."""
    env.reset(seed, task)
    policy.reset()
    commanded, measured, chunk = [], [], []
    success = False
    for _ in range(env.max_steps):
        obs = env.observe(render=False)
        tick = {"images": LazyImages(env), "state": obs.state, "instruction": obs.instruction}
        action = np.asarray(policy.step(tick), dtype=np.float64)
        executed = policy.executor.executed_from
        commanded.append(action[:3].tolist())
        measured.append(np.asarray(obs.state[:3], dtype=np.float64).tolist())
        chunk.append(-1 if executed is None else int(executed))
        env.step(action)
        if env.success():
            success = True
            break
    return {
        "success": success,
        "steps": env.steps,
        "commanded": commanded,
        "measured": measured,
        "chunk": chunk,
    }


def smoothness(episode: dict[str, Any], hz: float) -> dict[str, float]:
    """Mean jerk (m/s^3) of the commanded position and the largest position jump (m) at chunk boundaries."""
    pos = np.asarray(episode["commanded"])
    jerk = np.linalg.norm(np.diff(pos, n=3, axis=0), axis=1) * hz**3 if len(pos) > 3 else np.zeros(1)
    chunk = np.asarray(episode["chunk"])
    boundary = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
    jumps = np.linalg.norm(pos[boundary] - pos[boundary - 1], axis=1) if len(boundary) else np.zeros(1)
    return {"mean_jerk": float(jerk.mean()), "max_boundary_jump": float(jumps.max())}


def run_cell(
    args: argparse.Namespace, env: Any, base: Any, strategy: Strategy, latency_ms: float
) -> dict[str, Any]:
    from xvla.serve.policy import PolicyConfig

    hz = env.spec.fps
    d = latency_ticks(latency_ms, hz)
    config = PolicyConfig(steps=args.steps, seed=args.seed, execution=strategy, latency_steps=d)
    policy = base.with_source(base.source, config)
    start = time.perf_counter()
    episodes = [run_episode(env, policy, args.task, eval_seed(args.seed, i)) for i in range(args.episodes)]
    metrics = [smoothness(e, hz) for e in episodes]
    k, n = sum(e["success"] for e in episodes), len(episodes)
    return {
        "strategy": strategy_to_dict(strategy),
        "latency_ms": latency_ms,
        "latency_ticks": d,
        "successes": k,
        "episodes": n,
        "success_rate": k / n,
        "ci95": list(wilson_interval(k, n)),
        "mean_steps": float(np.mean([e["steps"] for e in episodes])),
        "mean_jerk": float(np.mean([m["mean_jerk"] for m in metrics])),
        "boundary_jump_mean_of_max": float(np.mean([m["max_boundary_jump"] for m in metrics])),
        "boundary_jump_max": float(np.max([m["max_boundary_jump"] for m in metrics])),
        "seconds": time.perf_counter() - start,
        "trace": episodes[0],  # the first episode, for the plot
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from xvla.serve.policy import Policy

    torch.set_num_threads(args.threads)
    base = Policy.from_checkpoint(args.checkpoint, source=args.source, device="cpu", steps=args.steps)
    env = entry(args.source).factory(args.image_size)
    execute = max(1, round(args.replan_s * env.spec.fps))
    chosen = strategies(execute, args.ensemble_coeff)
    names = args.strategies or list(chosen)
    out: dict[str, Any] = {
        "source": args.source,
        "task": args.task,
        "checkpoint": str(args.checkpoint),
        "control_hz": env.spec.fps,
        "execute_steps": execute,
        "steps": args.steps,
        "seed": args.seed,
        "command": " ".join(sys.argv),
        "cells": [],
    }
    try:
        for latency in args.latencies:
            for name in names:
                cell = run_cell(args, env, base, chosen[name], latency)
                out["cells"].append({"name": name, **cell})
                print(
                    f"{name:12s} {latency:5.0f} ms (d={cell['latency_ticks']}): {cell['successes']}/{cell['episodes']}"
                    f" jerk {cell['mean_jerk']:.2f} m/s^3, boundary jump {cell['boundary_jump_mean_of_max'] * 100:.2f}"
                    f" cm (max {cell['boundary_jump_max'] * 100:.2f}), {cell['seconds']:.0f} s",
                    flush=True,
                )
                if args.out:
                    _save(out, args.out)
    finally:
        env.close()
    return out


def _save(result: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def merge(paths: list[str]) -> dict[str, Any]:
    """Result files of one source (e.g. one per latency, run side by side) -> one result, cells ordered by latency
    then strategy; a cell measured twice is taken from the later file."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    cells = {(c["latency_ms"], c["name"]): c for r in results for c in r["cells"]}
    order = list(strategies(1, 0.0))
    merged = {**results[0], "commands": [r["command"] for r in results]}
    merged["cells"] = [cells[k] for k in sorted(cells, key=lambda k: (k[0], order.index(k[1])))]
    return merged


def table(result: dict[str, Any]) -> str:
    """The docs' markdown table of one result file."""
    rows = [
        "| strategy | latency | success (95% CI) | mean steps | mean jerk (m/s^3) | boundary jump: mean of max / max (cm) |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        low, high = c["ci95"]
        rows.append(
            f"| {c['name']} | {c['latency_ms']:.0f} ms (d={c['latency_ticks']}) | {c['successes']}/{c['episodes']}"
            f" ({low:.0%}-{high:.0%}) | {c['mean_steps']:.1f} | {c['mean_jerk']:.2f} |"
            f" {c['boundary_jump_mean_of_max'] * 100:.2f} / {c['boundary_jump_max'] * 100:.2f} |"
        )
    return "\n".join(rows)


def plot(result: dict[str, Any], latency_ms: float, out: str, axis: int) -> None:
    """The commanded and measured end-effector coordinate `axis` of each strategy's first episode at
    `latency_ms`, chunk boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c["latency_ms"] == latency_ms]
    if not cells:
        raise SystemExit(f"--plot: no cells at {latency_ms} ms in the result")
    hz = result["control_hz"]
    fig, axes = plt.subplots(len(cells), 1, figsize=(8, 2.4 * len(cells)), sharex=True)
    for ax, cell in zip(np.atleast_1d(axes), cells, strict=True):
        trace = cell["trace"]
        t = np.arange(len(trace["commanded"])) / hz
        ax.plot(t, np.asarray(trace["commanded"])[:, axis], ".-", lw=1, ms=3, label="commanded")
        ax.plot(t, np.asarray(trace["measured"])[:, axis], lw=1, alpha=0.7, label="measured")
        chunk = np.asarray(trace["chunk"])
        for b in np.flatnonzero(chunk[1:] != chunk[:-1]) + 1:
            ax.axvline(t[b], color="grey", lw=0.5, ls=":")
        ax.set_ylabel(f"{'xyz'[axis]} (m)")
        ax.set_title(f"{cell['name']}: {cell['successes']}/{cell['episodes']}", fontsize=9, loc="left")
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="best")
    np.atleast_1d(axes)[-1].set_xlabel("time (s); dotted lines: chunk boundaries")
    fig.suptitle(f"{result['source']} {result['task']}, {latency_ms:.0f} ms inference latency", fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a servable checkpoint folder with the source in its sources.json")
    p.add_argument("--source", default="rs_ur5e")
    p.add_argument("--task", default="Lift")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--latencies", type=float, nargs="+", default=list(LATENCIES_MS), help="ms")
    p.add_argument("--strategies", nargs="+", choices=["synchronous", "ensemble", "rtc"])
    p.add_argument("--replan-s", type=float, default=0.4, help="the demo's replanning period (execute_steps)")
    p.add_argument("--ensemble-coeff", type=float, default=0.01, help="ACT's default")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="evaluation seeds (the demo's) and the sampling noise")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="result JSON (rewritten after every cell)")
    p.add_argument("--plot", nargs="+", help="draw from result JSONs (merged) instead of measuring")
    p.add_argument("--plot-out", default="docs/img/realtime_chunks.png")
    p.add_argument("--plot-latency", type=float, default=300.0)
    p.add_argument("--plot-axis", type=int, default=2, help="0, 1, 2: x, y, z")
    p.add_argument("--table", nargs="+", help="print the markdown table of result JSONs (merged)")
    args = p.parse_args(argv)
    if args.plot:
        plot(merge(args.plot), args.plot_latency, args.plot_out, args.plot_axis)
        return 0
    if args.table:
        print(table(merge(args.table)))
        return 0
    if not args.checkpoint:
        p.error("--checkpoint is required to measure")
    result = measure(args)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
