"""Per-episode HDF5 datasets, read-only with h5py.

Two layouts, told apart by looking at the first file:
- robomimic / LIBERO: one file holds many episodes, `data/demo_N/{obs/<key>, actions, ...}`; the instruction
  is in `data.attrs["problem_info"]` (LIBERO) or a `language_instruction`/`task` attribute; the rate in
  `data.attrs["env_args"]` (`env_kwargs.control_freq`) or an `fps` attribute.
- generic: a folder of files, one episode each, with datasets at any paths (e.g. ALOHA/RoboMind style
  `observations/images/cam_high`, `observations/qpos`, `action`) that the data source names.

Keys are dataset paths relative to the episode group ("obs/agentview_rgb", "actions"). Camera keys are uint8
`[N, H, W, 3]` datasets or per-frame encoded images (JPEG/PNG, as variable-length bytes or zero-padded uint8
rows); low-dimensional keys are numeric `[N]` or `[N, D]` datasets.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xvla.data.episode_base import (
    HDF5_SUFFIXES,
    DatasetError,
    FileCache,
    check_episode,
    check_finite,
    check_fps,
    check_frames,
)

TASK_ATTRS = ("language_instruction", "instruction", "task", "language", "lang")
FPS_ATTRS = ("fps", "control_freq", "frequency", "control_hz")
TIMESTAMP_KEYS = ("timestamp", "timestamps")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG")


@dataclass(frozen=True)
class _Episode:
    file: Path
    group: str  # "/" (one episode per file) or "data/demo_N"


def _natural_key(text: str) -> list[Any]:
    """Sort "demo_2" before "demo_10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _text(value: Any) -> str | None:
    """An attribute or scalar dataset as a string (bytes decoded, 1-element arrays unwrapped)."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else None
    if isinstance(value, bytes | np.bytes_):
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) and value.strip() else None


class HDF5Dataset:
    """Episodes from one HDF5 file or a folder of them (implements `EpisodeDataset`).

    `fps` overrides the rate recorded in the files (required when they record none). `open_files` bounds the
    number of files kept open.
    """

    def __init__(self, path: str | Path, *, fps: float | None = None, open_files: int = 8) -> None:
        self.root = Path(path)
        if self.root.is_file():
            files = [self.root]
        elif self.root.is_dir():
            files = sorted(
                (p for p in self.root.iterdir() if p.suffix.lower() in HDF5_SUFFIXES and p.is_file()),
                key=lambda p: _natural_key(p.name),
            )
        else:
            raise FileNotFoundError(f"dataset path does not exist: {self.root}")
        if not files:
            raise DatasetError(f"no HDF5 files ({', '.join(HDF5_SUFFIXES)})", dataset=self.root)
        self._files = FileCache(open_files)

        first = self._open(files[0])
        if isinstance(first.get("data"), h5py.Group) and self._demos(first):
            # robomimic/LIBERO: every file lists its demos (a handful of files, opened once here)
            self.layout = "robomimic"
            self._episodes = [_Episode(f, f"data/{d}") for f in files for d in self._demos(self._open(f))]
        else:
            self.layout = "generic"  # one episode per file; files are opened only when read
            self._episodes = [_Episode(f, "/") for f in files]
        self.num_episodes = len(self._episodes)
        if not self.num_episodes:
            raise DatasetError("no episodes (no data/demo_* groups)", dataset=self.root, file=files[0])
        group = self._group(0)
        self.camera_keys, self.lowdim_keys = self._discover(group)
        if not self.lowdim_keys:
            raise DatasetError(
                "no numeric [N] or [N, D] datasets in the episode",
                dataset=self.root,
                file=files[0],
                episode=0,
            )
        self._length_key = next(
            (k for k in ("actions", "action") if k in self.lowdim_keys), self.lowdim_keys[0]
        )
        recorded = self._recorded_fps(group)
        if fps is None and recorded is None:
            raise DatasetError(
                f"no frame rate recorded (attributes {FPS_ATTRS} or env_args.env_kwargs.control_freq): pass fps=",
                dataset=self.root,
                file=files[0],
            )
        self.fps = (
            check_fps(fps, field="fps option", dataset=self.root)
            if fps is not None
            else check_fps(recorded, field="recorded frame rate", dataset=self.root, file=files[0])
        )
        self._lengths: dict[int, int] = {}

    # ------------------------------------------------------------------ files and discovery
    def _open(self, path: Path, ep: int | None = None) -> Any:
        def open_() -> Any:
            try:
                return h5py.File(path, "r")
            except FileNotFoundError as err:
                raise DatasetError("missing file", dataset=self.root, file=path, episode=ep) from err
            except OSError as err:
                raise DatasetError(
                    f"corrupt HDF5 file: {err}", dataset=self.root, file=path, episode=ep
                ) from err

        return self._files.get_or_open(path, open_)

    def _demos(self, f: Any) -> list[str]:
        data = f["data"]
        return sorted(
            (k for k in data if isinstance(data[k], h5py.Group) and k.startswith("demo")),
            key=_natural_key,
        )

    def _group(self, ep: int) -> Any:
        episode = self._episodes[ep]
        f = self._open(episode.file, ep)
        try:
            return f[episode.group]
        except KeyError as err:
            raise DatasetError(
                f"missing group {episode.group!r}", dataset=self.root, file=episode.file, episode=ep
            ) from err

    def _discover(self, group: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        cameras: list[str] = []
        lowdim: list[str] = []

        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset) or name.split("/")[-1] in TIMESTAMP_KEYS:
                return
            if name.startswith("next_obs/"):  # robomimic's copy of obs shifted by one frame
                return
            if self._is_camera(obj):
                cameras.append(name)
            elif obj.ndim in (1, 2) and obj.dtype.kind in "fiub" and obj.shape[0] > 0:
                lowdim.append(name)

        group.visititems(visit)
        return tuple(cameras), tuple(lowdim)

    def _is_camera(self, ds: Any) -> bool:
        if ds.dtype == np.uint8 and ds.ndim == 4 and ds.shape[-1] == 3:
            return True
        encoded = ds.dtype.kind == "O" or (ds.dtype == np.uint8 and ds.ndim == 2)
        if encoded and ds.shape[0] > 0:
            head = ds[0]
            head = bytes(head[:4]) if isinstance(head, np.ndarray) else head
            return isinstance(head, bytes) and head.startswith(_IMAGE_MAGIC)
        return False

    def _recorded_fps(self, group: Any) -> float | None:
        holders = [group, group.file] + ([group.parent] if group.name != "/" else [])
        for holder in holders:
            for attr in FPS_ATTRS:
                if attr in holder.attrs:
                    return float(np.asarray(holder.attrs[attr]).reshape(-1)[0])
            env_args = _text(holder.attrs.get("env_args"))
            if env_args:
                try:
                    freq = json.loads(env_args).get("env_kwargs", {}).get("control_freq")
                except json.JSONDecodeError:
                    freq = None
                if freq:
                    return float(freq)
        return None

    def _dataset(self, ep: int, key: str) -> Any:
        group = self._group(ep)
        if key not in group:
            raise DatasetError(
                f"missing key {key!r} in group {group.name!r}",
                dataset=self.root,
                file=self._episodes[ep].file,
                episode=ep,
            )
        return group[key]

    def _read(self, ds: Any, ep: int, sel: Any = slice(None)) -> np.ndarray:
        try:
            return ds[sel]
        except OSError as err:
            raise DatasetError(
                f"corrupt dataset {ds.name!r}: {err}",
                dataset=self.root,
                file=self._episodes[ep].file,
                episode=ep,
            ) from err

    # ------------------------------------------------------------------ EpisodeDataset
    def episode_file(self, ep: int) -> tuple[Path, str]:
        """`(file, group)` of episode `ep`."""
        episode = self._episodes[check_episode(self, ep)]
        return episode.file, episode.group

    def episode_length(self, ep: int) -> int:
        ep = check_episode(self, ep)
        if ep not in self._lengths:
            self._lengths[ep] = int(self._dataset(ep, self._length_key).shape[0])
        return self._lengths[ep]

    def episode_task(self, ep: int) -> str:
        group = self._group(check_episode(self, ep))
        holders = [group] + ([group.parent] if group.name != "/" else []) + [group.file]
        for holder in holders:
            for attr in TASK_ATTRS:
                if attr in holder.attrs and (text := _text(holder.attrs[attr])):
                    return text
            for key in TASK_ATTRS:
                if isinstance(holder.get(key), h5py.Dataset) and (text := _text(holder[key][()])):
                    return text
            info = _text(holder.attrs.get("problem_info"))
            if info:
                try:
                    instruction = json.loads(info).get("language_instruction")
                except json.JSONDecodeError:
                    instruction = None
                if isinstance(instruction, list):
                    instruction = " ".join(instruction)
                if _text(instruction):
                    return str(instruction)
        return ""

    def read_lowdim(self, ep: int, key: str, *, allow_nan: bool = False) -> np.ndarray:
        """`[N, D]` values of `key` for episode `ep`; a NaN raises unless `allow_nan`."""
        ep = check_episode(self, ep)
        if key not in self.lowdim_keys:
            raise DatasetError(
                f"unknown low-dim key {key!r} (available: {list(self.lowdim_keys)})", dataset=self.root
            )
        values = np.asarray(self._read(self._dataset(ep, key), ep))
        values = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
        if values.dtype.kind != "f":
            values = values.astype(np.float32)
        self._check_length(ep, key, len(values))
        if not allow_nan:
            check_finite(values, key=key, dataset=self.root, file=self._episodes[ep].file, episode=ep)
        return values

    def read_timestamps(self, ep: int) -> np.ndarray:
        ep = check_episode(self, ep)
        group = self._group(ep)
        key = next((k for k in TIMESTAMP_KEYS if isinstance(group.get(k), h5py.Dataset)), None)
        if key is None:
            return np.arange(self.episode_length(ep)) / self.fps
        ts = np.asarray(self._read(group[key], ep), dtype=np.float64).reshape(-1)
        self._check_length(ep, key, len(ts))
        check_finite(ts, key=key, dataset=self.root, file=self._episodes[ep].file, episode=ep)
        return ts - ts[0]

    def read_frames(self, ep: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        ep = check_episode(self, ep)
        if camera not in self.camera_keys:
            raise DatasetError(
                f"unknown camera {camera!r} (available: {list(self.camera_keys)})", dataset=self.root
            )
        idx = check_frames(self, ep, frames)
        ds = self._dataset(ep, camera)
        self._check_length(ep, camera, ds.shape[0])
        unique, inverse = np.unique(idx, return_inverse=True)  # h5py wants increasing indices
        data = self._read(ds, ep, unique)
        if ds.dtype == np.uint8 and ds.ndim == 4:
            return np.ascontiguousarray(data[inverse])
        decoded = [self._decode(cell, ep, camera, int(f)) for cell, f in zip(data, unique, strict=True)]
        return np.stack(decoded)[inverse]

    def _decode(self, cell: Any, ep: int, camera: str, frame: int) -> np.ndarray:
        from PIL import Image

        raw = cell.tobytes() if isinstance(cell, np.ndarray) else bytes(cell)
        try:
            with Image.open(io.BytesIO(raw)) as img:  # zero padding after the image is ignored
                return np.asarray(img.convert("RGB"))
        except Exception as err:
            raise DatasetError(
                f"corrupt encoded image in {camera!r}: {err}",
                dataset=self.root,
                file=self._episodes[ep].file,
                episode=ep,
                frame=frame,
            ) from err

    def _check_length(self, ep: int, key: str, n: int) -> None:
        expected = self.episode_length(ep)
        if n != expected:
            raise DatasetError(
                f"{key!r} has {n} frames but {self._length_key!r} has {expected}",
                dataset=self.root,
                file=self._episodes[ep].file,
                episode=ep,
            )
