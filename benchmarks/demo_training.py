"""Pre-training throughput of the demo configuration, data loading included: the previous default and the current
one side by side in one run, on the demo's own generated datasets.

    PYTHONPATH=src python benchmarks/demo_training.py --data demo_out/data            # after one `xvla demo`
    PYTHONPATH=src python benchmarks/demo_training.py --data DIR --steps 120 --rounds 3

Each variant is the real trainer (`xvla.train.trainer.train`: MixtureDataset -> ObservationTransform -> model ->
AdamW) on the demo's pre-training mixture, launched as the demo launches it (`launch_cpu`: torchrun, fresh
processes with their own torch thread count), for `--steps` steps; its rate is the median of the trainer's logged samples/s after the first log interval (validation and
checkpoint writes excluded). Variants take turns for `--rounds` rounds so that machine load hits them alike; the
ratio of medians is the speed-up. Prints a table and writes benchmarks/results/demo_training_cpu.json.

Variants (`VARIANTS`):
- `previous`: the demo scale before issue #12: DaViT ending in a 2x2 grid, dropout 0.1 everywhere, exact GELU in
  the encoders and tanh GELU in the head, 24 text tokens, fp32, batch 16, per-tensor AdamW, one torch thread (the old "idle cores" rule on a
  machine that just finished generating), every frame decoded from video at every draw. (The episode cache is the
  current one: the old 32-episode cap is no longer an option, so the ratio slightly understates the gain.)
- `one_process`: `DemoConfig()`'s model and recipe (2x2 grid, no dropout, exact GELU, 16 text tokens, batch 32,
  fused AdamW) in fp32, decoded-frame cache (filled before the first step, so the rate is the steady one), one
  process using every core: the demo's training before it went data-parallel on CPU.
- `fp32`: one process per core (`devices.cpu_train_processes`; DDP over gloo), the cores divided among them as
  threads, each with its share of the batch (the global batch and the recipe are unchanged) and its own frame
  cache, in fp32: the demo's training on a CPU without bf16 instructions.
- `current`: `DemoConfig()` as the demo trains it: `fp32` with precision `auto`, i.e. bf16 autocast where the CPU
  has bf16 dot products (`avx512_bf16`, `amx_bf16`; fp32 master weights, the attention and the action's input and
  output layers kept in fp32), else the same as `fp32`.

Every variant trains the same steps from the same seed; `loss` is the mean logged training loss over the second
half of the steps, so a variant that is faster per sample but learns less per sample shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import _common as C
from xvla import demo, devices
from xvla.data.sources import Mixture
from xvla.demo import stages
from xvla.train.distributed import launch_cpu


@dataclasses.dataclass(frozen=True)
class Variant:
    changes: dict[str, Any]  # DemoConfig fields
    threads: int | None  # torch threads per training process (None: the cores divided among the processes)
    cache_gib: float  # decoded-frame cache
    fused: bool  # fused AdamW
    # data-parallel training processes (None: the demo's rule, devices.cpu_train_processes)
    processes: int | None


VARIANTS: dict[str, Variant] = {
    "previous": Variant(
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
                "head.activation": "gelu_pytorch_tanh",
                "max_text_len": 24,
            },
            "precision": "no",
        },
        threads=1,
        cache_gib=0.0,
        fused=False,
        processes=1,
    ),
    "one_process": Variant({"precision": "no"}, threads=None, cache_gib=1.0, fused=True, processes=1),
    "fp32": Variant({"precision": "no"}, threads=None, cache_gib=1.0, fused=True, processes=None),
    "current": Variant({}, threads=None, cache_gib=1.0, fused=True, processes=None),
}


def train_config(name: str, data: Path, folder: Path, steps: int) -> tuple[Any, stages.Runtime]:
    """The variant's TrainConfig (its mixture written into `folder`) and the Runtime that trains it."""
    variant = VARIANTS[name]
    cfg = demo.DemoConfig().replace(**variant.changes)
    cores = devices.default_threads()
    processes = variant.processes or devices.cpu_train_processes(cfg.batch_size, cores)
    rt = stages.Runtime(
        out=folder,
        data=data,
        device="cpu",
        workers=1,
        threads=variant.threads or max(1, cores // processes),
        progress=False,
        train_processes=processes,
    )
    mixture = stages.cached_mixture(data, cfg.pretrain_sources, cfg.episodes, cfg.source_episodes)
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
        data=dataclasses.replace(tcfg.data, frame_cache_gib=variant.cache_gib),
        optim=dataclasses.replace(tcfg.optim, fused=variant.fused),
        val=dataclasses.replace(tcfg.val, every=0),
        log=dataclasses.replace(tcfg.log, every=10),
    )
    return tcfg, rt


def run_one(tcfg: Any, rt: stages.Runtime) -> tuple[list[float], float]:
    """Train in fresh process(es) through the demo's launcher; the logged (global) samples/s after the first
    interval, and the mean logged training loss over the second half of the run."""
    launch_cpu(tcfg, processes=rt.train_processes, threads=rt.threads)
    scalars = json.loads((Path(tcfg.output_dir) / "history.json").read_text())["scalars"]
    losses = scalars["train/loss"]
    return scalars["train/samples_per_s"][1:], statistics.fmean(losses[len(losses) // 2 :])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the demo's generated datasets (demo_out/data)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma list; 'previous' is the 1.00 baseline"
    )
    args = p.parse_args()
    names = args.variants.split(",")
    if "previous" not in names or not set(names) <= set(VARIANTS):
        p.error(
            f"--variants: expected a comma list of {sorted(VARIANTS)} including 'previous', got {args.variants!r}"
        )
    rates: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}
    layout: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names:
                folder = Path(tmp) / f"{name}-{r}"
                folder.mkdir()
                tcfg, rt = train_config(name, Path(args.data), folder, args.steps)
                layout[name] = (rt.train_processes, rt.threads)
                rate, loss = run_one(tcfg, rt)
                rates[name] += rate
                losses[name].append(loss)
                print(
                    f"round {r}: {name}: median {statistics.median(rates[name]):.1f} samples/s, loss {loss:.4f}",
                    flush=True,
                )
    rows = []
    base = statistics.median(rates["previous"])
    for name, values in rates.items():
        med = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4)
        rows.append(
            {
                "variant": name,
                "processes": layout[name][0],
                "threads": layout[name][1],
                "samples_per_s": round(med, 1),
                "iqr": round(quartiles[2] - quartiles[0], 1),
                "speedup": round(med / base, 2),
                "loss": round(statistics.fmean(losses[name]), 4),
            }
        )
    C.print_table(rows, ["variant", "processes", "threads", "samples_per_s", "iqr", "speedup", "loss"])
    env = C.environment(C.pick_device("cpu"))
    C.write_json("demo_training_cpu.json", {"environment": env, "steps": args.steps, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
