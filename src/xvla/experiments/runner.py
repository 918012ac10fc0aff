"""Run an experiment's grid: one folder per cell (arm x seed), resumable, built from the demo's stages.

    OUT/data/<scale>/seed_<k>/pretrain/         generated datasets, shared by every cell of that scale and seed
    OUT/data/<scale>/seed_<k>/heldout_<n>/      the held-out robot's, one folder per episode count
    OUT/<experiment>/<arm>/seed_<k>/
        config.json        what the cell is (experiment, arm, seed, kind, base cell, DemoConfig)
        mixtures/          the cell's pre-training and held-out mixtures (xvla.demo.stages.generate_data)
        pretrain/ | adapt/ | scratch/   the training run folder (history, validation, checkpoints)
        train.json         the training stage's summary (written when training finished)
        eval/step_<n>.json closed-loop evaluation of one checkpoint (step 0: before adaptation)
        prompts.json       PCA and t-SNE of the soft prompts of the final checkpoint (when it has prompts)
        results.json       everything the summary reads
        done.json          written last, atomically: a rerun skips the cell
        lock               held (flock) by the process running the cell

A rerun skips cells with `done.json`; inside an unfinished cell a stage whose file exists is not redone, and an
interrupted training run resumes from its latest checkpoint (`xvla.train` resume). A cell that another process
is running is refused, not run twice into one folder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from xvla import configio
from xvla.demo import stages
from xvla.demo.config import DemoConfig, demo_config
from xvla.demo.report import write_json
from xvla.experiments.specs import Arm, ExperimentSpec, get_experiment
from xvla.processes import exit_on_sigterm, stop_pool

CONFIG_FILE = "config.json"
TRAIN_FILE = "train.json"
PROMPTS_FILE = "prompts.json"
RESULTS_FILE = "results.json"
DONE_FILE = "done.json"
LOCK_FILE = "lock"
RUN_FOLDERS = {"pretrain": "pretrain", "adapt": "adapt", "scratch": "scratch"}  # kind -> training run folder


@dataclass(frozen=True)
class Cell:
    """One arm at one seed, with its resolved DemoConfig and (adapt) the pre-training cell it starts from."""

    experiment: ExperimentSpec
    arm: Arm
    seed: int
    config: DemoConfig
    base: Cell | None = None

    @property
    def key(self) -> str:
        return f"{self.experiment.name}/{self.arm.name}/seed_{self.seed}"

    def folder(self, out: Path) -> Path:
        return out / self.experiment.name / self.arm.name / f"seed_{self.seed}"

    def description(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment.name,
            "arm": self.arm.name,
            "seed": self.seed,
            "kind": self.arm.kind,
            "description": self.arm.description,
            "base": self.base.key if self.base else None,
            "demonstrations": self.arm.demonstrations,
            "adapt_curve_points": self.experiment.adapt_curve_points,
            "demo": self.config.to_dict(),
        }


@dataclass(frozen=True)
class RunOptions:
    """How this machine runs the grid (not part of any cell's definition)."""

    out: Path
    device: str  # "cpu" or "cuda"
    workers: int  # cells run at once (each in its own process with one thread) when > 1
    threads: int  # torch threads of a cell run in this process
    sim_workers: int  # simulator processes of a cell run in this process
    progress: bool = True


# ------------------------------------------------------------------------------------------------ the grid
def resolve_cells(
    name: str, scale: str | None = None, seeds: Sequence[int] | None = None, arms: Sequence[str] = ()
) -> list[Cell]:
    """Every cell an experiment runs: its included experiments' first, then its own; with `arms`, only those
    arms and the base cells they start from. Base cells come before the cells that need them. No duplicates."""
    spec = get_experiment(name)
    for a in arms:
        spec.arm(a)  # unknown names raise, naming the experiment's arms
    cells: dict[str, Cell] = {}

    def add(cell: Cell) -> None:
        if cell.base is not None:
            add(cell.base)
        cells.setdefault(cell.key, cell)

    for included in () if arms else spec.includes:
        for cell in resolve_cells(included, scale, seeds):
            add(cell)
    chosen = [spec.arm(a) for a in arms] if arms else list(spec.arms)
    for seed in seeds if seeds is not None else spec.seeds:
        for arm in chosen:
            add(make_cell(spec, arm, seed, scale))
    return list(cells.values())


def make_cell(spec: ExperimentSpec, arm: Arm, seed: int, scale: str | None) -> Cell:
    base = None
    if arm.base is not None:
        experiment, _, arm_name = arm.base.rpartition("/")
        base_spec = get_experiment(experiment) if experiment else spec
        base = make_cell(base_spec, base_spec.arm(arm_name), seed, scale)
        if base.arm.kind != "pretrain":
            raise ValueError(f"arm {arm.name!r}: base {arm.base!r} is not a pre-training arm")
        config = configio.replace(
            base.config, configio.parse_overrides(arm.overrides, example="adapt_steps=5")
        )
    else:
        config = demo_config(scale or spec.scale, (*spec.overrides, *arm.overrides)).replace(seed=seed)
    if arm.demonstrations is not None:
        config = config.replace(heldout_episodes=arm.demonstrations + config.val_episodes)
    return Cell(spec, arm, seed, config, base)


def data_dirs(cell: Cell, out: Path) -> tuple[Path, Path]:
    """(pre-training datasets, held-out datasets) of a cell: shared per scale, seed and episode count."""
    cfg = cell.config
    root = out / "data" / cfg.scale / f"seed_{cfg.seed}"
    return root / "pretrain", root / f"heldout_{cfg.heldout_episodes}"


def runtime(cell: Cell, opts: RunOptions, *, generate: bool = False) -> stages.Runtime:
    pre, held = data_dirs(cell, opts.out)
    return stages.Runtime(
        out=cell.folder(opts.out),
        data=pre,
        heldout_data=held,
        device=opts.device,
        workers=opts.sim_workers,
        threads=opts.threads,
        skip_generate=not generate,
        progress=opts.progress,
    )


def run_experiment(
    name: str,
    opts: RunOptions,
    *,
    scale: str | None = None,
    seeds: Sequence[int] | None = None,
    arms: Sequence[str] = (),
    summary_only: bool = False,
) -> dict[str, list[str]]:
    """Run every unfinished cell (none with `summary_only`), then write the summary from the finished ones;
    returns the cell keys run and skipped."""
    from tqdm.auto import tqdm

    from xvla.experiments.summary import write_summary

    cells = resolve_cells(name, scale, seeds, arms)
    if summary_only:
        write_summary(get_experiment(name), cells, opts.out, seeds)
        return {"ran": [], "skipped": [c.key for c in cells]}
    for cell in cells:
        claim(cell, opts.out)
    todo = [c for c in cells if not (c.folder(opts.out) / DONE_FILE).is_file()]
    prepare_data(todo, opts)
    bar = tqdm(
        total=len(cells), initial=len(cells) - len(todo), desc=f"{name} cells", disable=not opts.progress
    )
    # Two waves: cells that need no other cell, then adaptations of the first wave's checkpoints.
    for wave in ([c for c in todo if c.base is None], [c for c in todo if c.base is not None]):
        if opts.workers > 1 and len(wave) > 1:
            # Worker processes that may start their own (data loaders on a GPU): not a daemonic mp.Pool.
            single = dataclasses.replace(opts, threads=1, sim_workers=1, progress=False)
            context = mp.get_context("spawn")
            pool = ProcessPoolExecutor(
                min(opts.workers, len(wave)), mp_context=context, initializer=exit_on_sigterm
            )
            try:
                for future in as_completed([pool.submit(run_cell, c, single) for c in wave]):
                    future.result()  # a failed cell stops the grid (the finished ones stay finished)
                    bar.update(1)
            except BaseException:  # a failed cell, Ctrl-C or SIGTERM: stop the other cells now, not when done
                stop_pool(pool)
                raise
            pool.shutdown()
        else:
            for cell in wave:
                run_cell(cell, opts)
                bar.update(1)
    bar.close()
    write_summary(get_experiment(name), cells, opts.out, seeds)
    return {"ran": [c.key for c in todo], "skipped": [c.key for c in cells if c not in todo]}


# DemoConfig fields added with a default that differs from what cells run before them did (field -> old behaviour).
ADDED_FIELDS: dict[str, Any] = {"gripper_close_at": 0.5}


def claim(cell: Cell, out: Path) -> None:
    """Write the cell's config.json, or refuse a folder that holds a cell with another configuration."""
    path = cell.folder(out) / CONFIG_FILE
    wanted = json.loads(json.dumps(cell.description()))  # as it reads back (tuples become lists)
    if path.is_file():
        found = json.loads(path.read_text())
        if isinstance(found.get("demo"), dict):
            # A DemoConfig field added after the cell ran is read as the behaviour the cell ran with: its default,
            # or, where the default is not the old behaviour, the value in ADDED_FIELDS.
            defaults = {**DemoConfig().to_dict(), **ADDED_FIELDS}  # to_dict is already as JSON reads back
            found["demo"] = {**{k: v for k, v in defaults.items() if k not in found["demo"]}, **found["demo"]}
        if found != wanted:
            diffs = configio.changed_fields(found, wanted)
            if "demo" in diffs:
                diffs += [f"demo.{k}" for k in configio.changed_fields(found.get("demo", {}), wanted["demo"])]
            raise ValueError(
                f"cell {cell.key}: {path} holds a cell run with another configuration (differs in "
                f"{', '.join(diffs)}); choose another --out or remove that folder"
            )
        return
    write_json(path, wanted)


def prepare_data(cells: Sequence[Cell], opts: RunOptions) -> None:
    """Generate each distinct dataset folder once (cached between runs) before any cell trains, so that cells
    running side by side never generate into one folder."""
    generated: set[tuple[Path, Path]] = set()
    for cell in cells:
        dirs = data_dirs(cell, opts.out)
        stages.generate_data(cell.config, runtime(cell, opts, generate=dirs not in generated))
        generated.add(dirs)


# ------------------------------------------------------------------------------------------------ one cell
def run_cell(cell: Cell, opts: RunOptions) -> dict[str, Any]:
    """Train, evaluate every checkpoint and collect a cell's results; each stage once (see the module doc)."""
    folder = cell.folder(opts.out)
    if (folder / DONE_FILE).is_file():
        return json.loads((folder / RESULTS_FILE).read_text())
    with cell_lock(cell, folder):
        return _run_cell(cell, folder, opts)


@contextmanager
def cell_lock(cell: Cell, folder: Path) -> Iterator[None]:
    """Hold the cell's lock while running it; refuse a cell that another process holds (two grids started
    over one `--out` would otherwise train into one folder). The OS frees the lock when its process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"cell {cell.key}: another process is running it in {folder}; let it finish or stop it, then "
                "run this again"
            ) from None
        yield


def _run_cell(cell: Cell, folder: Path, opts: RunOptions) -> dict[str, Any]:
    import torch

    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    rt = runtime(cell, opts)
    mixtures = stages.generate_data(cell.config, rt)  # the cell's mixtures over the prepared datasets
    train = _stage(folder / TRAIN_FILE, lambda: train_stage(cell, rt, mixtures, opts.out))
    evaluations = [
        _stage(folder / "eval" / f"step_{point[0]:08d}.json", partial(evaluate, cell, rt, mixtures, *point))
        for point in checkpoints_to_evaluate(cell, train)
    ]
    prompts = _stage(folder / PROMPTS_FILE, lambda: prompt_stage(cell, train))
    results = {
        "cell": cell.description(),
        "train": train,
        "curve": curve(train, evaluations),
        "prompts": prompts,
        "seconds": round(train["seconds"] + sum(e["seconds"] for e in evaluations) + prompts["seconds"], 1),
    }
    write_json(folder / RESULTS_FILE, results)
    write_json(folder / DONE_FILE, {"cell": cell.key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return results


def _stage(path: Path, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A stage's result file: read when it exists, else computed (with its wall time) and written atomically."""
    if path.is_file():
        return dict(json.loads(path.read_text()))
    start = time.perf_counter()
    value = fn()
    value["seconds"] = round(time.perf_counter() - start, 1)
    write_json(path, value)
    return value


def train_stage(cell: Cell, rt: stages.Runtime, mixtures: Mapping[str, Path], out: Path) -> dict[str, Any]:
    """Train the cell's model (resuming an interrupted run); the demo stage's summary plus every checkpoint."""
    from xvla.data.sources import Mixture
    from xvla.train import checkpointing as ckpt

    cfg, points = cell.config, cell.experiment.adapt_curve_points
    if cell.arm.kind == "pretrain":
        summary = stages.pretrain(cfg, rt, mixtures, validate_checkpoints=True, resume=True)
        summary["domains"] = {s.name: s.domain_id for s in Mixture.load(mixtures["pretrain"]).sources}
    elif cell.arm.kind == "adapt":
        assert cell.base is not None  # Arm checks it
        base = json.loads((cell.base.folder(out) / TRAIN_FILE).read_text())
        summary = stages.adapt_heldout(
            cfg, rt, mixtures, Path(base["checkpoint"]), checkpoints=points, resume=True
        )
        summary["base_checkpoint"] = base["checkpoint"]
    else:
        summary = stages.train_scratch(cfg, rt, mixtures, checkpoints=points, resume=True)
        (held,) = Mixture.load(mixtures["heldout"]).sources
        summary["domain_id"] = held.domain_id
    run = rt.out / RUN_FOLDERS[cell.arm.kind]
    validations = json.loads((run / "validation.json").read_text())
    summary["checkpoints"] = [
        {
            "step": ckpt.checkpoint_step(path),
            "checkpoint": str(path),
            "validation": next((v for v in validations if v["step"] == ckpt.checkpoint_step(path)), None),
        }
        for path in ckpt.list_checkpoints(run)
    ]
    return summary


def checkpoints_to_evaluate(cell: Cell, train: Mapping[str, Any]) -> list[tuple[int, str, int | None, int]]:
    """(step, checkpoint, domain id of the held-out robot or None for the pre-training sources, episodes);
    the final checkpoint with the scale's full episode count, the others with `curve_episodes`; an adaptation
    also at step 0 (the pre-trained checkpoint through the domain it starts from) when it starts from one."""
    cfg = cell.config
    final = train["steps"]
    if cell.arm.kind == "pretrain":
        domain = None
        full = cfg.pretrain_eval_episodes
    else:
        domain = train["domain_id"]
        full = cfg.eval_episodes
    out = [
        (c["step"], c["checkpoint"], domain, full if c["step"] == final else cfg.curve_episodes)
        for c in train["checkpoints"]
    ]
    if cell.arm.kind == "adapt" and train["init_domain_id"] is not None:
        out.insert(0, (0, train["base_checkpoint"], train["init_domain_id"], cfg.pre_adaptation_episodes))
    return out


def evaluate(
    cell: Cell,
    rt: stages.Runtime,
    mixtures: Mapping[str, Path],
    step: int,
    checkpoint: str,
    domain: int | None,
    episodes: int,
) -> dict[str, Any]:
    """Closed-loop success of one checkpoint: on every pre-training task (domain None, each source's own
    domain), or on the held-out robot through `domain`; per source, merged over tasks."""
    from xvla.data.sources import Mixture
    from xvla.sim.evaluate import merge_evaluations
    from xvla.sim.jobs import run_jobs
    from xvla.sim.suite import parse_selection

    cfg = cell.config
    if domain is None:
        sources = {s.name: s for s in Mixture.load(mixtures["pretrain"]).sources}
        tasks = parse_selection(list(cfg.pretrain_sources))
    else:
        (held,) = Mixture.load(mixtures["heldout"]).sources
        sources = {held.name: dataclasses.replace(held, domain_id=domain)}
        tasks = parse_selection([cfg.heldout_source])
    jobs = [
        job
        for name, source in sources.items()
        for job in stages.eval_jobs(cfg, rt, source, tasks[name], checkpoint, episodes, label=name)
    ]
    results = run_jobs(jobs, rt.workers, desc=f"evaluate {cell.key}", progress=rt.progress)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for job, result in zip(jobs, results, strict=True):
        grouped.setdefault(job.label, []).append(result)
    return {
        "step": step,
        "checkpoint": checkpoint,
        "per_source": {n: merge_evaluations(r) for n, r in grouped.items()},
    }


def prompt_stage(cell: Cell, train: Mapping[str, Any]) -> dict[str, Any]:
    """PCA and t-SNE of the final checkpoint's soft prompts (empty for a model without prompts)."""
    from xvla.experiments.analysis import prompt_projection

    return prompt_projection(Path(train["checkpoint"]), train["domains"]) if "domains" in train else {}


def curve(train: Mapping[str, Any], evaluations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per evaluated checkpoint: step, success per source, validation per source (None where the
    checkpoint was not validated: step 0 of an adaptation)."""
    validation = {c["step"]: c["validation"] for c in train["checkpoints"] if c["validation"]}
    return [
        {
            "step": e["step"],
            "success": e["per_source"],
            "validation": validation[e["step"]]["per_source"] if e["step"] in validation else None,
        }
        for e in evaluations
    ]
