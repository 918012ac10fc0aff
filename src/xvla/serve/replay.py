"""Train/serve consistency: replay dataset frames through the serving path.

For each frame drawn by `MixtureDataset` (the validation split by default, the same draws as validation with
the same seed), the robot observation is rebuilt as a robot would send it (native state vector, unflipped
camera frames, instruction) and goes through `Policy.prepare` with the frame's Source. Two numbers per source:

- `input_max_abs_diff`: the largest difference between the model inputs built by the serving path and those
  the training transform builds from the dataset sample (0 when both paths agree);
- `l1`: mean |sampled anchors - dataset targets| in canonical space (the validation L1).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from xvla.data.mixture import MixtureDataset
from xvla.data.sources import Mixture, Source
from xvla.serve.codecs import Prepared
from xvla.serve.policy import Policy


def _robot_observation(dataset: MixtureDataset, source: Source, sample: dict[str, Any]) -> dict[str, Any]:
    """What the robot would have sent at that frame: native state, raw (unflipped) frames, instruction."""
    reader = dataset.dataset(sample["source_idx"])
    ep, frame = sample["episode"], sample["frame"]
    return {
        "images": {cam.key: reader.read_frames(ep, cam.key, [frame])[0] for cam in source.cameras},
        "state": reader.read_lowdim(ep, source.state.key)[frame],
        "instruction": sample["instruction"],
    }


def replay(
    policy: Policy,
    mixture: Mixture,
    *,
    split: str = "val",
    samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Replay `samples` frames; returns {"sources": {name: {"samples", "l1", "input_max_abs_diff"}}, "overall"}."""
    dataset = MixtureDataset(mixture, split=split, seed=seed)
    policies = {s.name: policy.with_source(s) for s in mixture.sources}
    l1: dict[str, list[float]] = defaultdict(list)
    input_diff: dict[str, float] = defaultdict(float)
    pending: list[tuple[str, Prepared, np.ndarray]] = []

    def flush() -> None:
        replies = policy.run([p for _, p, _ in pending])
        for (name, _, target), reply in zip(pending, replies, strict=True):
            l1[name].append(float(np.abs(reply["anchors"] - target).mean()))
        pending.clear()

    for index in range(samples):
        sample = dataset.sample(0, index)
        name = sample["source"]
        served = policies[name].prepare(_robot_observation(dataset, mixture[name], sample))
        trained = policy.transform(sample)
        for key, value in served.inputs.items():
            diff = (
                (value.double() - torch.as_tensor(trained[key]).double()).abs().max().item()
                if value.numel()
                else 0.0
            )
            input_diff[name] = max(input_diff[name], diff)
        pending.append((name, served, sample["action"]))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    per_source = {
        name: {"samples": len(v), "l1": float(np.mean(v)), "input_max_abs_diff": input_diff[name]}
        for name, v in sorted(l1.items())
    }
    every = [x for v in l1.values() for x in v]
    return {
        "split": split,
        "steps": policy.config.steps,
        "sources": per_source,
        "overall": {
            "samples": len(every),
            "l1": float(np.mean(every)) if every else float("nan"),
            "input_max_abs_diff": max(input_diff.values(), default=0.0),
        },
    }


def format_report(report: dict[str, Any]) -> str:
    rows = [f"{'source':<24} {'samples':>8} {'l1':>10} {'input diff':>11}"]
    for name, r in [*report["sources"].items(), ("overall", report["overall"])]:
        rows.append(f"{name:<24} {r['samples']:>8d} {r['l1']:>10.5f} {r['input_max_abs_diff']:>11.2e}")
    return "\n".join(rows)
