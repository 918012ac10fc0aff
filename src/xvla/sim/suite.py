"""The registry of simulated sources and their `Source` descriptions (conventions for training and serving).

Every source names its native conventions through `xvla.data.sources.Source`, so the same description turns
recorded data into canonical training targets and policy chunks back into the simulator's native commands.
Domain ids are fixed per source name so that mixtures built from any subset agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xvla.data.conventions import GripperConvention, PoseConvention
from xvla.data.sources import ArmLayout, CameraSpec, Source, VectorLayout
from xvla.sim.base import SimSource, SimSpec


@dataclass(frozen=True)
class SuiteEntry:
    """One simulated source: its spec, how to build it, and its data conventions."""

    spec: SimSpec
    factory: Callable[[int], SimSource]  # image_size -> environment
    domain_id: int
    state: VectorLayout
    action: VectorLayout
    rot6d_layout: str
    targets: str  # "state" or "action": the stream the 30 anchors follow

    def source(self, path: str, weight: float = 1.0) -> Source:
        """The `Source` of this simulated robot for the dataset at `path`."""
        flipped = set(self.spec.flipped_cameras)
        return Source(
            name=self.spec.name,
            domain_id=self.domain_id,
            path=path,
            state=self.state,
            action=self.action,
            rot6d_layout=self.rot6d_layout,
            control_hz=self.spec.fps,
            cameras=tuple(
                CameraSpec(key=camera_key(c), flip="rot180" if c in flipped else "none")
                for c in self.spec.cameras
            ),
            weight=weight,
            format="lerobot",
            horizon_s=self.spec.horizon_s,
            targets=self.targets,
            instruction=None,  # per-episode task strings
            action_space="ee6d",
        )


def camera_key(camera: str) -> str:
    """Dataset feature name of a camera."""
    return f"observation.images.{camera}"


def _arm(
    offset: int,
    rotation: str,
    rot_dim: int,
    *,
    unit: str = "m",
    mode: str = "absolute",
    gripper: GripperConvention,
) -> ArmLayout:
    pose = PoseConvention(
        position_unit=unit, rotation=rotation, mode=mode, frame="world", delta_rotation="world"
    )
    return ArmLayout(
        position=(offset, offset + 1, offset + 2),
        rotation=tuple(range(offset + 3, offset + 3 + rot_dim)),
        gripper=offset + 3 + rot_dim,
        pose=pose,
        gripper_convention=gripper,
    )


def _metaworld(size: int) -> SimSource:
    from xvla.sim.metaworld_env import MetaWorldSource

    return MetaWorldSource(size)


def _robosuite(name: str) -> Callable[[int], SimSource]:
    def make(size: int) -> SimSource:
        from xvla.sim.robosuite_env import RobosuiteSource

        return RobosuiteSource(name, size)

    return make


def _so100(size: int) -> SimSource:
    from xvla.sim.so100_env import SO100Source

    return SO100Source(size)


def _specs() -> dict[str, SimSpec]:
    # Specs are plain data; importing them does not import any simulator.
    from xvla.sim.metaworld_env import SAWYER
    from xvla.sim.robosuite_env import SETUPS
    from xvla.sim.so100_env import SO100

    return {SAWYER.name: SAWYER, **{n: s.spec for n, s in SETUPS.items()}, SO100.name: SO100}


_EFFORT = GripperConvention(open=-1.0, closed=1.0, binary=False)
_BINARY = GripperConvention(open=-1.0, closed=1.0, binary=True)
_OPENING = GripperConvention(open=1.0, closed=0.0, binary=False)


def _build() -> dict[str, SuiteEntry]:
    specs = _specs()
    rs_state = VectorLayout("observation.state", 8, (_arm(0, "quat_xyzw", 4, gripper=_BINARY),))
    rs_action = VectorLayout("action", 7, (_arm(0, "axis_angle", 3, gripper=_BINARY),))
    entries = {
        "mw_sawyer": SuiteEntry(
            specs["mw_sawyer"],
            _metaworld,
            0,
            VectorLayout("observation.state", 8, (_arm(0, "quat_wxyz", 4, gripper=_EFFORT),)),
            VectorLayout("action", 7, (_arm(0, "axis_angle", 3, unit="cm", mode="delta", gripper=_EFFORT),)),
            rot6d_layout="interleaved",
            targets="state",
        ),
        "so100_bimanual": SuiteEntry(
            specs["so100_bimanual"],
            _so100,
            4,
            VectorLayout(
                "observation.state", 16, tuple(_arm(8 * i, "quat_wxyz", 4, gripper=_OPENING) for i in (0, 1))
            ),
            VectorLayout("action", 16, tuple(_arm(8 * i, "quat_wxyz", 4, gripper=_OPENING) for i in (0, 1))),
            rot6d_layout="interleaved",
            targets="action",
        ),
    }
    robosuite = ((1, "rs_panda"), (2, "rs_ur5e"), (3, "rs_iiwa"), (5, "rs_kinova3"), (6, "rs_panda_side"))
    for domain_id, name in robosuite:
        entries[name] = SuiteEntry(
            specs[name],
            _robosuite(name),
            domain_id,
            rs_state,
            rs_action,
            rot6d_layout="contiguous",
            targets="action",
        )
    return dict(sorted(entries.items(), key=lambda kv: kv[1].domain_id))


SUITE: dict[str, SuiteEntry] = _build()
PRETRAIN = tuple(n for n, e in SUITE.items() if not e.spec.held_out)
HELD_OUT = tuple(n for n, e in SUITE.items() if e.spec.held_out)


def entry(name: str) -> SuiteEntry:
    if name not in SUITE:
        raise ValueError(f"unknown simulated source {name!r}; expected one of {list(SUITE)}")
    return SUITE[name]


def parse_selection(items: list[str] | tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """`["mw_sawyer:pick-place,push", "rs_panda", "all"]` -> source name -> task ids (all tasks by default)."""
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        name, _, tasks = item.partition(":")
        names = list(SUITE) if name == "all" else list(PRETRAIN) if name == "pretrain" else [name]
        for n in names:
            spec = entry(n).spec
            chosen = tuple(t for t in tasks.split(",") if t) if tasks else tuple(spec.tasks)
            for t in chosen:
                spec.check_task(t)
            out[n] = chosen
    if not out:
        raise ValueError("sources: expected at least one source name")
    return out
