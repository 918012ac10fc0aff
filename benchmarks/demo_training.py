"""Pre-training throughput of the demo configuration, data loading included: the previous default and the current
one side by side in one run, on the demo's own generated datasets.

    PYTHONPATH=src python benchmarks/demo_training.py --data demo_out/data            # after one `xvla demo`
    PYTHONPATH=src python benchmarks/demo_training.py --data DIR --steps 120 --rounds 3

Each variant is the real trainer (`xvla.train.trainer.train`: MixtureDataset -> ObservationTransform -> model ->
AdamW) on the demo's pre-training mixture, in its own process with its own torch thread count, for `--steps`
steps; its rate is the median of the trainer's logged samples/s after the first log interval (validation and
checkpoint writes excluded). Variants take turns for `--rounds` rounds so that machine load hits them alike; the
ratio of medians is the speed-up. Prints a table and writes benchmarks/results/demo_training_cpu.json.

Variants (`VARIANTS`):
- `previous`: the demo scale before issue #12: DaViT ending in a 2x2 grid, dropout 0.1 everywhere, exact GELU in
  the encoders, 24 text tokens, batch 16, per-tensor AdamW, one torch thread (the old "idle cores" rule on a
  machine that just finished generating), every frame decoded from video at every draw. (The episode cache is the
  current one: the old 32-episode cap is no longer an option, so the ratio slightly understates the gain.)
- `current`: `DemoConfig()` as it is (2x2 grid, no dropout, tanh GELU, 16 text tokens, batch 32, fused AdamW),
  every core, decoded-frame cache (filled before the first step, so the rate is the steady one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as C
from xvla import demo, devices
from xvla.data.sources import Mixture
from xvla.demo import stages

# name -> (DemoConfig changes, torch threads (None = every core), frame cache GiB, fused AdamW)
VARIANTS: dict[str, tuple[dict[str, Any], int | None, float, bool]] = {
    "previous": (
        {
            "batch_size": 16,
            "model_overrides": {
                "num_views": 2,
                "vision.patch_stride": [4, 2, 2, 2],
                "vision.drop_path_rate": 0.1,
                "text.dropout": 0.1,
                "text.attention_dropout": 0.1,
                "head.dropout": 0.1,
                "vision.activation_function": "gelu",
                "text.activation_function": "gelu",
                "max_text_len": 24,
            },
        },
        1,
        0.0,
        False,
    ),
    "current": ({}, None, 1.0, True),
}


def train_config(name: str, data: Path, folder: Path, steps: int) -> tuple[Path, int]:
    """Write the variant's TrainConfig JSON (and mixture) into `folder`; returns (config path, threads)."""
    from xvla.configio import save_config

    changes, threads, cache_gib, fused = VARIANTS[name]
    cfg = demo.DemoConfig().replace(**changes)
    threads = threads or devices.default_threads()
    rt = stages.Runtime(out=folder, data=data, device="cpu", workers=1, threads=threads, progress=False)
    mixture = stages.cached_mixture(data, cfg.pretrain_sources, cfg.episodes)
    mixture = Mixture(tuple(dataclasses.replace(s, val_count=cfg.val_episodes) for s in mixture.sources))
    mixture.save(folder / "mixture.json")
    num_domains = max(s.domain_id for s in mixture.sources) + 1
    tcfg = stages.train_config(
        cfg,
        rt,
        output=folder / "run",
        mixture=folder / "mixture.json",
        steps=steps,
        lr=cfg.lr,
        prompt_steps=0,
        model={"preset": cfg.preset, "overrides": stages.model_config_overrides(cfg, num_domains)},
    )
    tcfg = dataclasses.replace(
        tcfg,
        data=dataclasses.replace(tcfg.data, frame_cache_gib=cache_gib),
        optim=dataclasses.replace(tcfg.optim, fused=fused),
        val=dataclasses.replace(tcfg.val, every=0),
        log=dataclasses.replace(tcfg.log, every=10),
    )
    path = folder / "train_config.json"
    save_config(tcfg, path)
    return path, threads


def run_one(config: Path, threads: int) -> list[float]:
    """Train in a fresh process; the logged samples/s after the first interval."""
    code = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[2]));"
        "from xvla.configio import load_config; from xvla.train.config import TrainConfig;"
        "from xvla.train.trainer import train;"
        "train(load_config(TrainConfig, sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(C.REPO / "src")}
    subprocess.run([sys.executable, "-c", code, str(config), str(threads)], check=True, env=env)
    history = json.loads((config.parent / "run" / "history.json").read_text())
    return history["scalars"]["train/samples_per_s"][1:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the demo's generated datasets (demo_out/data)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    threads: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in VARIANTS:
                folder = Path(tmp) / f"{name}-{r}"
                folder.mkdir()
                config, threads[name] = train_config(name, Path(args.data), folder, args.steps)
                rates[name] += run_one(config, threads[name])
                print(f"round {r}: {name}: median {statistics.median(rates[name]):.1f} samples/s", flush=True)
    rows = []
    base = statistics.median(rates["previous"])
    for name, values in rates.items():
        med = statistics.median(values)
        rows.append(
            {
                "variant": name,
                "threads": threads[name],
                "samples_per_s": round(med, 1),
                "iqr": round(statistics.quantiles(values, n=4)[2] - statistics.quantiles(values, n=4)[0], 1),
                "speedup": round(med / base, 2),
            }
        )
    C.print_table(rows, ["variant", "threads", "samples_per_s", "iqr", "speedup"])
    env = C.environment(C.pick_device("cpu"))
    C.write_json("demo_training_cpu", {"environment": env, "steps": args.steps, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
