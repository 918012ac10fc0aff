"""`xvla data inspect`: what is in a dataset or a mixture, and what looks wrong in it.

Per source: episodes, frames, duration, rate, cameras and resolutions, instructions, the spread of the
intention anchors (how far the end effector moves over the horizon; needs a source description, i.e. a
mixture file) and warnings: timestamps that disagree with the declared fps, undecodable video (first and
last frame of each checked episode), shapes that disagree with LeRobot's info.json, NaN/inf values, absurd
magnitudes (beyond +-1e6, or outside float32's range), constant dimensions, non-unit quaternions, rotation matrices off SO(3), grippers outside their declared open/closed
range. Value checks read at most `max_episodes` episodes, spread evenly over the dataset; counts and
durations come from metadata and cover every episode. A source none of whose checked episodes reads and
decodes fully is an error (`xvla data inspect` exits 1).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xvla.data.episode_base import DatasetError, EpisodeDataset, rate_mismatch
from xvla.data.episodes import detect_format, open_dataset

TOLERANCE = 1e-3  # for unit quaternions, orthonormal matrices and gripper ranges (relative to the range)
ANCHOR_FRAMES = 64  # frames per episode at which anchors are evaluated
MIXTURE_SUFFIXES = (".json", ".yaml", ".yml")
# No pose (m, rad), gripper or joint value of a robot is this large: beyond it a value is a unit error or garbage
# (actions of 1e30 trained to NaN losses, issue 14 D3).
MAX_ABS = 1e6
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model computes in float32 or narrower: beyond it is inf


@dataclass
class SourceReport:
    """What `inspect` found in one source (one dataset)."""

    name: str
    path: str
    format: str  # e.g. "lerobot v3.0", "hdf5 robomimic"
    episodes: int
    frames: int
    duration_s: float
    fps: float
    cameras: dict[str, list[int]]  # key -> [height, width]
    tasks: dict[str, int]  # instruction -> number of episodes
    lowdim: dict[str, int]  # key -> dimension
    episode_length: dict[str, float]  # min / mean / max frames
    checked_episodes: int
    anchors: dict[str, float] | None = None  # displacement over the horizon (m) when a source is known
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # the source could not be opened or read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def failed(cls, name: str, path: str, format: str, err: Exception) -> SourceReport:
        return cls(name, path, format, 0, 0, 0.0, 0.0, {}, {}, {}, {}, 0, error=str(err))


def inspect_path(path: str | Path, *, max_episodes: int = 20, **options: Any) -> list[SourceReport]:
    """Reports for a mixture file (every source) or one dataset folder/file (auto-detected)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in MIXTURE_SUFFIXES:
        from xvla.data.sources import Mixture

        mixture = Mixture.load(path)
        reports = []
        for s in mixture.sources:
            try:
                ds = open_dataset(s.path, format=s.format, **s.reader_options)  # type: ignore[arg-type]
                reports.append(inspect_dataset(ds, name=s.name, source=s, max_episodes=max_episodes))
            except (DatasetError, OSError) as err:  # one broken source does not hide the others
                reports.append(SourceReport.failed(s.name, s.path, s.format, err))
        return reports
    kind = detect_format(path) if options.get("format", "auto") == "auto" else options["format"]
    if kind != "hdf5":
        options.pop("fps", None)  # only HDF5 files may lack a recorded rate
    return [inspect_dataset(open_dataset(path, **options), name=path.name, max_episodes=max_episodes)]


def inspect_dataset(
    ds: EpisodeDataset, *, name: str, source: Any = None, max_episodes: int = 20
) -> SourceReport:
    """Inspect an open dataset; `source` (an `xvla.data.sources.Source`) enables layout checks and anchors."""
    n = ds.num_episodes
    lengths = np.array([ds.episode_length(ep) for ep in range(n)], dtype=np.int64)
    sample = np.unique(np.linspace(0, n - 1, min(n, max_episodes)).round().astype(int)) if n else []
    # NaNs are reported here rather than raised (the readers' `allow_nan` option)
    values: dict[str, list[np.ndarray]] = {key: [] for key in ds.lowdim_keys}
    cameras: dict[str, list[int]] = {}  # resolutions as decoded from the first decodable checked episode
    checked: list[int] = []  # episodes whose low-dim values were read
    readable = 0  # checked episodes whose values and video all decode
    warnings: list[str] = []
    mistimed: list[tuple[int, str]] = []  # (episode, why its timestamps cannot be used)
    undecodable: dict[str, list[tuple[int, str]]] = {key: [] for key in ds.camera_keys}
    for ep in map(int, sample):
        try:
            row = {
                key: np.asarray(ds.read_lowdim(ep, key, allow_nan=True), np.float64) for key in ds.lowdim_keys
            }
        except DatasetError as err:
            warnings.append(f"episode {ep} unreadable: {err}")
            continue
        checked.append(ep)
        for key, v in row.items():
            values[key].append(v)
        if (problem := _timestamp_problem(ds, ep)) is not None:
            mistimed.append((ep, problem))
        decoded = True
        for key in ds.camera_keys if lengths[ep] else ():
            # first and last frame: a truncated video usually still decodes its start
            try:
                h, w = ds.read_frames(ep, key, [0, int(lengths[ep]) - 1]).shape[1:3]
            except DatasetError as err:
                undecodable[key].append((ep, str(err)))
                decoded = False
                continue
            cameras.setdefault(key, [int(h), int(w)])
        readable += decoded
    warnings += _once(mistimed, "", len(checked), "training refuses these episodes")
    for key, bad in undecodable.items():
        warnings += _once(bad, f"{key}: undecodable frames in ", len(checked), "training stops at them")
    warnings += _shape_warnings(ds, values, cameras)
    report = SourceReport(
        name=name,
        path=str(ds.root),
        format=_format_name(ds),
        episodes=n,
        frames=int(lengths.sum()),
        duration_s=float(lengths.sum() / ds.fps),
        fps=float(ds.fps),
        cameras=cameras,
        tasks=dict(Counter(ds.episode_task(ep) for ep in range(n)).most_common()),
        lowdim={key: int(v[0].shape[1]) if v else 0 for key, v in values.items()},
        episode_length={
            "min": int(lengths.min()) if n else 0,
            "mean": float(lengths.mean()) if n else 0.0,
            "max": int(lengths.max()) if n else 0,
        },
        checked_episodes=len(checked),
        warnings=warnings,
    )
    if len(sample) and not readable:
        report.error = f"none of the {len(sample)} checked episodes is fully readable (see the warnings)"
    names = _feature_names(ds)
    for key, per_episode in values.items():
        if per_episode:
            # with a source, its layout says where the rotations are (checked below), not the names
            report.warnings += _value_warnings(
                key, per_episode, checked, names.get(key), quaternions_by_name=source is None
            )
            report.warnings += _magnitude_warnings(ds, key, per_episode, checked, names.get(key))
    if source is not None:
        missing = _missing_keys(source, ds)
        report.warnings += missing
        report.warnings += _layout_warnings(source, values)
        if not missing:
            timed = [ep for ep in checked if ep not in dict(mistimed)]
            report.anchors = _anchor_stats(ds, source, timed, report.warnings)
    return report


def _once(problems: list[tuple[int, str]], prefix: str, checked: int, consequence: str) -> list[str]:
    """One warning for a problem many episodes share: the first episode's message and how many more have it."""
    if not problems:
        return []
    ep, problem = problems[0]
    more = f" (and {len(problems) - 1} more of {checked} checked episodes)" if len(problems) > 1 else ""
    return [f"{prefix}episode {ep}: {problem}{more}; {consequence}"]


def _shape_warnings(
    ds: EpisodeDataset, values: dict[str, list[np.ndarray]], cameras: dict[str, list[int]]
) -> list[str]:
    """Where the shapes LeRobot's info.json declares disagree with the data as read."""
    out = []
    for key, spec in getattr(ds, "features", {}).items():
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(isinstance(x, int) for x in shape):
            continue
        if values.get(key):
            dim = int(values[key][0].shape[1])
            if int(np.prod(shape)) != dim:
                out.append(
                    f"{key}: meta/info.json declares shape {shape}, the data has {dim} values per frame"
                )
        elif key in cameras and len(shape) == 3:
            names = spec.get("names") if isinstance(spec.get("names"), list) else []
            h, w = (
                (shape[names.index("height")], shape[names.index("width")])
                if "height" in names and "width" in names
                else shape[:2]
            )
            if [h, w] != cameras[key]:
                out.append(
                    f"{key}: meta/info.json declares {h}x{w} frames, they decode to "
                    f"{cameras[key][0]}x{cameras[key][1]}"
                )
    return out


def _timestamp_problem(ds: EpisodeDataset, ep: int) -> str | None:
    """Why episode `ep`'s timestamps are unusable (unreadable, or off the declared fps), or None."""
    try:
        times = ds.read_timestamps(ep)  # the LeRobot reader itself refuses a rate mismatch
    except DatasetError as err:
        return str(err)
    return rate_mismatch(times, ds.fps)


def _missing_keys(source: Any, ds: EpisodeDataset) -> list[str]:
    """The dataset keys a source names that the dataset does not have."""
    wanted = [("state", source.state.key, ds.lowdim_keys)]
    if source.action is not None:
        wanted.append(("action", source.action.key, ds.lowdim_keys))
    wanted += [(f"cameras[{i}]", cam.key, ds.camera_keys) for i, cam in enumerate(source.cameras)]
    return [
        f"source {what} key {key!r} is not in the dataset (it has {list(have)})"
        for what, key, have in wanted
        if key not in have
    ]


def _format_name(ds: EpisodeDataset) -> str:
    version = getattr(ds, "version", None)
    layout = getattr(ds, "layout", None)
    if version:
        return f"lerobot {version}"
    return f"hdf5 {layout}" if layout else type(ds).__name__


def _feature_names(ds: EpisodeDataset) -> dict[str, list[str]]:
    """Per-dimension names from LeRobot's info.json, where given as a flat list."""
    out = {}
    for key, spec in getattr(ds, "features", {}).items():
        names = spec.get("names")
        if isinstance(names, list) and all(isinstance(x, str) for x in names):
            out[key] = names
    return out


def _value_warnings(
    key: str,
    per_episode: list[np.ndarray],
    episodes: list[int],
    names: list[str] | None,
    *,
    quaternions_by_name: bool,
) -> list[str]:
    out = []
    for ep, values in zip(episodes, per_episode, strict=True):
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            out.append(
                f"{key}: {int(bad.sum())} frames with NaN/inf in episode {ep} (first at frame {int(np.argmax(bad))})"
            )
    stacked = np.concatenate(per_episode)
    if len(stacked) > 1:
        with np.errstate(invalid="ignore"):
            constant = np.flatnonzero(np.nanmax(stacked, 0) == np.nanmin(stacked, 0))
        if len(constant):
            labels = [names[i] if names and len(names) == stacked.shape[1] else str(i) for i in constant]
            out.append(f"{key}: constant dimensions {labels} (value {stacked[0, constant].tolist()})")
    if quaternions_by_name and names and len(names) == stacked.shape[1]:
        quat = [names.index(q) for q in ("qx", "qy", "qz", "qw") if q in names]
        if len(quat) == 4:
            out += _quat_warnings(f"{key}[qx,qy,qz,qw]", stacked[:, quat])
    return out


def _magnitude_warnings(
    ds: EpisodeDataset, key: str, per_episode: list[np.ndarray], episodes: list[int], names: list[str] | None
) -> list[str]:
    """Finite values beyond +-MAX_ABS: the first episode that has them (file, frame, columns, the largest value)
    and how many more do. NaN/inf are `_value_warnings`' concern."""
    problems, overflow = [], False
    for ep, values in zip(episodes, per_episode, strict=True):
        with np.errstate(invalid="ignore"):
            size = np.where(np.isfinite(values), np.abs(values), 0.0)
        absurd = size > MAX_ABS
        if not absurd.any():
            continue
        frame, col = np.unravel_index(int(np.argmax(size)), values.shape)
        worst = float(values[frame, col])
        overflow |= abs(worst) > FLOAT32_MAX
        count, width = int(absurd.sum()), values.shape[1]
        columns = [_column(names, int(c), width) for c in np.flatnonzero(absurd.any(0))]
        problems.append(
            (
                ep,
                f"{count} value{'s' * (count > 1)} beyond ±{MAX_ABS:.0e} in column{'s' * (len(columns) > 1)} "
                f"{', '.join(columns)} (largest {worst:.3g} at frame {frame}, column "
                f"{_column(names, int(col), width)}; file {_episode_file(ds, ep)})",
            )
        )
    consequence = (
        "outside float32's range: inf in training, which stops at the first non-finite loss"
        if overflow
        else "a unit error or corrupt values"
    )
    return _once(problems, f"{key}: ", len(episodes), consequence)


def _column(names: list[str] | None, i: int, width: int) -> str:
    return f"{i} ({names[i]})" if names and len(names) == width else str(i)


def _episode_file(ds: EpisodeDataset, ep: int) -> str:
    """The file holding episode `ep`'s low-dim values: a LeRobot parquet, or an HDF5 file and group."""
    if hasattr(ds, "data_file"):
        return str(ds.data_file(ep))
    if hasattr(ds, "episode_file"):
        path, group = ds.episode_file(ep)
        return f"{path} group {group}"
    return str(ds.root)


def _quat_warnings(label: str, q: np.ndarray) -> list[str]:
    err = np.abs(np.linalg.norm(q, axis=1) - 1.0)
    err = err[np.isfinite(err)]
    if len(err) and err.max() > TOLERANCE:
        return [
            f"{label}: {int((err > TOLERANCE).sum())} non-unit quaternions (worst |norm - 1| = {err.max():.3g})"
        ]
    return []


def _layout_warnings(source: Any, values: dict[str, list[np.ndarray]]) -> list[str]:
    """Rotation and gripper checks for the arms a source describes in its state and action streams."""
    out = []
    for stream in (source.state, source.action):
        if stream is None or not values.get(stream.key):
            continue
        x = np.concatenate(values[stream.key])
        x = x[np.isfinite(x).all(axis=1)]
        if x.shape[1] != stream.dim:
            out.append(f"{stream.key}: {x.shape[1]} dimensions but the source declares dim {stream.dim}")
            continue
        for i, arm in enumerate(stream.arms):
            label = f"{stream.key} arm {i}"
            rot = x[:, list(arm.rotation)]
            fmt = arm.pose.rotation
            if fmt.startswith("quat"):
                out += _quat_warnings(f"{label} rotation", rot)
            elif fmt == "matrix":
                m = rot.reshape(-1, 3, 3)
                ortho = np.abs(m @ np.swapaxes(m, 1, 2) - np.eye(3)).max(axis=(1, 2))
                det = np.abs(np.linalg.det(m) - 1.0)
                off = np.maximum(ortho, det)
                if len(off) and off.max() > TOLERANCE:
                    out.append(
                        f"{label} rotation: {int((off > TOLERANCE).sum())} matrices off SO(3) "
                        f"(worst deviation {off.max():.3g})"
                    )
            if arm.gripper is not None:
                g = x[:, arm.gripper]
                lo, hi = sorted((arm.gripper_convention.open, arm.gripper_convention.closed))
                slack = TOLERANCE * (hi - lo)
                outside = (g < lo - slack) | (g > hi + slack)
                if outside.any():
                    out.append(
                        f"{label} gripper: {int(outside.sum())} values outside the declared range [{lo:g}, {hi:g}] "
                        f"(seen [{g.min():.4g}, {g.max():.4g}])"
                    )
    return out


def _anchor_stats(
    ds: EpisodeDataset, source: Any, episodes: list[int], warnings: list[str]
) -> dict[str, float]:
    """How far (m) the left arm's anchors reach from the proprio over the horizon, and the static share."""
    from xvla.data import anchors

    reach, static, frames = [], 0, 0
    for ep in episodes:
        try:
            times = np.asarray(ds.read_timestamps(ep), dtype=np.float64)
            state = ds.read_lowdim(ep, source.state.key)
            proprio = source.state_to_canonical(state)
            if source.targets == "action":
                targets = source.actions_to_canonical(ds.read_lowdim(ep, source.action.key), state)
                target_times = times + 1.0 / ds.fps
            else:
                targets, target_times = proprio, times
            valid = anchors.valid_frames(times, proprio, target_times, targets, source.horizon_s)
        except (DatasetError, ValueError) as err:
            warnings.append(f"anchors: episode {ep} skipped: {err}")
            continue
        frames += len(times)
        static += len(times) - len(valid)
        for i in valid[np.linspace(0, len(valid) - 1, min(len(valid), ANCHOR_FRAMES)).astype(int)]:
            chunk = anchors.intention_targets(
                target_times,
                targets,
                float(times[i]),
                source.horizon_s,
                num_arms=source.num_arms,
                rot6d_layout=source.rot6d_layout,
                binary_grippers=source.binary_grippers,
            )
            reach.append(float(np.linalg.norm(chunk[:, :3] - proprio[i, :3], axis=1).max()))
    return {
        "horizon_s": float(source.horizon_s),
        "mean_displacement_m": float(np.mean(reach)) if reach else 0.0,
        "max_displacement_m": float(np.max(reach)) if reach else 0.0,
        "static_frame_fraction": static / frames if frames else 0.0,
    }


# ---------------------------------------------------------------------- output
def _short(key: str) -> str:
    """ "observation.images.front" -> "front"."""
    return key.replace("/", ".").rsplit(".", 1)[-1]


def reports_to_json(reports: list[SourceReport]) -> str:
    return json.dumps({"sources": [r.to_dict() for r in reports]}, indent=2)


def print_reports(reports: list[SourceReport]) -> None:
    """A rich table of the sources, then instructions and warnings per source."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="datasets (reach: anchor displacement over the horizon, mean / max, metres)")
    for col in ("source", "format", "eps", "frames", "time", "fps", "cameras", "tasks", "reach"):
        table.add_column(col, overflow="fold")
    for r in reports:
        cams = "\n".join(f"{_short(k)} {h}x{w}" for k, (h, w) in r.cameras.items())
        anchors = (
            f"{r.anchors['mean_displacement_m']:.3f} / {r.anchors['max_displacement_m']:.3f}"
            if r.anchors
            else "-"
        )
        duration = f"{r.duration_s:.1f} s" if r.duration_s < 120 else f"{r.duration_s / 3600:.2f} h"
        row: tuple[object, ...] = (
            r.name,
            r.format,
            r.episodes,
            r.frames,
            duration,
            f"{r.fps:g}",
            cams,
            len(r.tasks),
            anchors,
        )
        if r.error:
            row = (r.name, r.format, "-", "-", "-", "-", "-", "-", "error")
        table.add_row(*map(str, row))
    console.print(table)
    for r in reports:
        console.print(f"[bold]{r.name}[/bold] ({r.path})")
        if r.error:
            console.print(f"  [red]error[/red]: {r.error}", highlight=False)
            for warning in r.warnings:  # what made it unreadable
                console.print(f"  [yellow]warning[/yellow]: {warning}", highlight=False)
            continue
        for task, count in list(r.tasks.items())[:10]:
            console.print(f"  task x{count}: {task!r}")
        if len(r.tasks) > 10:
            console.print(f"  ... {len(r.tasks) - 10} more tasks")
        console.print(f"  cameras: {', '.join(f'{k} {h}x{w}' for k, (h, w) in r.cameras.items())}")
        lengths = r.episode_length
        console.print(
            f"  episode length: min {lengths['min']}, mean {lengths['mean']:.1f}, max {lengths['max']} frames"
        )
        console.print(f"  low-dim: {r.lowdim} (values checked in {r.checked_episodes} episodes)")
        if r.anchors:
            console.print(
                f"  anchors over {r.anchors['horizon_s']:g} s: displacement mean "
                f"{r.anchors['mean_displacement_m']:.4f} m, max {r.anchors['max_displacement_m']:.4f} m; "
                f"static frames {100 * r.anchors['static_frame_fraction']:.1f}%"
            )
        for warning in r.warnings:
            console.print(f"  [yellow]warning[/yellow]: {warning}", highlight=False)
