"""LeRobot v3.0 writer (no dependency on the `lerobot` package), used by the simulation suite.

Layout written (as lerobot 0.4 writes it):

    meta/info.json, meta/stats.json, meta/tasks.parquet (task string as the pandas index)
    meta/episodes/chunk-CCC/file-FFF.parquet        one row per episode: files, ranges, per-episode stats
    data/chunk-CCC/file-FFF.parquet                 frames of many episodes; rolls over at data_files_size_in_mb
    videos/<key>/chunk-CCC/file-FFF.mp4             episodes back to back; rolls over at video_files_size_in_mb

The dataset is built in a hidden sibling folder and renamed to `root` by `finalize()`, so a crash never leaves
a half-written dataset at `root`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
# Encoders in order of preference: (PyAV encoder, codec name LeRobot records, options). A GOP of 2 (LeRobot's
# default) keeps random access cheap: any frame is at most one frame after a keyframe. No B-frames, so
# that episodes concatenate with monotonic timestamps. H.264 comes first although LeRobot defaults to AV1:
# SVT-AV1 (PyAV 18 wheel) was seen to deadlock inside svt_av1_enc_send_picture on a loaded 2-core machine;
# AV1 stays one `video_codec="libsvtav1"` away, and the readers decode both.
VIDEO_ENCODERS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("libx264", "h264", {"crf": "23", "g": "2", "bf": "0", "preset": "veryfast"}),
    ("libsvtav1", "av1", {"crf": "30", "g": "2", "preset": "12"}),
    ("libaom-av1", "av1", {"crf": "30", "g": "2", "cpu-used": "8", "row-mt": "1"}),
    ("libopenh264", "h264", {"g": "2", "b": "2M"}),
    ("mpeg4", "mpeg4", {"g": "2", "qscale": "3"}),
)
# SVT-AV1 prints its whole configuration at info level for every file it opens.
os.environ.setdefault("SVT_LOG", "1")


def available_video_encoder(preferred: str | None = None) -> tuple[str, str, dict[str, str]]:
    """The best video encoder this PyAV build has: `(encoder, codec name, options)`.

    `preferred` (an encoder name such as "libsvtav1") must then be available; None picks H.264 when possible.
    """
    import av

    def usable(name: str) -> bool:
        try:
            av.codec.Codec(name, "w")
        except Exception:
            return False
        return True

    if preferred is not None:
        known = {enc[0]: enc for enc in VIDEO_ENCODERS}
        if not usable(preferred):
            raise ValueError(f"video_codec {preferred!r} is not an encoder of this PyAV build")
        return known.get(preferred, (preferred, av.codec.Codec(preferred, "w").name, {"g": "2"}))
    for enc in VIDEO_ENCODERS:
        if usable(enc[0]):
            return enc
    raise RuntimeError(f"PyAV has none of the video encoders {[e[0] for e in VIDEO_ENCODERS]}")


@dataclass
class _FileCursor:
    """Chunk/file indices of the file currently written for one stream (data or one camera)."""

    chunk_index: int = 0
    file_index: int = 0

    def advance(self, chunks_size: int) -> None:
        self.file_index += 1
        if self.file_index >= chunks_size:
            self.chunk_index, self.file_index = self.chunk_index + 1, 0


class _EpisodeVideo:
    """One camera of the episode being recorded, encoded frame by frame into its own temporary mp4."""

    def __init__(self, path: Path, fps: int, height: int, width: int, encoder: tuple[str, str, dict]) -> None:
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.container = av.open(str(path), mode="w")
        # every entry of VIDEO_ENCODERS is a video encoder; PyAV types a stream by the codec name's literal
        self.stream = cast("av.VideoStream", self.container.add_stream(encoder[0], rate=fps))
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = dict(encoder[2])
        self.num_frames = 0

    def add(self, img: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = self.num_frames
        self.container.mux(self.stream.encode(frame))
        self.num_frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))  # flush: encoders also complain when closed without it
        self.container.close()


class _VideoFile:
    """A shared mp4 that finished episodes are appended to without re-encoding (as lerobot concatenates)."""

    def __init__(self, path: Path, fps: int) -> None:
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps = path, fps
        self.container = av.open(str(path), mode="w")
        self.stream: Any = None
        self.num_frames = 0
        self.num_bytes = 0

    def append(self, episode: Path) -> int:
        """Copy the packets of an episode's mp4 after the frames already here; returns its first frame."""
        import av

        first = self.num_frames
        with av.open(str(episode)) as src:
            in_stream = src.streams.video[0]
            if self.stream is None:
                self.stream = self.container.add_stream_from_template(in_stream, opaque=True)
            assert in_stream.time_base is not None  # a demuxed stream has one
            offset = round(Fraction(first, self.fps) / in_stream.time_base)  # in the episode's time base
            for packet in src.demux(in_stream):
                if packet.dts is None:  # the demuxer's end-of-stream marker
                    continue
                assert packet.pts is not None  # mp4 packets carry both time stamps
                packet.pts, packet.dts = packet.pts + offset, packet.dts + offset
                packet.stream = self.stream
                self.container.mux(packet)
                self.num_frames += 1
        self.num_bytes += episode.stat().st_size
        return first

    def close(self) -> None:
        self.container.close()


class LeRobotV3Writer:
    """Write episodes frame by frame into a LeRobot v3.0 dataset at `root`.

    features: LeRobot info.json-style entries, e.g.
        {"observation.images.front": {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"]},
         "observation.state": {"dtype": "float32", "shape": [8], "names": [...]}, "action": {...}}
    Camera features have dtype "video" (mp4) or "image" (PNG bytes inside the parquet); the bookkeeping columns
    (timestamp, frame_index, episode_index, index, task_index) are added by the writer.
    video_codec: a PyAV encoder name; None picks the best available (AV1 like LeRobot, else H.264).
    """

    def __init__(
        self,
        root: str | Path,
        fps: int,
        features: dict[str, dict],
        robot_type: str = "",
        *,
        video_codec: str | None = None,
        overwrite: bool = False,
        data_files_size_in_mb: float = 100,
        video_files_size_in_mb: float = 200,
        chunks_size: int = 1000,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and not overwrite:
            raise FileExistsError(f"dataset folder already exists: {self.root} (pass overwrite=True)")
        if not (isinstance(fps, int) and fps > 0):
            raise ValueError(f"fps must be a positive int, got {fps!r}")
        self.fps, self.robot_type, self.overwrite = fps, robot_type, overwrite
        self.features = _validate_features(features)
        self.camera_keys = tuple(k for k, f in self.features.items() if f["dtype"] in ("video", "image"))
        self.video_keys = tuple(k for k in self.camera_keys if self.features[k]["dtype"] == "video")
        self.lowdim_keys = tuple(k for k in self.features if k not in self.camera_keys)
        self.encoder = available_video_encoder(video_codec) if self.video_keys else None
        for key in self.video_keys:
            h, w, _ = self.features[key]["shape"]
            if h % 2 or w % 2:
                raise ValueError(f"features[{key!r}].shape {[h, w]}: video height and width must be even")
        self.data_mb, self.video_mb, self.chunks_size = (
            data_files_size_in_mb,
            video_files_size_in_mb,
            chunks_size,
        )

        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.writing-", dir=self.root.parent))
        self._tasks: dict[str, int] = {}
        # episode-table rows not yet written (one meta/episodes file's worth) and running dataset stats
        self._episode_rows: list[dict[str, Any]] = []
        self._num_episodes = 0
        self._meta_cursor = _FileCursor()
        self._meta_mb = 0.0
        self._stats = {key: _RunningStats() for key in (*self.features, *BOOKKEEPING)}
        self._total_frames = 0
        # the episode being recorded: low-dim rows and tasks, PNG bytes of image features, small copies of
        # camera frames for the stats, and one open encoder per video feature
        self._rows: list[dict[str, np.ndarray]] = []
        self._frame_tasks: list[str] = []
        self._pngs: dict[str, list[bytes]] = {k: [] for k in self.camera_keys if k not in self.video_keys}
        self._thumbs: dict[str, list[np.ndarray]] = {k: [] for k in self.camera_keys}
        self._encoders: dict[str, _EpisodeVideo] = {}
        self._data_cursor = _FileCursor()
        self._data_writer: pq.ParquetWriter | None = None
        self._data_mb = 0.0
        self._video_cursor = {k: _FileCursor() for k in self.video_keys}
        self._videos: dict[str, _VideoFile] = {}
        self._finalized = False

    # ------------------------------------------------------------------ frames and episodes
    def add_frame(self, frame: Mapping[str, np.ndarray], task: str) -> None:
        """Add one frame: every feature by name (images uint8 `[H, W, 3]` RGB) and its task string.

        Video frames are encoded right away, so an episode's images are never all held in memory.
        """
        self._check_open()
        if not isinstance(task, str):
            raise TypeError(f"task must be a str, got {type(task).__name__}")
        missing = [k for k in self.features if k not in frame]
        extra = [k for k in frame if k not in self.features and k not in BOOKKEEPING]
        if missing or extra:
            raise ValueError(f"frame keys do not match the features: missing {missing}, unexpected {extra}")
        row: dict[str, np.ndarray] = {}
        for key, spec in self.features.items():
            value = np.asarray(frame[key])
            shape = tuple(spec["shape"])
            if key in self.camera_keys:
                if value.dtype != np.uint8 or value.shape != shape:
                    raise ValueError(
                        f"frame[{key!r}]: expected uint8 {list(shape)} RGB, got {value.dtype} {list(value.shape)}"
                    )
            elif value.size != math.prod(shape):
                raise ValueError(f"frame[{key!r}]: expected shape {list(shape)}, got {list(value.shape)}")
            else:
                row[key] = value.astype(spec["dtype"]).reshape(shape)
        for key in self.camera_keys:
            img = np.ascontiguousarray(frame[key])
            step = max(1, max(img.shape[:2]) // _STATS_SIDE)
            self._thumbs[key].append(img[::step, ::step].copy())
            if key in self._pngs:
                self._pngs[key].append(_png(img))
            else:
                if key not in self._encoders:
                    assert self.encoder is not None  # chosen in __init__ whenever there are video features
                    h, w, _ = self.features[key]["shape"]
                    path = self._tmp / "episode-videos" / f"{key}.mp4"
                    self._encoders[key] = _EpisodeVideo(path, self.fps, h, w, self.encoder)
                self._encoders[key].add(img)
        self._rows.append(row)
        self._frame_tasks.append(task)

    def discard_episode(self) -> None:
        """Drop the frames added since the last `save_episode()`."""
        for encoder in self._encoders.values():
            encoder.close()
            encoder.path.unlink(missing_ok=True)
        self._reset_episode()

    def _reset_episode(self) -> None:
        self._rows, self._frame_tasks, self._encoders = [], [], {}
        for pngs in self._pngs.values():
            pngs.clear()
        for thumbs in self._thumbs.values():
            thumbs.clear()

    def save_episode(self) -> int:
        """Write the frames added since the last call as one episode; returns its episode index."""
        self._check_open()
        if not self._rows:
            raise ValueError("save_episode() called with no frames added since the last episode")
        ep, n, start = self._num_episodes, len(self._rows), self._total_frames
        for task in self._frame_tasks:
            self._tasks.setdefault(task, len(self._tasks))
        columns: dict[str, np.ndarray] = {k: np.stack([r[k] for r in self._rows]) for k in self.lowdim_keys}
        columns["timestamp"] = (np.arange(n) / self.fps).astype(np.float32)
        columns["frame_index"] = np.arange(n, dtype=np.int64)
        columns["episode_index"] = np.full(n, ep, dtype=np.int64)
        columns["index"] = np.arange(start, start + n, dtype=np.int64)
        columns["task_index"] = np.array([self._tasks[t] for t in self._frame_tasks], dtype=np.int64)

        record: dict[str, Any] = {
            "episode_index": ep,
            "tasks": list(dict.fromkeys(self._frame_tasks)),
            "length": n,
            **self._write_data(columns),
            "dataset_from_index": start,
            "dataset_to_index": start + n,
        }
        for key in self.video_keys:
            record.update(self._write_video(key))
        stats = {key: _numeric_stats(values) for key, values in columns.items()}
        stats.update({key: _image_stats(self._thumbs[key]) for key in self.camera_keys})
        for key, feature_stats in stats.items():
            self._stats[key].add(feature_stats)
            record.update({f"stats/{key}/{s}": v for s, v in feature_stats.items()})
        self._add_episode_row(record)
        self._num_episodes += 1
        self._total_frames += n
        self._reset_episode()
        return ep

    # ------------------------------------------------------------------ files
    def _write_data(self, columns: dict[str, np.ndarray]) -> dict[str, int]:
        arrays = {key: _to_arrow(columns[key]) for key in self.lowdim_keys}
        for key, pngs in self._pngs.items():
            arrays[key] = pa.array([{"bytes": b, "path": None} for b in pngs], type=_IMAGE_TYPE)
        arrays.update({key: pa.array(columns[key]) for key in BOOKKEEPING})
        table = pa.table(arrays)
        size_mb = table.nbytes / 2**20
        # as lerobot: start a new file when this episode would take the current one past the limit
        if self._data_writer is not None and self._data_mb + size_mb >= self.data_mb:
            self._data_writer.close()
            self._data_writer, self._data_mb = None, 0.0
            self._data_cursor.advance(self.chunks_size)
        if self._data_writer is None:
            path = self._tmp / DATA_PATH.format(**vars(self._data_cursor))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(path, table.schema)
        self._data_writer.write_table(table)
        self._data_mb += size_mb
        return {
            "data/chunk_index": self._data_cursor.chunk_index,
            "data/file_index": self._data_cursor.file_index,
        }

    def _add_episode_row(self, record: dict[str, Any]) -> None:
        """Queue an episode-table row; like data files, the table rolls over to a new file at the size limit."""
        size_mb = len(json.dumps(record)) / 2**20  # a cheap upper bound of the row's size in parquet
        if self._episode_rows and self._meta_mb + size_mb >= self.data_mb:
            self._flush_episode_rows()
            self._meta_cursor.advance(self.chunks_size)
        record["meta/episodes/chunk_index"] = self._meta_cursor.chunk_index
        record["meta/episodes/file_index"] = self._meta_cursor.file_index
        self._episode_rows.append(record)
        self._meta_mb += size_mb

    def _flush_episode_rows(self) -> None:
        path = self._tmp / EPISODES_PATH.format(**vars(self._meta_cursor))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self._episode_rows), path)
        self._episode_rows, self._meta_mb = [], 0.0

    def _write_video(self, key: str) -> dict[str, Any]:
        episode = self._encoders[key]
        episode.close()
        cursor, video = self._video_cursor[key], self._videos.get(key)
        size_mb = episode.path.stat().st_size / 2**20
        if video is not None and (video.num_bytes / 2**20) + size_mb >= self.video_mb:
            video.close()
            video = None
            cursor.advance(self.chunks_size)
        if video is None:
            path = self._tmp / VIDEO_PATH.format(video_key=key, **vars(cursor))
            video = self._videos[key] = _VideoFile(path, self.fps)
        first = video.append(episode.path)
        episode.path.unlink()
        return {
            f"videos/{key}/chunk_index": cursor.chunk_index,
            f"videos/{key}/file_index": cursor.file_index,
            f"videos/{key}/from_timestamp": first / self.fps,
            f"videos/{key}/to_timestamp": video.num_frames / self.fps,
        }

    # ------------------------------------------------------------------ metadata
    def finalize(self) -> Path:
        """Close all files, write the metadata and move the dataset to `root`; returns `root`."""
        self._check_open()
        if self._rows:
            raise ValueError(
                f"{len(self._rows)} frames were added but not saved: call save_episode() or discard_episode()"
            )
        if not self._num_episodes:
            raise ValueError("finalize() with no saved episode: nothing to write")
        if self._data_writer is not None:
            self._data_writer.close()
        for video in self._videos.values():
            video.close()
        shutil.rmtree(self._tmp / "episode-videos", ignore_errors=True)
        self._flush_episode_rows()
        meta = self._tmp / "meta"
        _write_tasks(meta / "tasks.parquet", list(self._tasks))
        (meta / "info.json").write_text(json.dumps(self._info(), indent=4))
        stats = {key: running.result() for key, running in self._stats.items()}
        (meta / "stats.json").write_text(json.dumps(stats, indent=4))

        if self.root.exists():  # overwrite=True: swap in the new folder, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.old-", dir=self.root.parent))
            os.replace(self.root, old / self.root.name)
            os.replace(self._tmp, self.root)
            shutil.rmtree(old)
        else:
            os.replace(self._tmp, self.root)
        self._finalized = True
        return self.root

    def abort(self) -> None:
        """Give up: delete everything written so far (`root` is left untouched)."""
        if self._finalized:
            return
        if self._data_writer is not None:
            self._data_writer.close()
        videos: list[_EpisodeVideo | _VideoFile] = [*self._encoders.values(), *self._videos.values()]
        for video in videos:
            with contextlib.suppress(Exception):  # already broken or closed: it is deleted anyway
                video.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._finalized = True

    def __enter__(self) -> LeRobotV3Writer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def _check_open(self) -> None:
        if self._finalized:
            raise RuntimeError(f"writer for {self.root} is already finalized or aborted")

    def _info(self) -> dict[str, Any]:
        features: dict[str, Any] = {}
        for key, spec in self.features.items():
            features[key] = {"dtype": spec["dtype"], "shape": list(spec["shape"]), "names": spec.get("names")}
            if key in self.video_keys:
                assert self.encoder is not None  # chosen in __init__ whenever there are video features
                h, w, c = spec["shape"]
                features[key]["info"] = {
                    "video.height": h,
                    "video.width": w,
                    "video.codec": self.encoder[1],
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "video.fps": self.fps,
                    "video.channels": c,
                    "has_audio": False,
                }
        for key in BOOKKEEPING:
            dtype = "float32" if key == "timestamp" else "int64"
            features[key] = {"dtype": dtype, "shape": [1], "names": None}
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": self._num_episodes,
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_mb,
            "video_files_size_in_mb": self.video_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{self._num_episodes}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None,
            "features": features,
        }


_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_STAT_NAMES = ("min", "max", "mean", "std", "count", *(f"q{round(q * 100):02d}" for q in QUANTILES))
_STATS_SIDE = 64  # image stats use frames subsampled to about this many pixels a side
_NUMERIC_DTYPES = ("float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def _validate_features(features: dict[str, dict]) -> dict[str, dict]:
    if not features:
        raise ValueError("features must name at least one feature")
    out: dict[str, dict] = {}
    for key, spec in features.items():
        if key in BOOKKEEPING:
            continue  # written by the writer itself
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if not isinstance(shape, list | tuple) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"features[{key!r}].shape must be a list of positive ints, got {shape!r}")
        if dtype in ("video", "image"):
            if len(shape) != 3 or shape[2] != 3:
                raise ValueError(f"features[{key!r}].shape must be [height, width, 3], got {list(shape)}")
        elif dtype not in _NUMERIC_DTYPES:
            raise ValueError(
                f"features[{key!r}].dtype must be video, image or one of {_NUMERIC_DTYPES}: {dtype!r}"
            )
        out[key] = {**spec, "shape": list(shape)}
    return out


def _to_arrow(values: np.ndarray) -> pa.Array:
    """`[N]` -> a plain column, `[N, D]` -> fixed_size_list<D> (LeRobot's layout for vectors)."""
    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, math.prod(values.shape[1:]))


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _numeric_stats(values: np.ndarray) -> dict[str, Any]:
    """Per-episode stats of a `[N]` or `[N, D]` column, as JSON-able lists (shape [D], or [1] for scalars)."""
    x = values.reshape(len(values), -1).astype(np.float64)
    out = {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "count": np.array([len(x)]),
    }
    for q, value in zip(QUANTILES, np.quantile(x, QUANTILES, axis=0), strict=True):
        out[f"q{round(q * 100):02d}"] = value
    return {k: v.tolist() for k, v in out.items()}


def _image_stats(thumbs: list[np.ndarray], max_frames: int = 100) -> dict[str, Any]:
    """Per-channel stats `(3, 1, 1)` on a 0..1 scale over subsampled frames and pixels (as lerobot does)."""
    picks = np.linspace(0, len(thumbs) - 1, min(len(thumbs), max_frames)).round().astype(int)
    px = np.stack([thumbs[i] for i in picks]).reshape(-1, 3).astype(np.float64) / 255.0
    out = {"min": px.min(0), "max": px.max(0), "mean": px.mean(0), "std": px.std(0)}
    for q, value in zip(QUANTILES, np.quantile(px, QUANTILES, axis=0), strict=True):
        out[f"q{round(q * 100):02d}"] = value
    stats: dict[str, Any] = {k: v.reshape(3, 1, 1).tolist() for k, v in out.items()}
    stats["count"] = [len(thumbs)]
    return stats


class _RunningStats:
    """Whole-dataset stats of one feature, accumulated episode by episode: exact min/max/mean/std; quantiles
    as the count-weighted mean of the episodes' quantiles (as lerobot 0.4 aggregates them)."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, np.ndarray] = {}

    def add(self, stats: dict[str, Any]) -> None:
        n = int(np.asarray(stats["count"]).reshape(-1)[0])
        mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
        weighted = {"mean": n * mean, "sq": n * (std**2 + mean**2)}
        weighted.update({q: n * np.asarray(stats[q], np.float64) for q in _STAT_NAMES[5:]})
        if not self.count:
            self.sums = {
                "min": np.asarray(stats["min"], np.float64),
                "max": np.asarray(stats["max"], np.float64),
            }
            self.sums.update({k: np.zeros_like(mean) for k in weighted})
        self.sums["min"] = np.minimum(self.sums["min"], stats["min"])
        self.sums["max"] = np.maximum(self.sums["max"], stats["max"])
        for key, value in weighted.items():
            self.sums[key] = self.sums[key] + value
        self.count += n

    def result(self) -> dict[str, Any]:
        mean = self.sums["mean"] / self.count
        out = {
            "min": self.sums["min"],
            "max": self.sums["max"],
            "mean": mean,
            "std": np.sqrt(np.maximum(self.sums["sq"] / self.count - mean**2, 0.0)),
            "count": np.array([self.count]),
        }
        out.update({q: self.sums[q] / self.count for q in _STAT_NAMES[5:]})
        return {k: v.tolist() for k, v in out.items()}


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """meta/tasks.parquet: `task_index` column, the task string as the pandas index (`__index_level_0__`)."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
    }
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "__index_level_0__": tasks})
    table = table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
    pq.write_table(table, path)
