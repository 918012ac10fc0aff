"""Atomic training checkpoints: `<output_dir>/checkpoints/step_XXXXXXXX/`.

A checkpoint folder is a servable model (`config.json`, `model.safetensors`, tokenizer files, `sources.json`)
plus `training_state/` (optimiser, scheduler, per-rank RNG and data-sampler state, trainer counters). It is
written under a temporary name and renamed when complete, so a crash mid-write leaves the previous checkpoint
as the latest one; `latest_checkpoint` never returns a partial folder. Training-state files are read with
`weights_only=True` (`load_file`): nothing in a checkpoint is ever unpickled into arbitrary objects.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
STATE = "training_state"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_TMP_PREFIX = ".tmp-"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    match = _STEP_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a training checkpoint folder (expected a name like step_00001000)")
    return int(match.group(1))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); its partial folder has been removed."""


# torch's zip writer and safetensors report a failed write without an errno; these are their messages.
_WRITE_FAILURES = ("file write failed", "unexpected pos", "I/O error", "No space left on device")
LOW_SPACE_BYTES = 16 * 2**20  # less free space than this after a failed write: the disk is full


@contextmanager
def atomic_checkpoint(accelerator: Accelerator, final: Path) -> Iterator[Path]:
    """Yield a temporary folder that every rank writes into; it becomes `final` only when all ranks are done.

    A failed write on any rank (disk full, I/O error) removes the temporary folder and raises
    `CheckpointWriteError` on every rank, naming the step, the folder and the last complete checkpoint; `final`
    and the older checkpoints are untouched. After any other exception (a bug, kill -9) the temporary folder
    stays behind and is cleared by the next save and on resume.
    """
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}"
    ranks = _rank_folder(tmp)
    if accelerator.is_main_process:
        for stale in (tmp, ranks):
            if stale.exists():
                shutil.rmtree(stale)
        (tmp / STATE).mkdir(parents=True)
        ranks.mkdir()
    accelerator.wait_for_everyone()
    failure: BaseException | None = None
    try:
        yield tmp
    except Exception as err:
        if not _is_failed_write(err):
            raise
        failure = err
    # Every rank learns which ranks failed, so none waits forever for a rank that stopped, and each error names them.
    flags = accelerator.gather(torch.tensor([float(failure is not None)], device=accelerator.device))
    failed = [rank for rank, flag in enumerate(flags.flatten().tolist()) if flag]
    if failed:
        raise _write_error(accelerator, final, tmp, failure, failed) from failure
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for saved in ranks.iterdir():
            os.replace(saved, tmp / STATE / saved.name)
        ranks.rmdir()
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. the final step after a resume): swap, then delete
            old = final.parent / f"{_TMP_PREFIX}old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    accelerator.wait_for_everyone()


def _is_failed_write(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    chain = [err, err.__context__, err.__cause__]
    return any(e is not None and any(m in str(e) for m in _WRITE_FAILURES) for e in chain)


def _write_error(
    accelerator: Accelerator, final: Path, tmp: Path, failure: BaseException | None, failed: list[int]
) -> CheckpointWriteError:
    """Remove the partial folder and build the one-line error (every rank raises one). With several processes
    it names the ranks whose write failed (`failed`)."""
    disk_full = failure is not None and (
        getattr(failure, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "No space left on device" in str(failure)
        or shutil.disk_usage(final.parent).free < LOW_SPACE_BYTES  # measured before the partial is removed
    )
    accelerator.wait_for_everyone()  # no rank is still writing into tmp
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(_rank_folder(tmp), ignore_errors=True)
    accelerator.wait_for_everyone()
    step, folder = checkpoint_step(final), final.parent
    latest = latest_checkpoint(folder.parent)
    last = (
        f"last complete checkpoint {checkpoint_step(latest)} ({latest})"
        if latest
        else "no complete checkpoint"
    )
    ranks = "rank" + ("s " if len(failed) > 1 else " ") + ", ".join(map(str, failed))
    where = f" on {ranks}" if accelerator.num_processes > 1 else ""
    if failure is None:
        return CheckpointWriteError(f"{ranks} failed writing checkpoint {step} to {folder}; {last}")
    if disk_full:
        return CheckpointWriteError(
            f"no space left while writing checkpoint {step} to {folder}{where}; {last}"
        )
    detail = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    return CheckpointWriteError(f"writing checkpoint {step} to {folder} failed{where} ({detail}); {last}")


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and stale temporary folders."""
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
    remove_temporaries(output_dir)


def remove_temporaries(output_dir: str | Path) -> None:
    """Delete what an interrupted save leaves in `checkpoints/` (say after kill -9): this module's `.tmp-step_N`
    and `.tmp-old-step_N`, and inside them `save_pretrained`'s own `..tmp-step_N.<random>` siblings."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for tmp in root.iterdir():
        if tmp.name.startswith((_TMP_PREFIX, f".{_TMP_PREFIX}")):
            shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG streams (Python, NumPy, torch CPU and CUDA), as tensors and plain values only, so the
    file loads with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    numpy_state = state["numpy"]
    key = np.asarray(numpy_state["state"]["key"].numpy(), dtype=np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_file(path: Path, map_location: str | torch.device | None = None) -> Any:
    """A file written by torch.save, read with weights_only=True: tensors and plain containers only. Full
    unpickling would run whatever code a crafted file names, on every --resume."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line for line in str(err).splitlines() if "WeightsUnpickler" in line), str(err))
        raise ValueError(
            f"{path}: refused to load: it holds objects other than tensors and plain values (written before "
            f"xvla stored NumPy RNG state as tensors, or tampered with): {detail.strip()}"
        ) from None


def _rank_folder(tmp: Path) -> Path:
    """Where the ranks write their state during `atomic_checkpoint(..., tmp)`: beside `tmp`, never inside it. The
    main process's writers may replace the folder they write into (`save_pretrained` copies what is in it into a
    fresh temporary folder and swaps the two), so a rank file written into `tmp` meanwhile was lost: the
    checkpoint was renamed complete without it and `--resume` refused it (found by
    tests/train/test_distributed.py::test_one_rank_failing_a_checkpoint_write). The files move into
    `tmp/training_state` once every rank is done."""
    return tmp.parent / f"{tmp.name}.ranks"


def save_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's state into `folder` (inside `atomic_checkpoint`: into the rank folder beside it)."""
    ranks = _rank_folder(folder)
    torch.save(state, (ranks if ranks.is_dir() else folder / STATE) / f"rank_{rank}.pt")


def load_rank_state(checkpoint: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Per-rank state saved by `save_rank_state`; resuming needs the same number of processes."""
    saved = sorted((checkpoint / STATE).glob("rank_*.pt"))
    if len(saved) != world_size:
        raise ValueError(
            f"{checkpoint}: saved by {len(saved)} processes, resumed with {world_size}; exact resume needs the same "
            "number of processes (start a new run from this checkpoint with model.checkpoint instead)"
        )
    return load_file(checkpoint / STATE / f"rank_{rank}.pt")


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
