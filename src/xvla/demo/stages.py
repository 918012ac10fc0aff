"""The stages of `xvla demo` and the run that chains them: generate -> oracle -> pretrain -> adapt (and a
scratch baseline) -> evaluate -> report. Each stage is a function of the `DemoConfig` and the `Runtime`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xvla import configio, devices
from xvla.demo.config import STAGES, DemoConfig
from xvla.demo.report import duration, summary_table, write_json, write_report
from xvla.sim.evaluate import merge_evaluations
from xvla.sim.jobs import SimJob, run_jobs

if TYPE_CHECKING:
    from xvla.train.config import AdaptConfig, TrainConfig


@dataclass(frozen=True)
class Runtime:
    """How this machine runs the demo (not part of the experiment's definition)."""

    out: Path
    data: Path  # generated datasets (cached between runs)
    device: str  # "cpu" or "cuda"
    workers: int  # simulator processes (generation, oracle, evaluation)
    threads: int  # torch threads of each training process
    skip_generate: bool = False
    # CPU training processes (DDP over gloo, each with `threads` threads and its share of the batch); 1 trains in
    # this process.
    train_processes: int = 1
    progress: bool = True
    # The held-out robot's datasets when not in `data` (experiments keep one folder per demonstration count).
    heldout_data: Path | None = None

    def __post_init__(self) -> None:
        if self.train_processes < 1 or (self.train_processes > 1 and self.device != "cpu"):
            raise ValueError(
                f"train_processes: expected 1, or more on device cpu; got {self.train_processes} on {self.device}"
            )


class _Console:
    """Stage headers and tables through rich (plain text when output is not a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.rich = Console(highlight=False)

    def stage(self, index: int, name: str, text: str, budget: float | None) -> None:
        hint = f" (budget {duration(budget)})" if budget else ""
        self.rich.rule(f"[bold]{index}/{len(STAGES)} {name}[/bold]{hint}")
        self.rich.print(text)

    def print(self, *args: Any) -> None:
        self.rich.print(*args)


CONFIG_FILE = "demo_config.json"  # the DemoConfig of the run in an output folder (what `resume` checks)
TRAINING_FOLDERS = ("pretrain", "adapt", "scratch")


def run_demo(cfg: DemoConfig, rt: Runtime, *, resume: bool = False) -> dict[str, Any]:
    """Run every stage, write `results.json`, `report.md` and the plots into `rt.out`; returns the results.

    `resume`: continue the run of the same DemoConfig in `rt.out`: each training stage from its latest checkpoint
    (a finished one is not trained again); generation is cached either way, evaluation runs again."""
    import torch

    console = _Console()
    out = rt.out
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        check_resumable(cfg, out)
    kept = TRAINING_FOLDERS if resume else ()
    for stale in (*TRAINING_FOLDERS, "untrained", "eval", "plots", "mixtures"):
        if stale not in kept:
            shutil.rmtree(out / stale, ignore_errors=True)  # products of an earlier run of the demo itself
    configio.save_config(cfg, out / CONFIG_FILE)
    if rt.device == "cpu":
        torch.set_num_threads(rt.threads)
    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "machine": {**devices.machine_info(rt.device, rt.threads, rt.train_processes), "workers": rt.workers},
        "timing_s": {},
        "budget_s": dict(cfg.budget_s),
    }
    start = time.perf_counter()

    def stage(index: int, name: str, text: str, fn: Callable[[], Any]) -> Any:
        console.stage(index, name, text, cfg.budget_s.get(name))
        t0 = time.perf_counter()
        value = fn()
        results["timing_s"][name] = round(time.perf_counter() - t0, 1)
        console.print(f"[dim]{name}: {duration(results['timing_s'][name])}[/dim]")
        return value

    mixtures = stage(
        1,
        "generate",
        f"scripted experts: {cfg.episodes} episodes x {len(cfg.pretrain_sources)} pre-training sources"
        + "".join(f" ({name}: {n})" for name, n in sorted(cfg.source_episodes.items()))
        + f", {cfg.heldout_episodes} of the held-out {cfg.heldout_name} ({rt.workers} worker(s), cached in {rt.data})",
        lambda: generate_data(cfg, rt),
    )
    results["data"] = describe_data(cfg, mixtures)
    results["oracle"] = stage(
        2,
        "oracle",
        f"{cfg.oracle_episodes} recorded episode(s) per source replayed through the serving action path",
        lambda: run_oracle(cfg, rt, mixtures),
    )
    results["pretrain"] = stage(
        3,
        "pretrain",
        f"{cfg.pretrain_steps} steps x batch {cfg.batch_size}, preset {cfg.preset!r} on {rt.device} "
        f"({rt.train_processes} process(es) x {rt.threads} thread(s))",
        lambda: pretrain(cfg, rt, mixtures, resume=resume),
    )
    results["adapt"] = stage(
        4,
        "adapt",
        f"new domain for {cfg.heldout_name}: {cfg.adapt_prompt_steps} prompt warm-up steps, then "
        f"{cfg.adapt_steps - cfg.adapt_prompt_steps} {cfg.adapt_mode!r} steps",
        lambda: adapt_heldout(cfg, rt, mixtures, Path(results["pretrain"]["checkpoint"]), resume=resume),
    )
    results["data"][cfg.heldout_name]["domain_id"] = results["adapt"]["domain_id"]
    if cfg.scratch_baseline:
        results["scratch"] = stage(
            4,
            "adapt (scratch baseline)",
            f"a fresh model trained {cfg.adapt_steps} steps on {cfg.heldout_name} only",
            lambda: train_scratch(cfg, rt, mixtures, resume=resume),
        )
        results["timing_s"]["adapt"] += results["timing_s"].pop("adapt (scratch baseline)")
    evaluation = stage(
        5,
        "evaluate",
        f"closed loop through the serving Policy, replanning every {cfg.replan_s} s",
        lambda: evaluate_all(cfg, rt, mixtures, results),
    )
    results["heldout_eval"] = evaluation["heldout"]
    results["pretrain_eval"] = evaluation["pretrain"]
    results["learning_curve"] = evaluation["learning_curve"]

    def report() -> None:
        results["soft_prompts"] = soft_prompt_projection(
            Path(results["adapt"]["checkpoint"]), results["adapt"]["domains"]
        )
        results["timing_s"]["total"] = round(time.perf_counter() - start, 1)
        write_report(results, out)

    stage(6, "report", f"results.json, report.md and plots in {out}", report)
    results["timing_s"]["total"] = round(time.perf_counter() - start, 1)
    write_json(out / "results.json", results)  # again: with the report stage's own time
    console.print(summary_table(results, out))
    return results


# ------------------------------------------------------------------------------------------------ stages


def generate_data(cfg: DemoConfig, rt: Runtime) -> dict[str, Path]:
    """Datasets of every source (cached), and the demo's two mixtures with validation episodes set aside."""
    from xvla.data.sources import Mixture
    from xvla.sim.generate import generate_suite

    mixture_dir = rt.out / "mixtures"
    mixture_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, sources, episodes, by_source, data in (
        ("pretrain", cfg.pretrain_sources, cfg.episodes, cfg.source_episodes, rt.data),
        ("heldout", (cfg.heldout_source,), cfg.heldout_episodes, {}, rt.heldout_data or rt.data),
    ):
        if rt.skip_generate:
            mixture = cached_mixture(data, sources, episodes, by_source)
        else:
            written = generate_suite(
                list(sources),
                episodes=episodes,
                out=data,
                workers=rt.workers,
                image_size=cfg.image_size,
                seed=cfg.seed,
                episodes_by_source=by_source,
                progress=rt.progress,
            )
            mixture = Mixture.load(written)
        mixture = Mixture(
            tuple(training_source(cfg, s, pretraining=key == "pretrain") for s in mixture.sources)
        )
        paths[key] = mixture_dir / f"{key}.json"
        mixture.save(paths[key])
    return paths


def training_source(cfg: DemoConfig, source: Any, *, pretraining: bool) -> Any:
    """A generated `Source` as the run trains on it: validation episodes, sampling weight (`source_weights`,
    times its frames when `sampling` is "frames"), domain (`pretrain_domains`), target horizon (`targets`)."""
    from xvla.data.anchors import NUM_POINTS
    from xvla.data.episodes import open_dataset

    weight = float(cfg.source_weights.get(source.name, 1.0))
    if cfg.sampling == "frames":
        ds = open_dataset(source.path)
        weight *= sum(ds.episode_length(e) for e in range(ds.num_episodes))
    changes: dict[str, Any] = {"val_count": cfg.val_episodes, "weight": weight}
    if cfg.targets == "next_frames":
        changes["horizon_s"] = (NUM_POINTS - 1) / source.control_hz
    if pretraining and cfg.pretrain_domains == "shared":
        changes["domain_id"] = 0
    return dataclasses.replace(source, **changes)


def cached_mixture(
    data: Path, sources: Sequence[str], episodes: int, by_source: Mapping[str, int] | None = None
) -> Any:
    """`--skip-generate`: the sources' datasets must already be in `data` with at least `episodes` episodes
    (`by_source[name]` for the sources it names)."""
    from xvla.data.sources import Mixture
    from xvla.sim.generate import read_manifest
    from xvla.sim.suite import entry, parse_selection

    found = []
    for name in parse_selection(list(sources)):
        root = data / name
        try:
            manifest = read_manifest(root)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"--skip-generate: no generated dataset for {name!r} in {data} ({err}); run without it once"
            ) from err
        needed = (by_source or {}).get(name, episodes)
        if len(manifest["episodes"]) < needed:
            raise ValueError(
                f"--skip-generate: {root} has {len(manifest['episodes'])} episodes, the demo needs {needed}"
            )
        found.append(entry(name).source(str(root.resolve())))
    return Mixture(tuple(found))


def describe_data(cfg: DemoConfig, mixtures: Mapping[str, Path]) -> dict[str, Any]:
    """Per source: robot, domain, tasks, episodes (train/val), frames, expert success of the generation."""
    from xvla.data.episodes import open_dataset
    from xvla.data.sources import Mixture
    from xvla.sim.generate import read_manifest

    out: dict[str, Any] = {}
    for key, path in mixtures.items():
        for source in Mixture.load(path).sources:
            manifest = read_manifest(source.path)
            ds = open_dataset(source.path)
            out[source.name] = {
                "role": "held-out" if key == "heldout" else "pre-training",
                "robot": manifest["robot"],
                "domain_id": source.domain_id,
                "fps": manifest["fps"],
                "tasks": manifest["settings"]["tasks"],
                "episodes": ds.num_episodes,
                "val_episodes": source.val_count,
                "frames": int(sum(ds.episode_length(e) for e in range(ds.num_episodes))),
                "expert_success_rate": manifest["stats"]["expert_success_rate"],
                "expert_attempts": manifest["stats"]["attempts"],
                "path": source.path,
            }
    return out


def run_oracle(cfg: DemoConfig, rt: Runtime, mixtures: Mapping[str, Path]) -> dict[str, Any]:
    """Oracle success per source (recorded anchors through the serving post-processing), with the expert's."""
    if cfg.oracle_episodes == 0:
        return {}
    jobs = [
        SimJob("oracle", name, str(path), {"episodes": cfg.oracle_episodes, "replan_s": cfg.replan_s})
        for key, path in mixtures.items()
        for name in (cfg.pretrain_names if key == "pretrain" else (cfg.heldout_name,))
    ]
    results = run_jobs(jobs, rt.workers, progress=rt.progress, desc="oracle")
    return {job.source: _strip(result) for job, result in zip(jobs, results, strict=True)}


def train_config(
    cfg: DemoConfig,
    rt: Runtime,
    *,
    output: Path,
    model: dict[str, Any],
    mixture: Path,
    steps: int,
    lr: float,
    prompt_steps: int,
    checkpoints: int = 1,
    validate_checkpoints: bool = False,
) -> Any:
    """The run's TrainConfig; a checkpoint every `steps // checkpoints` steps and at `steps`, all kept;
    validation at the last step, or at every checkpoint with `validate_checkpoints`."""
    from xvla.configio import ConfigError, from_dict
    from xvla.train.config import TrainConfig

    if cfg.batch_size % rt.train_processes:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} does not split over {rt.train_processes} training processes"
        )

    return from_dict(
        TrainConfig,
        {
            "output_dir": str(output),
            "model": model,
            "data": {
                "mixture": str(mixture),
                "augment": dict(cfg.augment),
                "num_workers": rt.workers if rt.device == "cuda" else 0,
                "seed": cfg.seed,
            },
            "optim": {
                "lr": lr,
                "warmup_steps": min(cfg.warmup_steps, steps // 4),
                "prompt_warmup_steps": prompt_steps,
                "lr_scale": {"vlm": cfg.vlm_lr_scale, "soft_prompts": cfg.prompt_lr_scale},
            },
            "checkpoint": {
                "every": steps // checkpoints,
                "keep_last": checkpoints + 1,
                "ema_decay": cfg.ema_decay,
            },
            "val": {
                "every": steps // checkpoints if validate_checkpoints else steps,
                "batches": cfg.val_batches,
                "sample_steps": cfg.sample_steps,
            },
            "log": {"every": min(cfg.log_every, steps), "progress": rt.progress, "tensorboard": False},
            "steps": steps,
            "batch_size": cfg.batch_size // rt.train_processes,  # per process: the global batch is the same
            "cpu": rt.device == "cpu",
            "precision": cfg.precision,
            "seed": cfg.seed,
        },
    )


def curve_steps(cfg: DemoConfig) -> list[int]:
    """Pre-training steps of the intermediate checkpoints the learning curves evaluate."""
    every = cfg.pretrain_steps // (cfg.curve_points + 1)
    return [every * (i + 1) for i in range(cfg.curve_points)]


def model_config_overrides(cfg: DemoConfig, num_domains: int) -> dict[str, Any]:
    return {**cfg.model_overrides, "image_size": cfg.image_size, "head.num_domains": num_domains}


def training_summary(folder: Path, checkpoint: Path) -> dict[str, Any]:
    from xvla.train.run_folder import HISTORY_FILE, VALIDATION_FILE

    history = json.loads((folder / HISTORY_FILE).read_text())
    validation = json.loads((folder / VALIDATION_FILE).read_text())[-1]
    rate = history["scalars"].get("train/samples_per_s", [])
    return {
        "checkpoint": str(checkpoint),
        "steps": history["step"][-1],
        "final_loss": history["loss"][-1],
        "samples_per_s": float(np.mean(rate)) if rate else None,
        "history": {"step": history["step"], "loss": history["loss"], "per_source": history["per_source"]},
        "validation": {"overall": validation["overall"], "per_source": validation["per_source"]},
    }


def train_fresh(
    cfg: DemoConfig,
    rt: Runtime,
    mixture: Path,
    folder: Path,
    steps: int,
    lr: float,
    checkpoints: int = 1,
    *,
    validate_checkpoints: bool = False,
    resume: bool = False,
) -> tuple[Path, int]:
    """Train a fresh `cfg.preset` model on `mixture` with one domain per source id; (checkpoint, num_domains).
    `resume` continues the run in `folder` from its latest checkpoint (or starts it)."""
    from xvla.data.sources import Mixture

    num_domains = max(s.domain_id for s in Mixture.load(mixture).sources) + 1
    tcfg = train_config(
        cfg,
        rt,
        output=folder,
        mixture=mixture,
        steps=steps,
        lr=lr,
        prompt_steps=0,
        model={"preset": cfg.preset, "overrides": model_config_overrides(cfg, num_domains)},
        checkpoints=checkpoints,
        validate_checkpoints=validate_checkpoints,
    )
    return run_training(tcfg, rt, resume=resume), num_domains


def check_resumable(cfg: DemoConfig, out: Path) -> None:
    """`resume` continues a run only with the DemoConfig that started it (else its checkpoints mean another run)."""
    path = out / CONFIG_FILE
    if not path.exists():
        raise configio.ConfigError(
            f"--resume: {out} holds no demo run to continue ({CONFIG_FILE} is missing)"
        )
    changed = configio.changed_fields(json.loads(path.read_text()), cfg.to_dict())
    if changed:
        raise configio.ConfigError(
            f"--resume: the run in {out} was made with other settings ({', '.join(changed)} differ); "
            "resume it with the same --scale, --seed and --set, or choose another --out"
        )


def run_training(cfg: TrainConfig | AdaptConfig, rt: Runtime, *, resume: bool) -> Path:
    """`xvla train` (a TrainConfig) or `xvla adapt` (an AdaptConfig) in this process, or as
    `rt.train_processes` data-parallel processes; returns the final checkpoint folder."""
    from xvla.train.adapt import adapt
    from xvla.train.config import AdaptConfig
    from xvla.train.distributed import launch_cpu
    from xvla.train.trainer import train

    if rt.train_processes > 1:
        return launch_cpu(cfg, processes=rt.train_processes, threads=rt.threads, resume=resume)
    return adapt(cfg, resume=resume) if isinstance(cfg, AdaptConfig) else train(cfg, resume=resume)


def pretrain(
    cfg: DemoConfig,
    rt: Runtime,
    mixtures: Mapping[str, Path],
    *,
    validate_checkpoints: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a fresh model with one domain per pre-training source (domain ids fixed by the suite)."""
    from xvla.model.xvla import XVLA
    from xvla.train import checkpointing as ckpt

    folder = rt.out / "pretrain"
    checkpoint, num_domains = train_fresh(
        cfg,
        rt,
        mixtures["pretrain"],
        folder,
        cfg.pretrain_steps,
        cfg.lr,
        checkpoints=cfg.curve_points + 1,
        validate_checkpoints=validate_checkpoints,
        resume=resume,
    )
    summary = training_summary(folder, checkpoint)
    summary["curve_checkpoints"] = [
        {"step": s, "samples": s * cfg.batch_size, "checkpoint": str(ckpt.checkpoint_path(folder, s))}
        for s in curve_steps(cfg)
    ]
    summary["parameters"] = sum(p.numel() for p in XVLA.from_pretrained(checkpoint).parameters())
    summary["num_domains"] = num_domains
    return summary


def adapt_heldout(
    cfg: DemoConfig,
    rt: Runtime,
    mixtures: Mapping[str, Path],
    base: Path,
    *,
    checkpoints: int = 1,
    resume: bool = False,
) -> dict[str, Any]:
    """Grow the pre-trained model by one domain for the held-out robot and fit it in two stages; with
    `checkpoints` > 1 the intermediate checkpoints are kept and validated (learning curves). `resume`
    continues the run in `rt.out / "adapt"` from its latest checkpoint (or starts it)."""
    from xvla.model.checkpoint import read_sources
    from xvla.train.config import AdaptConfig, LoraSettings
    from xvla.train.run_folder import ADAPTATION_FILE

    folder = rt.out / "adapt"
    tcfg = train_config(
        cfg,
        rt,
        output=folder,
        mixture=mixtures["heldout"],
        steps=cfg.adapt_steps,
        lr=cfg.adapt_lr,
        prompt_steps=cfg.adapt_prompt_steps,
        model={"checkpoint": str(base)},
        checkpoints=checkpoints,
        validate_checkpoints=checkpoints > 1,
    )
    acfg = AdaptConfig(
        train=tcfg,
        init=cfg.adapt_init,
        mode=cfg.adapt_mode,
        retrieval_batches=2,
        lora=LoraSettings(save="merged"),
    )
    checkpoint = run_training(acfg, rt, resume=resume)
    notes = json.loads((folder / ADAPTATION_FILE).read_text())  # what adapt did (trainer.run writes it)
    new = notes["new_domains"][cfg.heldout_name]
    by_name = {n: int(d["domain_id"]) for n, d in read_sources(base).items()}
    summary = training_summary(folder, checkpoint)
    summary.update(
        domain_id=new["domain_id"],
        init_from=new["init_from"],
        init_domain_id=by_name.get(new["init_from"]),  # None: a random prompt and heads (init "scratch")
        retrieval=new["ranking"],
        mode=cfg.adapt_mode,
        prompt_steps=cfg.adapt_prompt_steps,
        domains={**by_name, cfg.heldout_name: new["domain_id"]},
    )
    return summary


def train_scratch(
    cfg: DemoConfig, rt: Runtime, mixtures: Mapping[str, Path], *, checkpoints: int = 1, resume: bool = False
) -> dict[str, Any]:
    """Control without pre-training: a fresh model trained on the held-out data alone, same steps (with
    `checkpoints` > 1 the intermediate checkpoints are kept and validated)."""
    folder = rt.out / "scratch"
    checkpoint, _ = train_fresh(
        cfg,
        rt,
        mixtures["heldout"],
        folder,
        cfg.adapt_steps,
        cfg.adapt_lr,
        checkpoints=checkpoints,
        validate_checkpoints=checkpoints > 1,
        resume=resume,
    )
    return training_summary(folder, checkpoint)


def save_untrained(cfg: DemoConfig, base: Path, num_domains: int, folder: Path) -> Path:
    """Random weights with the adapted model's architecture and the pre-trained model's tokenizer."""
    import torch

    from xvla.model.tokenizer import load_tokenizer
    from xvla.model.xvla import XVLA
    from xvla.train.job import preset_config

    torch.manual_seed(cfg.seed)
    model = XVLA(preset_config(cfg.preset, model_config_overrides(cfg, num_domains)))
    model.save_pretrained(folder)
    load_tokenizer(base).save_pretrained(str(folder))
    return folder


def evaluate_all(
    cfg: DemoConfig, rt: Runtime, mixtures: Mapping[str, Path], results: Mapping[str, Any]
) -> dict[str, Any]:
    """Held-out robot: untrained, pre-adaptation, adapted (and scratch); pre-training sources: pre-trained."""
    from xvla.data.sources import Mixture
    from xvla.sim.suite import parse_selection

    adapted = results["adapt"]
    pretrained = Path(results["pretrain"]["checkpoint"])
    (held,) = Mixture.load(mixtures["heldout"]).sources
    untrained = save_untrained(cfg, pretrained, adapted["domain_id"] + 1, rt.out / "untrained")
    conditions: dict[str, tuple[str, int, int]] = {
        "untrained": (str(untrained), adapted["domain_id"], cfg.untrained_episodes)
    }
    if adapted["init_domain_id"] is not None:  # a random new domain has no pre-adaptation counterpart
        conditions["pre_adaptation"] = (
            str(pretrained),
            adapted["init_domain_id"],
            cfg.pre_adaptation_episodes,
        )
    conditions["adapted"] = (adapted["checkpoint"], adapted["domain_id"], cfg.eval_episodes)
    if "scratch" in results:
        conditions["scratch"] = (results["scratch"]["checkpoint"], held.domain_id, cfg.eval_episodes)
    jobs = []
    (held_tasks,) = parse_selection([cfg.heldout_source]).values()
    for label, (checkpoint, domain, episodes) in conditions.items():
        videos = {"video_dir": str(rt.out / "videos"), "videos": cfg.videos} if label == "adapted" else {}
        source = dataclasses.replace(held, domain_id=domain)
        jobs += eval_jobs(cfg, rt, source, held_tasks, checkpoint, episodes, label, **videos)
    pre_sources = {s.name: s for s in Mixture.load(mixtures["pretrain"]).sources}
    # The pre-trained model on every pre-training task: the final checkpoint, then the learning-curve ones.
    curve = results["pretrain"].get("curve_checkpoints", [])
    runs = [(str(pretrained), cfg.pretrain_eval_episodes, "pretrained")] + [
        (p["checkpoint"], cfg.curve_episodes, f"curve:{p['step']}") for p in curve
    ]
    for checkpoint, episodes, label in runs:
        for name, tasks in parse_selection(list(cfg.pretrain_sources)).items():
            jobs += eval_jobs(cfg, rt, pre_sources[name], tasks, checkpoint, episodes, label)
    outcomes = run_jobs(jobs, rt.workers, progress=rt.progress, desc="evaluate")
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job, result in zip(jobs, outcomes, strict=True):
        grouped.setdefault((job.label, job.source), []).append(result)
    heldout = {
        label: merge_evaluations(grouped[(label, held.name)])
        for label in conditions
        if (label, held.name) in grouped
    }
    for label, (_, domain, _) in conditions.items():
        if label in heldout:
            heldout[label]["domain_id"] = domain
    pre = {
        name: merge_evaluations(grouped[("pretrained", name)])
        for name in pre_sources
        if ("pretrained", name) in grouped
    }
    final_step = results["pretrain"]["steps"]
    learning_curve = {
        name: [
            {
                "step": p["step"],
                "samples": p["samples"],
                **merge_evaluations(grouped[(f"curve:{p['step']}", name)]),
            }
            for p in curve
            if (f"curve:{p['step']}", name) in grouped
        ]
        + ([{"step": final_step, "samples": final_step * cfg.batch_size, **pre[name]}] if name in pre else [])
        for name in pre_sources
    }
    write_json(rt.out / "eval" / "episodes.json", {f"{k[0]}/{k[1]}": v for k, v in grouped.items()})
    return {"heldout": heldout, "pretrain": pre, "learning_curve": learning_curve}


def _strip(result: Mapping[str, Any]) -> dict[str, Any]:
    """A summary without per-episode outcomes."""
    return {k: v for k, v in result.items() if k != "outcomes"}


def eval_jobs(
    cfg: DemoConfig,
    rt: Runtime,
    source: Any,
    tasks: Sequence[str],
    checkpoint: str,
    episodes: int,
    label: str = "",
    **extra: Any,
) -> list[SimJob]:
    """One closed-loop evaluation job per task of `source` (an `xvla.data.sources.Source`, its binary grippers
    closing from `cfg.gripper_close_at`) with the scale's evaluation settings (none when `episodes` is 0); `extra`
    goes into the job options (video_dir, videos)."""
    options = {
        "image_size": cfg.image_size,
        "replan_s": cfg.replan_s,
        "steps": cfg.sample_steps,
        "noise_scale": cfg.noise_scale,
        "seed": cfg.seed,
        "device": rt.device,
        "source": source.with_close_at(cfg.gripper_close_at).to_dict(),
        "episodes": episodes,
        **extra,
    }
    return [SimJob("eval", source.name, checkpoint, {**options, "task": t}, label) for t in tasks if episodes]


def soft_prompts(checkpoint: Path) -> np.ndarray | None:
    """The learned soft prompts, one row per domain: [num_domains, len_soft_prompts * hidden] float64 (None for
    a model without prompts)."""
    from xvla.model.xvla import XVLA

    hub = XVLA.from_pretrained(checkpoint).transformer.soft_prompt_hub
    return None if hub is None else hub.weight.detach().double().numpy()


def soft_prompt_projection(checkpoint: Path, domains: Mapping[str, int]) -> dict[str, Any]:
    """PCA (numpy SVD) of the learned soft prompts: one point per domain (its prompt flattened to
    [len_soft_prompts * hidden]); returns 2-D points, explained variance, and each domain's cosine similarity
    to the held-out robot's prompt (the domain with the largest id, added last)."""
    prompts = soft_prompts(checkpoint)
    if prompts is None:
        return {}
    centred = prompts - prompts.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T
    variance = singular**2 / max(float((singular**2).sum()), 1e-12)
    unit = prompts / np.linalg.norm(prompts, axis=1, keepdims=True).clip(1e-12)
    names = {d: n for n, d in domains.items()}
    newest = len(prompts) - 1
    return {
        "explained_variance": [float(v) for v in variance[:2]],
        "domains": {
            names.get(d, f"domain_{d}"): {
                "domain_id": d,
                "point": [round(float(x), 5) for x in points[d]],
                "norm": float(np.linalg.norm(prompts[d])),
                "cosine_to_heldout": float(unit[d] @ unit[newest]),
            }
            for d in range(len(prompts))
        },
    }
