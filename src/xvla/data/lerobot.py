"""LeRobot v2.1 and v3.0 datasets, read without the `lerobot` package (pyarrow for parquet, PyAV for mp4).

The episode index is built from metadata only (v3.0: the episode table under meta/episodes/; v2.1:
meta/episodes.jsonl). Data and video files are opened on demand and a few are kept open. Video frame f of
episode e is the decoded frame nearest to `from_timestamp(e) + f / fps` (v2.1: one mp4 per episode, so
from_timestamp is 0), accepted within half a frame; decoding seeks to the keyframe before the first wanted
frame and decodes forward.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xvla.data.episode_base import (
    DatasetError,
    FileCache,
    check_episode,
    check_finite,
    check_fps,
    check_frames,
    rate_mismatch,
    read_json,
)

BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
CAMERA_DTYPES = ("video", "image")
SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
# Decoding forward is cheaper than a new seek while the next wanted frame is this close (seconds).
SEEK_GAP_S = 1.0


@dataclass
class _Video:
    """An open mp4 with the decoder's position, so reading on from the last frame needs no seek."""

    container: Any
    stream: Any
    frames: Iterator[Any] | None = None
    last_time: float = -np.inf

    def close(self) -> None:
        self.container.close()


class LeRobotDataset:
    """A LeRobot v2.1 or v3.0 dataset folder, read-only (implements `EpisodeDataset`).

    Episodes are numbered 0..num_episodes-1 in the order of the episode table (`episode_ids` holds the
    dataset's own `episode_index` values). `decoder_threads` is per open video (1 suits a data-loader worker).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        open_files: int = 4,
        decoder_threads: int = 1,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset path does not exist or is not a folder: {self.root}")
        info_path = self.root / "meta" / "info.json"
        self.info: dict[str, Any] = read_json(info_path, dataset=self.root)
        if not isinstance(self.info, dict):
            raise DatasetError("expected a JSON object", dataset=self.root, file=info_path)
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in SUPPORTED_VERSIONS:
            raise DatasetError(
                f"unsupported codebase_version {self.version!r} (expected one of {SUPPORTED_VERSIONS})",
                dataset=self.root,
                file=info_path,
            )
        self.fps = check_fps(self.info.get("fps"), field="fps", dataset=self.root, file=info_path)
        try:
            self.features: dict[str, dict[str, Any]] = dict(self.info["features"])
            self.chunks_size = int(self.info.get("chunks_size", 1000))
            self._data_path: str = self.info["data_path"]
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(
                f"meta/info.json lacks a valid {err}",
                dataset=self.root,
                file=info_path,
            ) from err
        self._video_path: str | None = self.info.get("video_path")
        self.camera_keys = tuple(k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES)
        self.video_keys = tuple(k for k in self.camera_keys if self.features[k]["dtype"] == "video")
        self.lowdim_keys = tuple(
            k for k in self.features if k not in self.camera_keys and k not in BOOKKEEPING
        )
        if self.video_keys and not self._video_path:
            raise DatasetError("video features but no video_path in meta/info.json", dataset=self.root)
        self.decoder_threads = decoder_threads
        self._parquet = FileCache(open_files)
        self._videos = FileCache(open_files)
        self._rows: dict[Path, dict[int, tuple[int, int]]] = {}  # data file -> episode id -> row range
        self._bounds: dict[Path, np.ndarray] = {}  # data file -> row-group boundaries
        if self.version == "v3.0":
            self._load_v3_index()
        else:
            self._load_v2_index()
        self.num_episodes = len(self.episode_ids)

    # ------------------------------------------------------------------ episode index (metadata only)
    def _load_v3_index(self) -> None:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError("no episode table meta/episodes/chunk-*/file-*.parquet", dataset=self.root)
        wanted = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index"]
        for key in self.video_keys:
            wanted += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
        parts = []
        for path in files:  # only the columns needed here, not the per-episode stats
            try:
                missing = [c for c in wanted if c not in pq.read_schema(path).names]
                if not missing:
                    parts.append(pq.read_table(path, columns=wanted))
            except (pa.ArrowException, OSError) as err:
                raise DatasetError(f"corrupt parquet: {err}", dataset=self.root, file=path) from err
            if missing:
                raise DatasetError(f"episode table lacks columns {missing}", dataset=self.root, file=path)
        table = pa.concat_tables(parts, promote_options="default")
        cols = {c: table.column(c).to_numpy() for c in wanted if c != "tasks"}
        order = np.argsort(cols["episode_index"], kind="stable")
        self.episode_ids = cols["episode_index"][order].astype(np.int64)
        self.lengths = cols["length"][order].astype(np.int64)
        tasks = table.column("tasks").to_pylist()
        self.tasks = [tasks[i][0] if tasks[i] else "" for i in order]
        self._data_file = np.stack([cols["data/chunk_index"], cols["data/file_index"]], 1)[order]
        self._video_file = {
            k: np.stack([cols[f"videos/{k}/chunk_index"], cols[f"videos/{k}/file_index"]], 1)[order]
            for k in self.video_keys
        }
        self._video_from = {
            k: cols[f"videos/{k}/from_timestamp"][order].astype(np.float64) for k in self.video_keys
        }

    def _load_v2_index(self) -> None:
        path = self.root / "meta" / "episodes.jsonl"
        rows = _read_jsonl(path, dataset=self.root)
        try:
            rows.sort(key=lambda r: int(r["episode_index"]))
            self.episode_ids = np.array([int(r["episode_index"]) for r in rows], dtype=np.int64)
            self.lengths = np.array([int(r["length"]) for r in rows], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"episode line lacks a valid {err}", dataset=self.root, file=path) from err
        self.tasks = [(r.get("tasks") or [""])[0] for r in rows]

    # ------------------------------------------------------------------ EpisodeDataset
    def episode_length(self, ep: int) -> int:
        return int(self.lengths[check_episode(self, ep)])

    def episode_task(self, ep: int) -> str:
        return self.tasks[check_episode(self, ep)]

    def read_lowdim(self, ep: int, key: str, *, allow_nan: bool = False) -> np.ndarray:
        """`[N, D]` values of `key` for episode `ep`; a NaN raises unless `allow_nan`."""
        if key not in self.lowdim_keys:
            raise DatasetError(
                f"unknown low-dim key {key!r} (available: {list(self.lowdim_keys)})", dataset=self.root
            )
        path, table = self._episode_rows(ep, [key])
        values = _column_to_numpy(table.column(key), path=path, key=key, dataset=self.root, episode=ep)
        if not allow_nan:
            check_finite(values, key=key, dataset=self.root, file=path, episode=ep)
        return values

    def read_timestamps(self, ep: int) -> np.ndarray:
        """`[N]` seconds. Video frame i is looked up at i / fps, so timestamps that disagree with the declared
        fps would pair rows with the wrong frames: that raises, naming the file and episode."""
        path, table = self._episode_rows(ep, ["timestamp"])
        values = table.column("timestamp").to_numpy()
        check_finite(values, key="timestamp", dataset=self.root, file=path, episode=ep)
        if (mismatch := rate_mismatch(values, self.fps)) is not None:
            raise DatasetError(
                f"{mismatch}: meta/info.json fps is wrong, or frames were dropped",
                dataset=self.root,
                file=path,
                episode=ep,
            )
        return values

    def read_frames(self, ep: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        if camera not in self.camera_keys:
            raise DatasetError(
                f"unknown camera {camera!r} (available: {list(self.camera_keys)})", dataset=self.root
            )
        ep = check_episode(self, ep)
        idx = check_frames(self, ep, frames)
        if camera in self.video_keys:
            return self._decode_video(ep, camera, idx)
        return self._decode_images(ep, camera, idx)

    # ------------------------------------------------------------------ parquet
    def data_file(self, ep: int) -> Path:
        """Path of the parquet holding episode `ep`."""
        ep = check_episode(self, ep)
        if self.version == "v3.0":
            chunk, file = self._data_file[ep]
            return self.root / self._data_path.format(chunk_index=int(chunk), file_index=int(file))
        eid = int(self.episode_ids[ep])
        return self.root / self._data_path.format(episode_chunk=eid // self.chunks_size, episode_index=eid)

    def video_file(self, ep: int, camera: str) -> tuple[Path, float]:
        """`(mp4 path, start time of episode ep in it)`."""
        ep = check_episode(self, ep)
        assert self._video_path is not None
        if self.version == "v3.0":
            chunk, file = self._video_file[camera][ep]
            path = self._video_path.format(video_key=camera, chunk_index=int(chunk), file_index=int(file))
            return self.root / path, float(self._video_from[camera][ep])
        eid = int(self.episode_ids[ep])
        path = self._video_path.format(
            episode_chunk=eid // self.chunks_size, video_key=camera, episode_index=eid
        )
        return self.root / path, 0.0

    def _parquet_file(self, path: Path, ep: int | None = None) -> pq.ParquetFile:
        def open_() -> pq.ParquetFile:
            try:
                return pq.ParquetFile(path)
            except FileNotFoundError as err:
                raise DatasetError("missing file", dataset=self.root, file=path, episode=ep) from err
            except (pa.ArrowException, OSError) as err:
                raise DatasetError(
                    f"corrupt parquet: {err}", dataset=self.root, file=path, episode=ep
                ) from err

        return self._parquet.get_or_open(path, open_)

    def _read_table(self, path: Path, ep: int | None, **kw: Any) -> pa.Table:
        try:
            return self._parquet_file(path, ep).read(**kw)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"corrupt parquet: {err}", dataset=self.root, file=path, episode=ep) from err

    def _row_range(self, ep: int) -> tuple[Path, int, int]:
        """`(file, first row, end row)` of episode `ep` in its data file, checked against its length."""
        ep = check_episode(self, ep)
        path, eid, n = self.data_file(ep), int(self.episode_ids[ep]), int(self.lengths[ep])
        if path not in self._rows:
            ids = self._read_table(path, ep, columns=["episode_index"]).column("episode_index").to_numpy()
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            ends = np.r_[starts[1:], len(ids)]
            self._rows[path] = {int(ids[s]): (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
        if eid not in self._rows[path]:
            raise DatasetError(
                "episode has no rows in its data file", dataset=self.root, file=path, episode=ep
            )
        start, end = self._rows[path][eid]
        if end - start != n:
            raise DatasetError(
                f"data file has {end - start} rows for the episode but the episode table says length {n}",
                dataset=self.root,
                file=path,
                episode=ep,
            )
        return path, start, end

    def _episode_rows(
        self, ep: int, columns: list[str], rows: np.ndarray | None = None
    ) -> tuple[Path, pa.Table]:
        """Columns of episode `ep` (all its rows, or `rows` relative to its start), reading only the row groups
        that hold them."""
        path, start, end = self._row_range(ep)
        pf = self._parquet_file(path, ep)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DatasetError(f"data file lacks columns {missing}", dataset=self.root, file=path, episode=ep)
        want = np.arange(start, end) if rows is None else start + rows
        if path not in self._bounds:  # first row of each row group
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            self._bounds[path] = np.cumsum([0, *sizes])
        bounds = self._bounds[path]
        first = int(np.searchsorted(bounds, want.min(), side="right")) - 1
        last = int(np.searchsorted(bounds, want.max(), side="right")) - 1
        try:
            table = pf.read_row_groups(list(range(first, last + 1)), columns=columns, use_threads=False)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"corrupt parquet: {err}", dataset=self.root, file=path, episode=ep) from err
        return path, table.take(pa.array(want - bounds[first]))

    def _decode_images(self, ep: int, camera: str, idx: np.ndarray) -> np.ndarray:
        from PIL import Image

        path, table = self._episode_rows(ep, [camera], rows=idx)
        out = []
        for f, cell in zip(idx, table.column(camera).to_pylist(), strict=True):
            try:
                # {bytes, path}: the encoded image inline, or (bytes null) a file relative to the dataset
                source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else self.root / cell["path"]
                with Image.open(source) as img:
                    out.append(np.asarray(img.convert("RGB")))
            except Exception as err:
                raise DatasetError(
                    f"unreadable image in {camera!r}: {err}",
                    dataset=self.root,
                    file=path,
                    episode=ep,
                    frame=int(f),
                ) from err
        return np.stack(out)

    # ------------------------------------------------------------------ video
    def _open_video(self, path: Path, ep: int) -> _Video:
        import av

        def open_() -> _Video:
            try:
                container = av.open(str(path))
                stream = container.streams.video[0]
            except FileNotFoundError as err:
                raise DatasetError("missing file", dataset=self.root, file=path, episode=ep) from err
            except (av.FFmpegError, IndexError) as err:
                raise DatasetError(f"corrupt video: {err}", dataset=self.root, file=path, episode=ep) from err
            stream.codec_context.thread_count = self.decoder_threads
            return _Video(container, stream)

        return self._videos.get_or_open(path, open_)

    def _decode_video(self, ep: int, camera: str, idx: np.ndarray) -> np.ndarray:
        import av

        path, start = self.video_file(ep, camera)
        video = self._open_video(path, ep)
        tol = 0.5 / self.fps
        targets = start + idx / self.fps
        order = np.argsort(targets, kind="stable")
        out: list[np.ndarray | None] = [None] * len(idx)
        best = np.full(len(idx), np.inf)
        pending = 0  # position in `order` of the first target not yet settled
        try:
            while pending < len(order):
                t_next = targets[order[pending]]
                if video.frames is None or not (
                    video.last_time < t_next - tol <= video.last_time + SEEK_GAP_S
                ):
                    # jump: the keyframe at or before the wanted time, then decode forward
                    offset = max(0, int((t_next - tol) / video.stream.time_base))
                    video.container.seek(offset, stream=video.stream, backward=True)
                    video.frames = video.container.decode(video.stream)
                    video.last_time = -np.inf
                for frame in video.frames:
                    if frame.pts is None:
                        continue
                    t = float(frame.pts * video.stream.time_base)
                    video.last_time = t
                    rgb = None
                    k = pending
                    while k < len(order) and targets[order[k]] - tol <= t:
                        j = order[k]
                        if abs(t - targets[j]) < best[j]:
                            rgb = frame.to_ndarray(format="rgb24") if rgb is None else rgb
                            out[j], best[j] = rgb, abs(t - targets[j])
                        k += 1
                    # settled: passed by (no later frame can be nearer), or matched within a quarter frame
                    while pending < len(order) and (
                        targets[order[pending]] + tol < t or best[order[pending]] <= tol / 2
                    ):
                        pending += 1
                    if pending == len(order) or targets[order[pending]] - tol > t + SEEK_GAP_S:
                        break  # done, or far enough ahead that a seek is cheaper
                else:
                    video.frames = None  # end of file
                    break
        except av.FFmpegError as err:
            self._videos.pop(path, None)
            raise DatasetError(f"corrupt video: {err}", dataset=self.root, file=path, episode=ep) from err
        missing = [i for i in range(len(idx)) if out[i] is None]
        if missing:
            raise DatasetError(
                f"no decoded frame of {camera!r} within half a frame of t={targets[missing[0]]:.4f}s "
                f"(video ends before the episode or is corrupt)",
                dataset=self.root,
                file=path,
                episode=ep,
                frame=int(idx[missing[0]]),
            )
        return np.stack(out)  # type: ignore[arg-type]


def _column_to_numpy(
    column: pa.ChunkedArray, *, path: Path, key: str, dataset: Path, episode: int
) -> np.ndarray:
    """A parquet column as `[N, D]`: scalars give D = 1; fixed-size or variable lists must have one width."""
    array = column.combine_chunks()
    n = len(array)
    if (
        pa.types.is_fixed_size_list(array.type)
        or pa.types.is_list(array.type)
        or pa.types.is_large_list(array.type)
    ):
        flat = array.flatten().to_numpy(zero_copy_only=False)
        if n and flat.size % n:
            raise DatasetError(f"ragged vectors in {key!r}", dataset=dataset, file=path, episode=episode)
        return flat.reshape(n, -1)
    return array.to_numpy(zero_copy_only=False).reshape(n, 1)


def _read_jsonl(path: Path, *, dataset: Path) -> list[dict[str, Any]]:
    import json

    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as err:
        raise DatasetError("missing file", dataset=dataset, file=path) from err
    rows = []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(
                    f"corrupt JSON on line {i + 1}: {err}", dataset=dataset, file=path
                ) from err
    return rows
