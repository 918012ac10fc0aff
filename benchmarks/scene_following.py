"""Does a policy's first chunk follow the scene, or the average motion? (docs/demo.md, "What limits success")

For each evaluation seed the source is reset twice: once the scripted expert runs `--seconds` of control steps, once
the policy is queried at the reset and its chunk is read at the same step. Across seeds the reset pose is (nearly)
the same and only the objects move, so a policy that reads the images moves its end-effector target with the
expert's: the slope of policy on expert per position coordinate is ~1. A policy that ignores the images gives
~0, whatever its validation loss. Cheap (one query per seed), so it scores an image-path change before a
closed-loop run. Sources with absolute end-effector actions only.

    PYTHONPATH=src python benchmarks/scene_following.py CKPT MIXTURE --source so100_bimanual --seeds 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def first_chunk_slopes(
    env: Any, policy: Any, columns: list[int], task: str | None, seeds: int, steps: int
) -> list[dict[str, float]]:
    """Per moving column of the native action: expert std across seeds, slope and correlation of the policy's
    chunk (action `steps - 1`, queried at the reset) on the expert's action after `steps` steps. `policy` is any
    `xvla.sim.evaluate.ChunkPolicy`."""
    from xvla.sim.evaluate import eval_seed, request

    expert, chosen = [], []
    for episode in range(seeds):
        seed = eval_seed(0, episode)
        obs = env.reset(seed, task)
        for _ in range(steps):
            action = env.expert(obs)
            env.step(action)
            obs = env.observe(render=False)
        expert.append(np.asarray(action)[columns])
        obs = env.reset(seed, task)
        policy.reset()
        actions = np.asarray(policy.infer(request(env, obs))["actions"])
        chosen.append(actions[min(steps, len(actions)) - 1][columns])
    e, p = np.array(expert), np.array(chosen)
    rows = []
    for j, column in enumerate(columns):
        if e[:, j].std() > 1e-3:  # coordinates the scene moves
            moves = p[:, j].std() > 0
            rows.append(
                {
                    "column": column,
                    "expert_std": float(e[:, j].std()),
                    "slope": float(np.polyfit(e[:, j], p[:, j], 1)[0]),
                    "corr": float(np.corrcoef(e[:, j], p[:, j])[0, 1]) if moves else 0.0,
                }
            )
    return rows


def scene_following(
    checkpoint: str, mixture: Path, source: str, task: str | None, seeds: int, seconds: float
) -> list[dict[str, float]]:
    """`first_chunk_slopes` of a checkpoint on one source of the mixture it was trained on."""
    from xvla.data.sources import Mixture
    from xvla.serve.policy import Policy
    from xvla.sim.suite import entry

    src = {s.name: s for s in Mixture.load(mixture).sources}[source]
    if any(arm.pose.mode != "absolute" for arm in src.action.arms):
        raise SystemExit(f"--source {source}: needs absolute end-effector actions")
    policy = Policy.from_checkpoint(checkpoint, source=src, device="cpu", seed=0)
    env = entry(source).factory(policy.model.config.image_size)
    columns = [p for arm in src.action.arms for p in arm.position]
    try:
        return first_chunk_slopes(env, policy, columns, task, seeds, max(1, round(seconds * env.spec.fps)))
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("mixture", type=Path, help="the mixture the checkpoint was trained on")
    parser.add_argument("--source", required=True)
    parser.add_argument("--task", help="task id (default: the source's first)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=0.9, help="within the 1 s chunk")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = scene_following(args.checkpoint, args.mixture, args.source, args.task, args.seeds, args.seconds)
    print(json.dumps({"source": args.source, "seeds": args.seeds, "coordinates": rows}, indent=1))


if __name__ == "__main__":
    main()
