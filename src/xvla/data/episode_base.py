"""What every episode reader shares, below the readers (`lerobot.py`, `hdf5.py`): the `EpisodeDataset` protocol
they implement, `DatasetError`, the checks of episode and frame indices, values and frame rates, and the LRU of
open files. `xvla.data.episodes.open_dataset`, above the readers, picks one for a path.

A reader is read-only: it never writes into the dataset folder (no caches, no lock files), opens files on
demand and only builds its episode index from metadata.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")  # the HDF5 reader's files, and how `open_dataset` recognises them


class DatasetError(ValueError):
    """Bad or inconsistent dataset content; the message names the dataset, file, episode and frame."""

    def __init__(
        self,
        message: str,
        *,
        dataset: str | Path | None = None,
        file: str | Path | None = None,
        episode: int | None = None,
        frame: int | None = None,
    ) -> None:
        where = [
            f"{name} {value}"
            for name, value in (("dataset", dataset), ("file", file), ("episode", episode), ("frame", frame))
            if value is not None
        ]
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.dataset, self.file, self.episode, self.frame = dataset, file, episode, frame


class FileCache(OrderedDict):
    """A small LRU of open files, each closed with its `close()` on eviction.

    Emptied in a forked child (a data-loader worker), where inherited handles would share file offsets with
    the parent, and pickled empty (a reader sent to a spawned worker reopens its files there).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self._pid = max(1, size), os.getpid()
        self._inherited: list[Any] = []

    def get_or_open(self, key: Any, open_: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():
            # keep the parent's handles alive but unused: destroying them here would close the parent's
            # decoders from the child (a decoder waiting for threads that fork did not copy never returns)
            self._inherited = list(self.values())
            self.clear()
            self._pid = os.getpid()
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = open_()
        while len(self) > self.size:
            self.popitem(last=False)[1].close()
        return value

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.size,))


@runtime_checkable
class EpisodeDataset(Protocol):
    """One dataset folder (or file), episode by episode."""

    root: Path
    fps: float
    num_episodes: int
    camera_keys: tuple[str, ...]
    lowdim_keys: tuple[str, ...]

    def episode_length(self, ep: int) -> int: ...

    def episode_task(self, ep: int) -> str: ...

    def read_lowdim(self, ep: int, key: str, *, allow_nan: bool = False) -> np.ndarray:
        """`[N, D]` float32 (float64 allowed) values of one low-dimensional feature for a whole episode; a NaN
        or infinity raises `DatasetError` unless `allow_nan` (`xvla data inspect` reports them instead)."""
        ...

    def read_timestamps(self, ep: int) -> np.ndarray:
        """`[N]` seconds from the episode start."""
        ...

    def read_frames(self, ep: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        """`[K, H, W, 3]` uint8 RGB frames at the given frame indices (any order, repeats allowed)."""
        ...


def check_episode(dataset: EpisodeDataset, ep: int) -> int:
    """Validate an episode index; returns it as `int`."""
    if not 0 <= int(ep) < dataset.num_episodes:
        raise IndexError(f"episode {ep} out of range [0, {dataset.num_episodes}) in dataset {dataset.root}")
    return int(ep)


def check_frames(dataset: EpisodeDataset, ep: int, frames: Sequence[int]) -> np.ndarray:
    """Validate frame indices of episode `ep`; returns them as `[K]` int64."""
    idx = np.asarray(frames, dtype=np.int64).reshape(-1)
    n = dataset.episode_length(ep)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise DatasetError(
            f"frame index out of range [0, {n})", dataset=dataset.root, episode=ep, frame=int(bad[0])
        )
    return idx


def check_finite(values: np.ndarray, *, key: str, dataset: Path, file: Path | str, episode: int) -> None:
    """Raise a `DatasetError` naming the first frame of `values` `[N, D]` that holds a NaN or an infinity."""
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not finite.all():
        frame = int(np.argmin(finite))
        raise DatasetError(
            f"non-finite value in {key!r}: {values[frame].tolist()}",
            dataset=dataset,
            file=file,
            episode=episode,
            frame=frame,
        )


def rate_mismatch(times: np.ndarray, fps: float) -> str | None:
    """How timestamps `[N]` disagree with the declared `fps`, or None when every frame i lies within half a frame
    of `times[0] + i / fps` (the tolerance within which the LeRobot reader matches video frames to rows)."""
    times = np.asarray(times, dtype=np.float64)
    if len(times) < 2:
        return None
    drift = np.abs(times - times[0] - np.arange(len(times)) / fps)
    worst = int(np.argmax(drift))
    if drift[worst] <= 0.5 / fps:
        return None
    span = times[-1] - times[0]
    actual = f"; the timestamps run at {(len(times) - 1) / span:.3g} frames/s" if span > 0 else ""
    return (
        f"timestamps disagree with fps {fps:g}: frame {worst} is at {times[worst] - times[0]:.4f} s from the "
        f"first, expected {worst / fps:.4f} s{actual}"
    )


def check_fps(value: Any, *, field: str, dataset: Path, file: Path | None = None) -> float:
    """A frame rate as a finite float > 0; anything else (0 divides every timestamp) is a `DatasetError` naming
    the field and the file."""
    try:
        fps = float(value)
    except (TypeError, ValueError):
        fps = float("nan")
    if not (np.isfinite(fps) and fps > 0):
        raise DatasetError(f"{field}: expected a frame rate > 0, got {value!r}", dataset=dataset, file=file)
    return fps


def read_json(path: Path, *, dataset: Path) -> Any:
    """Load a JSON file, turning a missing or corrupt file into a `DatasetError` that names it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DatasetError("missing file", dataset=dataset, file=path) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"corrupt JSON: {err}", dataset=dataset, file=path) from err
