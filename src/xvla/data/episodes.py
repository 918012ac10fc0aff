"""`open_dataset`: which reader opens a dataset path (format detection), above the readers.

The `EpisodeDataset` protocol the readers implement, and what they share, are in `xvla.data.episode_base`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from xvla.data.episode_base import HDF5_SUFFIXES, DatasetError, EpisodeDataset

DatasetFormat = Literal["auto", "lerobot", "hdf5"]


def detect_format(path: str | Path) -> Literal["lerobot", "hdf5"]:
    """Which reader handles `path`: a LeRobot folder (meta/info.json), an HDF5 file or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() in HDF5_SUFFIXES:
            return "hdf5"
        raise DatasetError(f"unsupported dataset file (expected one of {HDF5_SUFFIXES})", dataset=path)
    if (path / "meta" / "info.json").is_file():
        return "lerobot"
    if any(p.suffix.lower() in HDF5_SUFFIXES for p in path.iterdir() if p.is_file()):
        return "hdf5"
    raise DatasetError(
        "cannot tell the dataset format: expected meta/info.json (LeRobot v2.1/v3.0) or *.hdf5 episode files",
        dataset=path,
    )


def open_dataset(path: str | Path, format: DatasetFormat = "auto", **options: Any) -> EpisodeDataset:
    """Open a dataset folder or file read-only.

    `format`: "auto" (detect), "lerobot" (v2.1 or v3.0, told apart by meta/info.json) or "hdf5".
    `options` go to the reader (e.g. `fps=` and `keys=` for HDF5 files that do not record them).
    """
    kind = detect_format(path) if format == "auto" else format
    # Imported here: a reader's libraries (pyarrow, PyAV; h5py) load only when a dataset of its format opens.
    if kind == "lerobot":
        from xvla.data.lerobot import LeRobotDataset

        return LeRobotDataset(path, **options)
    if kind == "hdf5":
        from xvla.data.hdf5 import HDF5Dataset

        return HDF5Dataset(path, **options)
    raise ValueError(f"format must be one of 'auto', 'lerobot', 'hdf5', got {format!r}")
