"""A pool of simulator jobs (oracle checks and closed-loop evaluations) over spawned worker processes.

Each job is a plain, picklable description; a worker builds its simulator and policy itself, with one torch
thread, so `workers` processes use `workers` cores. Results come back in job order.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SimJob:
    """One simulator task: an oracle check of a source, or an evaluation of one (checkpoint, task).

    `options` of an oracle job: episodes, replan_s. Of an eval job: source (a `Source` dict), task, episodes,
    image_size, replan_s, steps, noise_scale, seed, device, and optionally video_dir, videos."""

    kind: Literal["oracle", "eval"]
    source: str  # suite source name
    path: str  # mixture file (oracle) or checkpoint (eval)
    options: dict[str, Any]
    label: str = ""  # the caller's grouping key


def run_job(job: SimJob) -> dict[str, Any]:
    """Run one job in this process (`evaluate` / `oracle_check` results)."""
    import torch

    torch.set_num_threads(1)  # one process per core
    if job.kind == "oracle":
        from xvla.sim.evaluate import oracle_check

        return oracle_check(
            job.path, job.source, job.options["episodes"], replan_s=job.options["replan_s"], progress=False
        )
    from xvla.data.sources import Source
    from xvla.serve.policy import Policy
    from xvla.sim.evaluate import evaluate

    o = job.options
    source = Source.from_dict(o["source"])

    def factory() -> Policy:
        return Policy.from_checkpoint(
            job.path,
            source=source,
            device=o["device"],
            steps=o["steps"],
            seed=o["seed"],
            noise_scale=o["noise_scale"],
        )

    return evaluate(
        factory,
        job.source,
        o["episodes"],
        tasks=[o["task"]],
        seed=o["seed"],
        image_size=o["image_size"],
        replan_s=o["replan_s"],
        video_dir=o.get("video_dir"),
        videos=o.get("videos", 0),
        progress=False,
    )


def run_jobs(
    jobs: Sequence[SimJob], workers: int, desc: str = "", progress: bool = True
) -> list[dict[str, Any]]:
    """Run jobs in `workers` spawned processes (in this process for one worker); results in job order."""
    from tqdm.auto import tqdm

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = run_job(job)
            bar.update(1)
    else:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for i, result in pool.imap_unordered(_indexed_job, list(enumerate(jobs))):
                results[i] = result
                bar.update(1)
    bar.close()
    return [r for r in results if r is not None]


def _indexed_job(item: tuple[int, SimJob]) -> tuple[int, dict[str, Any]]:
    return item[0], run_job(item[1])
