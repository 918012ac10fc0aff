"""Data sources: the one place that knows a robot's conventions (cameras, layouts, units, rates, horizon).

A `Source` is one robot x camera setup x control interface x dataset. A `Mixture` is the list of sources a
model is trained on, stored as one JSON or YAML file (relative dataset paths resolve against that file).

Canonical layout (action space ``ee6d``, P = 20): per arm ``xyz (m) | rot6d (source's rot6d_layout) |
gripper in [0, 1], closed = 1``; left arm = 0..9, right arm = 10..19; single-arm data uses the left slot and
the right arm stays zero.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xvla.data import rotations
from xvla.data.conventions import GripperConvention, PoseConvention, chain_to_deltas

FORMATS = ("auto", "lerobot", "hdf5")
FLIPS = ("none", "horizontal", "vertical", "rot180")
TARGET_STREAMS = ("state", "action")
# How the views a model takes beyond a source's cameras are filled (`Source.missing_views`):
# "zeros": absent (image_mask False): all-zero features in the sequence, as the released checkpoints were trained
#   and as the authors' server serves a client that sends fewer images; a checkpoint built with
#   `mask_missing_views` also masks them out of attention;
# "mask": absent and masked out of attention: needs a checkpoint built with `mask_missing_views`;
# "repeat_primary": the primary camera's image fills every missing view (marked present).
MISSING_VIEWS = ("zeros", "mask", "repeat_primary")
ACTION_SPACES = {"ee6d": 20}  # name -> canonical dim (EE conventions only make sense for ee6d)
ARM_DIM = 10  # xyz + rot6d + gripper
MAX_CAMERAS = 3
MAX_ARMS = 2


class SourceError(ValueError):
    """Invalid source description; the message names the source, the field and the expectation."""


@dataclass(frozen=True)
class CameraSpec:
    """One camera of a source: the dataset key and the flip that makes its image upright."""

    key: str
    flip: str = "none"  # "none" | "horizontal" | "vertical" | "rot180"

    def apply(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] -> [H, W, 3] flipped (contiguous copy only when flipped)."""
        if self.flip == "horizontal":
            image = image[:, ::-1]
        elif self.flip == "vertical":
            image = image[::-1]
        elif self.flip == "rot180":
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)


@dataclass(frozen=True)
class ArmLayout:
    """Where one arm lives in a state/action vector (indices) and how its values are written."""

    position: tuple[int, ...]  # 3 indices
    rotation: tuple[int, ...]  # format_dim(pose.rotation) indices
    gripper: int | None = None  # index of the gripper value, None for an arm without one
    pose: PoseConvention = field(default_factory=PoseConvention)
    gripper_convention: GripperConvention = field(default_factory=GripperConvention)

    def indices(self) -> tuple[int, ...]:
        return self.position + self.rotation + (() if self.gripper is None else (self.gripper,))


@dataclass(frozen=True)
class VectorLayout:
    """A native low-dimensional stream (e.g. ``observation.state``): its key, size and 1 or 2 arms."""

    key: str
    dim: int
    arms: tuple[ArmLayout, ...]


@dataclass(frozen=True)
class Source:
    """One robot x cameras x control interface x dataset (see the module doc for the canonical layout)."""

    name: str
    domain_id: int  # soft-prompt / action-head index
    path: str  # dataset folder or file
    state: VectorLayout
    rot6d_layout: str  # "contiguous" | "interleaved": the rot6d layout of this domain's canonical vectors
    control_hz: float  # rate at which native actions are executed
    cameras: tuple[CameraSpec, ...] = ()
    action: VectorLayout | None = None
    weight: float = 1.0  # sampling weight, normalised over the mixture
    format: str = "auto"  # "auto" | "lerobot" | "hdf5"
    # keyword options for open_dataset, e.g. {"fps": 20} for HDF5 files that record no rate
    reader_options: dict[str, Any] = field(default_factory=dict, hash=False)
    horizon_s: float = 4.0  # the 30 targets cover [t, t + horizon_s] (clipped at the episode end)
    targets: str = "state"  # stream the anchors follow: "state", or "action" (row i reached at t_i + 1/fps)
    instruction: str | None = None  # fixed instruction; None = the episode's task from the dataset
    action_space: str = "ee6d"
    val_fraction: float = 0.0  # held-out episodes for validation: a fraction ...
    val_count: int = 0  # ... or a count (not both)
    missing_views: str = (
        "zeros"  # how views the model takes beyond `cameras` are filled: one of MISSING_VIEWS
    )

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SourceError(f"source {self.name!r}: " + "; ".join(problems))

    # ------------------------------------------------------------ validation

    def problems(self) -> list[str]:
        out: list[str] = []

        def bad(name: str, expected: str, got: Any) -> None:
            out.append(f"{name}: expected {expected}, got {got!r}")

        if not isinstance(self.name, str) or not self.name:
            bad("name", "a non-empty string", self.name)
        if isinstance(self.domain_id, bool) or not isinstance(self.domain_id, int) or self.domain_id < 0:
            bad("domain_id", "an integer >= 0", self.domain_id)
        if not _positive(self.weight):
            bad("weight", "a finite number > 0", self.weight)
        if self.format not in FORMATS:
            bad("format", f"one of {FORMATS}", self.format)
        if not isinstance(self.reader_options, dict) or not all(
            isinstance(k, str) for k in self.reader_options
        ):
            bad("reader_options", "a mapping of option names to values", self.reader_options)
        if not isinstance(self.path, str) or not self.path:
            bad("path", "a non-empty path", self.path)
        if not 1 <= len(self.cameras) <= MAX_CAMERAS:
            bad("cameras", f"1 to {MAX_CAMERAS} cameras (primary first)", [c.key for c in self.cameras])
        keys = [c.key for c in self.cameras]
        if len(set(keys)) != len(keys):
            bad("cameras", "distinct keys", keys)
        for i, cam in enumerate(self.cameras):
            if cam.flip not in FLIPS:
                bad(f"cameras[{i}].flip", f"one of {FLIPS}", cam.flip)
        if self.missing_views not in MISSING_VIEWS:
            bad("missing_views", f"one of {MISSING_VIEWS}", self.missing_views)
        if self.rot6d_layout not in rotations.ROT6D_LAYOUTS:
            bad("rot6d_layout", f"one of {rotations.ROT6D_LAYOUTS}", self.rot6d_layout)
        if not _positive(self.control_hz):
            bad("control_hz", "a finite number > 0", self.control_hz)
        if not _positive(self.horizon_s):
            bad("horizon_s", "a finite number > 0 (seconds)", self.horizon_s)
        if self.targets not in TARGET_STREAMS:
            bad("targets", f"one of {TARGET_STREAMS}", self.targets)
        elif self.targets == "action" and self.action is None:
            bad("targets", "'state' when the source has no action layout", self.targets)
        if self.action_space not in ACTION_SPACES:
            bad("action_space", f"one of {sorted(ACTION_SPACES)}", self.action_space)
        if self.instruction is not None and not isinstance(self.instruction, str):
            bad("instruction", "a string or null", self.instruction)
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            bad("val_fraction", "a number in [0, 1)", self.val_fraction)
        if isinstance(self.val_count, bool) or not isinstance(self.val_count, int) or self.val_count < 0:
            bad("val_count", "an integer >= 0", self.val_count)
        elif self.val_count and self.val_fraction:
            bad("val_count", "0 when val_fraction is set (give one of them)", self.val_count)
        out += _layout_problems("state", self.state, absolute_only=True)
        if self.action is not None:
            out += _layout_problems("action", self.action, absolute_only=False)
            if len(self.action.arms) != len(self.state.arms):
                bad("action.arms", f"{len(self.state.arms)} arms like state.arms", len(self.action.arms))
            else:
                for i, (sa, aa) in enumerate(zip(self.state.arms, self.action.arms, strict=True)):
                    if sa.pose.frame != aa.pose.frame:
                        bad(
                            f"action.arms[{i}].pose.frame",
                            f"the state's frame {sa.pose.frame!r}",
                            aa.pose.frame,
                        )
        return out

    def check_views(self, num_views: int, masks_missing_views: bool) -> None:
        """Refuse (SourceError) cameras that a model taking `num_views` views cannot see, or a `missing_views`
        it cannot honour (`masks_missing_views`: the model's `mask_missing_views` option)."""
        where = f"source {self.name!r}"
        if len(self.cameras) > num_views:
            raise SourceError(
                f"{where}: cameras: {len(self.cameras)} cameras, but the model takes {num_views} view(s); "
                f"keep at most {num_views} (primary first) or use a model with num_views >= {len(self.cameras)}"
            )
        if self.missing_views == "mask" and len(self.cameras) < num_views and not masks_missing_views:
            raise SourceError(
                f"{where}: missing_views: 'mask' needs a model built with mask_missing_views=true, and this one "
                "has it off (so do the released checkpoints); train one from a preset with "
                "`model.overrides: {mask_missing_views: true}`, or choose 'zeros' (the released behaviour) or "
                "'repeat_primary'"
            )

    # ------------------------------------------------------------ conversions

    @property
    def canonical_dim(self) -> int:
        return ACTION_SPACES[self.action_space]

    @property
    def num_arms(self) -> int:
        return len(self.state.arms)

    @property
    def binary_grippers(self) -> tuple[bool, ...]:
        """Per arm: whether the gripper of the target stream is binary (never interpolated)."""
        layout = self.action if self.targets == "action" else self.state
        assert layout is not None
        return tuple(arm.gripper is not None and arm.gripper_convention.binary for arm in layout.arms)

    def state_to_canonical(self, state: np.ndarray) -> np.ndarray:
        """Native states [N, S] (or [S]) -> canonical [N, P] (or [P]) float64."""
        x, squeeze = self._rows(state, self.state, "state")
        arms = [self._decode_arm(arm, x) for arm in self.state.arms]
        out = self._assemble(arms)
        return out[0] if squeeze else out

    def actions_to_canonical(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Native action rows [N, A] with the states they were issued from [N, S] -> absolute canonical
        poses [N, P] (a delta row is applied to its own state row)."""
        layout = self._action_layout()
        a, squeeze = self._rows(actions, layout, "action")
        s, _ = self._rows(state, self.state, "state")
        if len(a) != len(s):
            raise SourceError(
                f"source {self.name!r}: actions and states differ in length: {len(a)} vs {len(s)}"
            )
        arms = []
        for arm, state_arm in zip(layout.arms, self.state.arms, strict=True):
            pos, rot, grip = self._decode_arm(arm, a)
            ref_pos, ref_rot, ref_grip = self._decode_arm(state_arm, s)
            if arm.pose.mode == "delta":
                pos, rot = arm.pose.compose(ref_pos, ref_rot, pos, rot)
            arms.append((pos, rot, grip if arm.gripper is not None else ref_grip))
        out = self._assemble(arms)
        return out[0] if squeeze else out

    def canonical_to_native(self, chunk: np.ndarray, reference_state: np.ndarray) -> np.ndarray:
        """Canonical chunk [T, P] (absolute poses reached one after another) and the native state it starts
        from [S] -> native actions [T, A]. Delta conventions give step-to-step deltas starting at the
        reference state; action entries that no arm covers are 0."""
        layout = self._action_layout()
        c = np.asarray(chunk, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != self.canonical_dim:
            raise SourceError(
                f"source {self.name!r}: canonical chunk: expected [T, {self.canonical_dim}], got {c.shape}"
            )
        ref, _ = self._rows(reference_state, self.state, "reference_state")
        out = np.zeros((len(c), layout.dim))
        rot6d = rotations.rot6d_format(self.rot6d_layout)
        for i, (arm, state_arm) in enumerate(zip(layout.arms, self.state.arms, strict=True)):
            block = c[:, i * ARM_DIM : (i + 1) * ARM_DIM]
            pos, rot = block[:, :3], rotations.to_matrix(block[:, 3:9], rot6d)
            if arm.pose.mode == "delta":
                ref_pos, ref_rot, _ = self._decode_arm(state_arm, ref)
                pos, rot = chain_to_deltas(arm.pose, ref_pos[0], ref_rot[0], pos, rot)
            native_pos, native_rot = arm.pose.encode(pos, rot)
            out[:, list(arm.position)] = native_pos
            out[:, list(arm.rotation)] = native_rot
            if arm.gripper is not None:
                out[:, arm.gripper] = arm.gripper_convention.to_native(block[:, 9])
        return out

    def _action_layout(self) -> VectorLayout:
        if self.action is None:
            raise SourceError(f"source {self.name!r}: action: this source describes no action stream")
        return self.action

    def _rows(self, x: np.ndarray, layout: VectorLayout, what: str) -> tuple[np.ndarray, bool]:
        x = np.asarray(x, dtype=np.float64)
        squeeze = x.ndim == 1
        x = x[None] if squeeze else x
        if x.ndim != 2 or x.shape[1] != layout.dim:
            raise SourceError(
                f"source {self.name!r}: {what} ({layout.key!r}): expected [N, {layout.dim}], got {x.shape}"
            )
        return x, squeeze

    @staticmethod
    def _decode_arm(arm: ArmLayout, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos, rot = arm.pose.decode(x[:, list(arm.position)], x[:, list(arm.rotation)])
        grip = (
            np.zeros(len(x))
            if arm.gripper is None
            else arm.gripper_convention.to_canonical(x[:, arm.gripper])
        )
        return pos, rot, grip

    def _assemble(self, arms: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        n = len(arms[0][0])
        out = np.zeros((n, self.canonical_dim))
        rot6d = rotations.rot6d_format(self.rot6d_layout)
        for i, (pos, rot, grip) in enumerate(arms):
            base = i * ARM_DIM
            out[:, base : base + 3] = pos
            out[:, base + 3 : base + 9] = rotations.from_matrix(rot, rot6d)
            out[:, base + 9] = grip
        return out

    def with_close_at(self, close_at: float) -> Source:
        """This source with every binary gripper of its action stream closing from `close_at`
        (`GripperConvention.close_at`): a serving setting, the data are read as before."""
        if self.action is None:
            return self
        arms = tuple(
            dataclasses.replace(
                arm, gripper_convention=dataclasses.replace(arm.gripper_convention, close_at=close_at)
            )
            if arm.gripper_convention.binary
            else arm
            for arm in self.action.arms
        )
        return dataclasses.replace(self, action=dataclasses.replace(self.action, arms=arms))

    # ------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Source:
        name = data.get("name", "?") if isinstance(data, dict) else "?"
        return _from_plain(cls, data, f"source {name!r}")


@dataclass(frozen=True)
class Mixture:
    """The sources a model is trained on. Names are unique; sources may share a domain id: one prompt and one set
    of action heads for all of them (the shared-head ablation of `xvla experiments pretraining`)."""

    sources: tuple[Source, ...]

    def __post_init__(self) -> None:
        if not self.sources:
            raise SourceError("mixture: sources: expected at least one source")
        seen: set[str] = set()
        for s in self.sources:
            if s.name in seen:
                raise SourceError(f"mixture: source {s.name!r}: name: expected a unique value")
            seen.add(s.name)

    def shared_domains(self) -> set[int]:
        """Domain ids used by more than one source (their training losses cannot be told apart by domain)."""
        ids = [s.domain_id for s in self.sources]
        return {d for d in ids if ids.count(d) > 1}

    def __getitem__(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"mixture has no source {name!r}; it has {[s.name for s in self.sources]}")

    @property
    def weights(self) -> np.ndarray:
        """Normalised sampling weights [num_sources]."""
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        return w / w.sum()

    def to_dict(self) -> dict[str, Any]:
        return {"sources": [s.to_dict() for s in self.sources]}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | list[Any], base_dir: str | Path | None = None) -> Mixture:
        """Build from ``{"sources": [...]}`` (or a bare list); relative paths resolve against ``base_dir``."""
        items = data.get("sources") if isinstance(data, dict) else data
        if isinstance(data, dict) and set(data) - {"sources"}:
            raise SourceError(
                f"mixture: unknown fields {sorted(set(data) - {'sources'})}; expected only 'sources'"
            )
        if not isinstance(items, list):
            raise SourceError(
                f"mixture: sources: expected a list of source mappings, got {type(items).__name__}"
            )
        sources = []
        for item in items:
            if base_dir is not None and isinstance(item, dict) and isinstance(item.get("path"), str):
                path = Path(item["path"]).expanduser()
                item = {
                    **item,
                    "path": str(path if path.is_absolute() else (Path(base_dir) / path).resolve()),
                }
            sources.append(Source.from_dict(item))
        return cls(tuple(sources))

    @classmethod
    def load(cls, path: str | Path) -> Mixture:
        """Read a ``.json`` or ``.yaml``/``.yml`` mixture file."""
        path = Path(path)
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:
            raise SourceError(f"mixture file {path}: cannot parse: {err}") from err
        try:
            return cls.from_dict(data, base_dir=path.parent.resolve())
        except SourceError as err:
            raise SourceError(f"mixture file {path}: {err}") from err

    def save(self, path: str | Path) -> None:
        """Write JSON, or YAML for a ``.yaml``/``.yml`` suffix (paths are written as stored)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------- helpers


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _layout_problems(name: str, layout: VectorLayout, *, absolute_only: bool) -> list[str]:
    out = []
    if not isinstance(layout.dim, int) or layout.dim <= 0:
        return [f"{name}.dim: expected an integer > 0, got {layout.dim!r}"]
    if not 1 <= len(layout.arms) <= MAX_ARMS:
        return [f"{name}.arms: expected 1 or {MAX_ARMS} arms (left first), got {len(layout.arms)}"]
    used: dict[int, str] = {}
    for i, arm in enumerate(layout.arms):
        where = f"{name}.arms[{i}]"
        out += [f"{where}.pose.{p}" for p in arm.pose.problems()]
        out += [f"{where}.gripper_convention.{p}" for p in arm.gripper_convention.problems()]
        if arm.pose.problems():
            continue
        if len(arm.position) != 3:
            out.append(f"{where}.position: expected 3 indices (x, y, z), got {list(arm.position)}")
        if len(arm.rotation) != arm.pose.rotation_dim:
            out.append(
                f"{where}.rotation: expected {arm.pose.rotation_dim} indices for {arm.pose.rotation!r}, "
                f"got {list(arm.rotation)}"
            )
        if absolute_only and arm.pose.mode != "absolute":
            out.append(f"{where}.pose.mode: expected 'absolute' for a state stream, got {arm.pose.mode!r}")
        for idx in arm.indices():
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < layout.dim:
                out.append(f"{where}: index {idx!r} out of range for {name}.dim = {layout.dim}")
            elif idx in used:
                out.append(f"{where}: index {idx} is also used by {used[idx]}")
            else:
                used[idx] = where
    return out


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _indices(value: Any, where: str) -> tuple[int, ...]:
    """A list of ints, or a ``"start:stop"`` slice string."""
    if isinstance(value, str):
        try:
            start, stop = (int(v) for v in value.split(":"))
        except ValueError as err:
            raise SourceError(f"{where}: expected a list of indices or 'start:stop', got {value!r}") from err
        return tuple(range(start, stop))
    if not isinstance(value, (list, tuple)):
        raise SourceError(f"{where}: expected a list of indices or 'start:stop', got {value!r}")
    return tuple(value)


def _from_plain(cls: type, data: Any, where: str) -> Any:
    """Build a (nested) frozen dataclass from plain JSON/YAML data, naming the field on every error."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise SourceError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SourceError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    missing = [
        n
        for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SourceError(f"{where}: missing required field(s) {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _field_value(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise SourceError(f"{where}: {err}") from err


def _field_value(hint: Any, value: Any, where: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _from_plain(hint, value, where)
    if typing.get_origin(hint) is tuple:
        item = args[0]
        if item is int:
            return _indices(value, where)
        if not isinstance(value, (list, tuple)):
            raise SourceError(f"{where}: expected a list, got {value!r}")
        return tuple(_field_value(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    return value
