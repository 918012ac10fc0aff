"""Source / Mixture: validation messages, JSON/YAML round trips, native <-> canonical conversions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import fixture_dir
from xvla.data import rotations
from xvla.data.sources import Mixture, Source, SourceError

EXAMPLE = Path(__file__).with_name("lerobot_v3_small.mixture.yaml")


def _arm(offset: int, rotation: str, **pose: Any) -> dict[str, Any]:
    dim = rotations.format_dim(rotation)
    return {
        "position": [offset, offset + 1, offset + 2],
        "rotation": f"{offset + 3}:{offset + 3 + dim}",
        "gripper": offset + 3 + dim,
        "pose": {"rotation": rotation, **pose},
    }


def bimanual(**changes: Any) -> dict[str, Any]:
    """Two arms: state in mm + extrinsic Euler, actions as tool-frame deltas with binary grippers (0 = closed)."""
    grip = {"open": 1.0, "closed": 0.0, "binary": True}
    data = {
        "name": "dual",
        "domain_id": 7,
        "path": "/data/dual",
        "cameras": [
            {"key": "top"},
            {"key": "left_wrist", "flip": "rot180"},
            {"key": "right_wrist", "flip": "vertical"},
        ],
        "state": {
            "key": "state",
            "dim": 15,
            "arms": [
                _arm(0, "euler_xyz", position_unit="mm"),
                {**_arm(7, "euler_xyz", position_unit="mm"), "gripper": 14},
            ],
        },
        "action": {
            "key": "action",
            "dim": 16,
            "arms": [
                {**_arm(0, "axis_angle", mode="delta", delta_rotation="local"), "gripper_convention": grip},
                {**_arm(8, "quat_wxyz", mode="delta"), "gripper": 15, "gripper_convention": grip},
            ],
        },
        "rot6d_layout": "interleaved",
        "control_hz": 15.0,
        "horizon_s": 2.0,
        "weight": 0.3,
        "format": "hdf5",
        "reader_options": {"fps": 15.0},
    }
    data.update(changes)
    return data


def example_source(fixtures: Path | None = None) -> Source:
    data = yaml.safe_load(EXAMPLE.read_text())
    return Mixture.from_dict(data, base_dir=fixtures or "/fixtures").sources[0]


def test_example_yaml_describes_the_fixture() -> None:
    source = example_source()
    assert source.path == "/fixtures/lerobot_v3_small"
    assert source.state.arms[0].rotation == (3, 4, 5, 6)
    assert [c.flip for c in source.cameras] == ["none", "horizontal"]
    assert source.canonical_dim == 20 and source.num_arms == 1


def test_fixture_state_and_actions_to_canonical() -> None:
    expected = json.loads((fixture_dir("lerobot_v3_small") / "expected.json").read_text())
    source = example_source()
    rows = {(s["episode_index"], s["frame_index"]): s for s in expected["samples"]}
    state = np.array([rows[0, 0]["observation.state"], rows[0, 1]["observation.state"]])
    action = np.array([rows[0, 0]["action"], rows[0, 1]["action"]])
    canon = source.state_to_canonical(state)
    assert canon.shape == (2, 20)
    np.testing.assert_allclose(canon[:, :3], state[:, :3])
    rot = rotations.quat_to_matrix(state[:, 3:7])
    np.testing.assert_allclose(canon[:, 3:9], np.concatenate([rot[:, :, 0], rot[:, :, 1]], 1), atol=1e-12)
    np.testing.assert_allclose(canon[:, 9], state[:, 7])
    np.testing.assert_array_equal(canon[:, 10:], 0.0)  # single arm: the right slot stays zero
    # action row 0 is the pose of frame 1
    np.testing.assert_allclose(source.actions_to_canonical(action, state)[0], canon[1], atol=1e-6)
    native = source.canonical_to_native(canon[1:], state[0])
    np.testing.assert_allclose(native[0], action[0], atol=1e-6)


def test_json_and_yaml_round_trip(tmp_path: Path) -> None:
    mixture = Mixture((Source.from_dict(bimanual()), example_source()))
    for name in ("mix.json", "mix.yaml"):
        mixture.save(tmp_path / name)
        assert Mixture.load(tmp_path / name) == mixture
    assert Source.from_dict(json.loads(json.dumps(mixture.sources[0].to_dict()))) == mixture.sources[0]
    assert len({*mixture.sources, *Mixture.load(tmp_path / "mix.json").sources}) == 2  # hashable, by value


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mix.yaml").write_text(yaml.safe_dump({"sources": [bimanual(path="../data/dual")]}))
    assert Mixture.load(tmp_path / "cfg" / "mix.yaml").sources[0].path == str(
        (tmp_path / "data" / "dual").resolve()
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight": 0}, r"weight: expected a finite number > 0, got 0"),
        ({"horizon_s": -1.0}, r"horizon_s: expected a finite number > 0"),
        ({"format": "zarr"}, r"format: expected one of"),
        ({"rot6d_layout": "rows"}, r"rot6d_layout: expected one of \('contiguous', 'interleaved'\)"),
        ({"cameras": [{"key": k} for k in "abcd"]}, r"cameras: expected 1 to 3 cameras"),
        ({"cameras": [{"key": "a", "flip": "mirror"}]}, r"cameras\[0\]\.flip: expected one of"),
        ({"control_hz": 0}, r"control_hz: expected"),
        ({"reader_options": ["fps", 15]}, r"reader_options: expected a mapping"),
        ({"val_fraction": 0.1, "val_count": 2}, r"val_count: expected 0 when val_fraction is set"),
        ({"targets": "joints"}, r"targets: expected one of"),
        ({"action_space": "joint"}, r"action_space: expected one of \['ee6d'\]"),
        ({"missing_views": "black"}, r"missing_views: expected one of \('zeros', 'mask', 'repeat_primary'\)"),
    ],
)
def test_invalid_fields_are_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SourceError, match=r"source 'dual': .*" + message):
        Source.from_dict(bimanual(**changes))


def test_invalid_layouts_are_named() -> None:
    data = bimanual()
    data["state"]["arms"][0]["pose"]["rotation"] = "quaternion"
    with pytest.raises(
        SourceError, match=r"state\.arms\[0\]\.pose\.rotation: unknown rotation format 'quaternion'"
    ):
        Source.from_dict(data)
    data = bimanual()
    data["state"]["dim"] = 12
    with pytest.raises(SourceError, match=r"state\.arms\[1\]: index 12 out of range for state\.dim = 12"):
        Source.from_dict(data)
    data = bimanual()
    data["action"]["arms"][1]["position"] = [0, 1, 2]
    with pytest.raises(SourceError, match=r"action\.arms\[1\]: index 0 is also used by action\.arms\[0\]"):
        Source.from_dict(data)
    data = bimanual()
    data["state"]["arms"][0]["pose"]["mode"] = "delta"
    with pytest.raises(SourceError, match=r"state\.arms\[0\]\.pose\.mode: expected 'absolute'"):
        Source.from_dict(data)
    data = bimanual()
    data["action"]["arms"][0]["rotation"] = [3, 4]
    with pytest.raises(
        SourceError, match=r"action\.arms\[0\]\.rotation: expected 3 indices for 'axis_angle'"
    ):
        Source.from_dict(data)
    with pytest.raises(SourceError, match=r"unknown field\(s\) \['horizon'\]"):
        Source.from_dict(bimanual(horizon=4.0))
    with pytest.raises(SourceError, match=r"missing required field\(s\) \['rot6d_layout'\]"):
        Source.from_dict({k: v for k, v in bimanual().items() if k != "rot6d_layout"})


def test_mixture_rejects_duplicate_names_and_empty() -> None:
    a = Source.from_dict(bimanual())
    with pytest.raises(SourceError, match=r"source 'dual': name: expected a unique value"):
        Mixture((a, dataclasses.replace(a, domain_id=8)))
    shared = Mixture((a, dataclasses.replace(a, name="other"), dataclasses.replace(a, name="c", domain_id=1)))
    assert shared.shared_domains() == {7}  # two sources on one prompt and head set: allowed, and said
    with pytest.raises(SourceError, match="at least one source"):
        Mixture(())
    mixture = Mixture((a, dataclasses.replace(a, name="b", domain_id=1, weight=0.9)))
    np.testing.assert_allclose(mixture.weights, [0.25, 0.75])
    assert mixture["b"].domain_id == 1


def _random_bimanual_states(source: Source, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    state = np.zeros((n, source.state.dim))
    for arm in source.state.arms:
        state[:, list(arm.position)] = rng.uniform(-500, 500, size=(n, 3))
        rot = rotations.to_matrix(rng.normal(size=(n, 3)), "axis_angle")
        state[:, list(arm.rotation)] = rotations.from_matrix(rot, arm.pose.rotation)
        state[:, arm.gripper] = rng.uniform(0, 1, size=n)
    return state


def test_bimanual_delta_actions_round_trip() -> None:
    source = Source.from_dict(bimanual())
    states = _random_bimanual_states(source, 9, 0)
    canon = source.state_to_canonical(states)
    np.testing.assert_allclose(canon[:, [0, 1, 2, 10, 11, 12]], states[:, [0, 1, 2, 7, 8, 9]] / 1000.0)
    # the interleaved layout is the row-major first two columns
    rot = rotations.to_matrix(states[:, 3:6], "euler_xyz")
    np.testing.assert_allclose(canon[:, 3:9], rot[:, :, :2].reshape(-1, 6), atol=1e-12)
    # a chunk of absolute targets -> step-to-step deltas from the reference state -> the same targets
    chunk = canon[1:]
    chunk[:, [9, 19]] = [[1.0, 0.0]] * len(chunk)
    native = source.canonical_to_native(chunk, states[0])
    assert native.shape == (8, 16)
    np.testing.assert_array_equal(native[:, [6, 15]], [[0.0, 1.0]] * 8)  # closed = 0, open = 1 natively
    np.testing.assert_allclose(np.linalg.norm(native[:, 11:15], axis=1), 1.0)  # wxyz quaternion
    # re-applying delta k to target k-1 (the state it was issued from) gives target k back
    issued_from = np.concatenate([states[:1], states[1:-1]], 0)
    back = source.actions_to_canonical(native, issued_from)
    np.testing.assert_allclose(back[:, [0, 1, 2, 10, 11, 12]], chunk[:, [0, 1, 2, 10, 11, 12]], atol=1e-9)
    np.testing.assert_allclose(back[:, 3:9], chunk[:, 3:9], atol=1e-9)
    np.testing.assert_allclose(back[:, 13:19], chunk[:, 13:19], atol=1e-9)
    np.testing.assert_array_equal(back[:, [9, 19]], chunk[:, [9, 19]])


def test_absolute_actions_round_trip_with_units() -> None:
    data = bimanual()
    data["action"] = {
        "key": "action",
        "dim": 15,
        "arms": [
            _arm(0, "euler_zyx_intrinsic", position_unit="cm"),
            {**_arm(7, "rot6d_contiguous", position_unit="cm"), "gripper": None},
        ],
    }
    data["action"]["arms"][1]["rotation"] = "10:16"
    data["action"]["dim"] = 16
    source = Source.from_dict(data)
    states = _random_bimanual_states(source, 5, 1)
    canon = source.state_to_canonical(states)
    native = source.canonical_to_native(canon, states[0])
    np.testing.assert_allclose(native[:, :3], states[:, :3] / 10.0)  # mm -> cm
    back = source.actions_to_canonical(native, states)
    np.testing.assert_allclose(back, canon, atol=1e-9)  # the right arm's missing gripper comes from the state


def test_shape_errors_name_source_and_stream() -> None:
    source = Source.from_dict(bimanual())
    with pytest.raises(
        SourceError, match=r"source 'dual': state \('state'\): expected \[N, 15\], got \(4, 14\)"
    ):
        source.state_to_canonical(np.zeros((4, 14)))
    with pytest.raises(SourceError, match=r"canonical chunk: expected \[T, 20\]"):
        source.canonical_to_native(np.zeros((30, 10)), np.zeros(15))
    no_action = Source.from_dict({k: v for k, v in bimanual().items() if k != "action"})
    with pytest.raises(SourceError, match="describes no action stream"):
        no_action.canonical_to_native(np.zeros((30, 20)), np.zeros(15))


def test_missing_views_round_trips_and_defaults_to_the_old_behaviour(tmp_path: Path) -> None:
    """The choice is written with the source (sources.json, mixture files); a description written before the
    field existed reads as "zeros", what every source did then."""
    assert Source.from_dict(bimanual()).missing_views == "zeros"
    for choice in ("zeros", "mask", "repeat_primary"):
        source = Source.from_dict(bimanual(missing_views=choice))
        assert source.to_dict()["missing_views"] == choice
        Mixture((source,)).save(tmp_path / "sources.json")
        assert Mixture.load(tmp_path / "sources.json").sources[0].missing_views == choice


def _cameras(n: int, **changes: Any) -> Source:
    return Source.from_dict(bimanual(cameras=[{"key": f"cam{i}"} for i in range(n)], **changes))


def test_check_views_against_a_model() -> None:
    _cameras(3).check_views(3, masks_missing_views=False)
    _cameras(2).check_views(3, masks_missing_views=False)  # "zeros", the default
    _cameras(2, missing_views="repeat_primary").check_views(3, masks_missing_views=False)
    _cameras(2, missing_views="mask").check_views(3, masks_missing_views=True)
    _cameras(3, missing_views="mask").check_views(3, masks_missing_views=False)  # no view is missing
    with pytest.raises(
        SourceError, match=r"source 'dual': cameras: 3 cameras, but the model takes 2 view\(s\)"
    ):
        _cameras(3).check_views(2, masks_missing_views=True)
    with pytest.raises(
        SourceError,
        match=r"source 'dual': missing_views: 'mask' needs a model built with mask_missing_views=true.*"
        r"model.overrides: \{mask_missing_views: true\}",
    ):
        _cameras(1, missing_views="mask").check_views(2, masks_missing_views=False)


def test_with_close_at_changes_only_the_binary_grippers_of_the_action_stream() -> None:
    from xvla.sim.suite import entry

    robosuite = entry("rs_panda").source("data/rs_panda")
    eager = robosuite.with_close_at(0.2)
    assert [a.gripper_convention.close_at for a in eager.action.arms] == [0.2]  # type: ignore[union-attr]
    assert eager.state == robosuite.state  # reading data is unchanged
    assert Source.from_dict(eager.to_dict()) == eager  # saved with the source
    chunk = np.zeros((1, robosuite.canonical_dim))
    chunk[0, 3:9] = [1, 0, 0, 0, 1, 0]  # identity rotation
    chunk[0, 9] = 0.3
    state = np.zeros(8)
    state[6] = 1.0  # identity quaternion (x, y, z, w)
    assert robosuite.canonical_to_native(chunk, state)[0, 6] == -1.0  # open below 0.5
    assert eager.canonical_to_native(chunk, state)[0, 6] == 1.0  # closed from 0.2
    continuous = entry("so100_bimanual").source("data/so100")
    assert continuous.with_close_at(0.2) == continuous  # no binary gripper
    with pytest.raises(SourceError, match="close_at"):
        robosuite.with_close_at(1.5)
