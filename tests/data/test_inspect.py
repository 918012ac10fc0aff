"""`xvla data inspect`: summaries of datasets and mixtures, and warnings for bad values."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import fixture_dir
from xvla.data import cli, rotations
from xvla.data.inspect import inspect_path
from xvla.data.lerobot_writer import LeRobotV3Writer


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_for_a_dataset_folder(capsys) -> None:
    root = fixture_dir("lerobot_v3_small")
    code, out, _ = run(["data", "inspect", str(root), "--json"], capsys)
    assert code == 0
    (report,) = json.loads(out)["sources"]
    assert report["name"] == "lerobot_v3_small" and report["format"] == "lerobot v3.0"
    assert (report["episodes"], report["frames"], report["fps"]) == (6, 187, 10.0)
    assert report["duration_s"] == pytest.approx(18.7)
    assert report["cameras"] == {"observation.images.front": [64, 64], "observation.images.wrist": [64, 64]}
    assert report["tasks"] == {
        "pick up the red cube and place it in the bowl": 3,
        "open the top drawer": 2,
        "push the blue block to the left": 1,
    }
    assert report["lowdim"] == {"observation.state": 8, "action": 7}
    assert report["episode_length"] == {"min": 20, "mean": pytest.approx(187 / 6), "max": 45}
    assert report["anchors"] is None and report["warnings"] == []  # clean data, no source description


def test_table_for_a_v21_dataset(capsys) -> None:
    code, out, _ = run(["data", "inspect", str(fixture_dir("lerobot_v21_small"))], capsys)
    assert code == 0
    assert "v2.1" in out and "front" in out and "187" in out and "open the top drawer" in out


def _write_bad_dataset(root: Path) -> None:
    """Quaternion state with a NaN, a non-unit quaternion, a gripper past its range and a constant z."""
    features = {
        "observation.images.front": {"dtype": "video", "shape": [32, 32, 3], "names": None},
        "observation.state": {
            "dtype": "float32",
            "shape": [8],
            "names": ["x", "y", "z", "qx", "qy", "qz", "qw", "g"],
        },
        "action": {"dtype": "float32", "shape": [7], "names": None},
    }
    writer = LeRobotV3Writer(root, 10, features)
    for ep in range(3):
        n = 30
        t = np.arange(n) / 10
        state = np.zeros((n, 8))
        state[:, 0] = 0.05 * t * (ep + 1)  # moves 5 cm/s along x (x2, x3 in later episodes)
        state[:, 2] = 0.3
        state[:, 3:7] = rotations.convert(np.outer(t, [0.0, 0.0, 0.2]), "axis_angle", "quat_xyzw")
        state[:, 7] = (t > 1.5).astype(float)
        if ep == 1:
            state[4, 1] = np.nan
            state[6, 3:7] *= 1.2
            state[7, 7] = 1.5
        action = np.concatenate([state[:, :3], np.zeros((n, 3)), state[:, 7:]], 1)
        for f in range(n):
            img = np.full((32, 32, 3), 10 * f, np.uint8)
            writer.add_frame(
                {"observation.images.front": img, "observation.state": state[f], "action": action[f]}, "go"
            )
        writer.save_episode()
    writer.finalize()


def _source(name: str, domain_id: int, path: str, state: dict) -> dict:
    return {
        "name": name,
        "domain_id": domain_id,
        "path": path,
        "cameras": [{"key": "observation.images.front"}],
        "state": state,
        "rot6d_layout": "contiguous",
        "control_hz": 10,
        "horizon_s": 1.0,
    }


def test_mixture_warnings_and_anchors(tmp_path: Path, capsys) -> None:
    _write_bad_dataset(tmp_path / "quat")
    # a second source whose state holds a rotation matrix, one of them off SO(3)
    features = {
        "observation.images.front": {"dtype": "video", "shape": [32, 32, 3], "names": None},
        "observation.state": {"dtype": "float64", "shape": [13], "names": None},
    }
    writer = LeRobotV3Writer(tmp_path / "matrix", 10, features)
    for f in range(20):
        state = np.concatenate([[0.01 * f, 0, 0], np.eye(3).reshape(-1) * (1.1 if f == 3 else 1.0), [0.5]])
        writer.add_frame(
            {"observation.images.front": np.zeros((32, 32, 3), np.uint8), "observation.state": state}, ""
        )
    writer.save_episode()
    writer.finalize()
    quat_arm = {
        "position": "0:3",
        "rotation": "3:7",
        "gripper": 7,
        "gripper_convention": {"open": 0, "closed": 1},
    }
    matrix_arm = {"position": "0:3", "rotation": "3:12", "gripper": 12, "pose": {"rotation": "matrix"}}
    mixture = {
        "sources": [
            _source("quat", 0, "quat", {"key": "observation.state", "dim": 8, "arms": [quat_arm]}),
            _source("matrix", 1, "matrix", {"key": "observation.state", "dim": 13, "arms": [matrix_arm]}),
        ]
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))

    quat, matrix = inspect_path(tmp_path / "mix.yaml")
    assert (quat.name, quat.episodes, quat.frames, quat.cameras) == (
        "quat",
        3,
        90,
        {"observation.images.front": [32, 32]},
    )
    text = "\n".join(quat.warnings)
    assert "observation.state: 1 frames with NaN/inf in episode 1 (first at frame 4)" in text
    assert "observation.state: constant dimensions ['y', 'z', 'qx', 'qy'] (value [0.0, 0.3" in text
    assert "observation.state arm 0 rotation: 1 non-unit quaternions (worst |norm - 1| = 0.2)" in text
    assert (
        "observation.state arm 0 gripper: 1 values outside the declared range [0, 1] (seen [0, 1.5])" in text
    )
    assert "action: constant dimensions ['1', '2', '3', '4', '5']" in text
    # anchors: the arm moves 5, 10 or 15 cm/s; a 1 s horizon reaches at most 15 cm
    assert 0.04 < quat.anchors["mean_displacement_m"] < quat.anchors["max_displacement_m"] <= 0.15 + 1e-6
    assert any("anchors: episode 1 skipped" in w and "non-finite" in w for w in quat.warnings)
    assert any("observation.state arm 0 rotation: 1 matrices off SO(3)" in w for w in matrix.warnings)

    code, out, _ = run(["data", "inspect", str(tmp_path / "mix.yaml"), "--json"], capsys)
    assert code == 0 and [s["name"] for s in json.loads(out)["sources"]] == ["quat", "matrix"]


def test_hdf5_folder_and_errors(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "episodes"
    folder.mkdir()
    for ep in range(2):
        with h5py.File(folder / f"ep{ep}.hdf5", "w") as f:
            f.create_dataset("cam", data=np.zeros((5, 8, 10, 3), np.uint8))
            f.create_dataset("qpos", data=np.random.default_rng(ep).normal(size=(5, 3)))
    code, _, err = run(["data", "inspect", str(folder)], capsys)
    assert code == 2 and "no frame rate recorded" in err and "pass fps=" in err
    code, out, _ = run(["data", "inspect", str(folder), "--fps", "25", "--json"], capsys)
    (report,) = json.loads(out)["sources"]
    assert (
        report["format"] == "hdf5 generic" and report["fps"] == 25 and report["cameras"] == {"cam": [8, 10]}
    )
    assert report["tasks"] == {"": 2} and report["frames"] == 10
    code, _, err = run(["data", "inspect", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err


def test_mixture_with_a_broken_source(tmp_path: Path, capsys) -> None:
    arm = {"position": "0:3", "rotation": "3:7", "gripper": 7}
    state = {"key": "observation.state", "dim": 8, "arms": [arm]}
    ok = _source("ok", 0, str(fixture_dir("lerobot_v3_small")), state)
    ok["cameras"] = [{"key": "observation.images.top"}]
    mixture = {"sources": [ok, _source("gone", 1, "missing_dataset", state)]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    code, out, _ = run(["data", "inspect", str(tmp_path / "mix.yaml"), "--json"], capsys)
    assert code == 1
    ok_report, gone = json.loads(out)["sources"]
    assert ok_report["error"] is None and ok_report["episodes"] == 6 and ok_report["anchors"] is None
    assert any(
        "cameras[0] key 'observation.images.top' is not in the dataset" in w for w in ok_report["warnings"]
    )
    assert gone["episodes"] == 0 and "does not exist" in gone["error"] and "missing_dataset" in gone["error"]


def test_a_zero_fps_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    """Issue 14 D14: a named error, not a ZeroDivisionError traceback."""
    root = tmp_path / "ds"
    shutil.copytree(fixture_dir("lerobot_v3_small"), root)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "fps": 0}))
    code, _, err = run(["data", "inspect", str(root)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("xvla data inspect: error: fps: expected a frame rate > 0, got 0")
    assert str(root / "meta/info.json") in err


def test_timestamps_that_disagree_with_fps_are_a_warning(tmp_path: Path, capsys) -> None:
    """Issue 14 D11: inspect names the first mistimed episode, counts the others, and exits 0."""
    root = tmp_path / "ds"
    shutil.copytree(fixture_dir("lerobot_v3_small"), root)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "fps": 30}))
    code, out, _ = run(["data", "inspect", str(root), "--json"], capsys)
    assert code == 0
    (warning,) = json.loads(out)["sources"][0]["warnings"]
    assert warning.startswith("episode 0: timestamps disagree with fps 30: frame ")
    assert "the timestamps run at 10 frames/s" in warning
    assert warning.endswith("(and 5 more of 6 checked episodes); training refuses these episodes")


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(fixture_dir("lerobot_v3_small"), root)
    return root


def test_nothing_readable_exits_1(tmp_path: Path, capsys) -> None:
    """Every episode unreadable used to exit 0 with warnings only (issue 14 D15)."""
    root = _copy(tmp_path)
    data = root / "data/chunk-000/file-000.parquet"
    data.write_bytes(data.read_bytes()[:300])
    code, out, _ = run(["data", "inspect", str(root), "--json"], capsys)
    assert code == 1
    (report,) = json.loads(out)["sources"]
    assert report["error"] == "none of the 6 checked episodes is fully readable (see the warnings)"
    assert report["warnings"][0].startswith("episode 0 unreadable: corrupt parquet")
    code, out, _ = run(["data", "inspect", str(root)], capsys)
    assert code == 1 and "none of the 6 checked episodes" in out and "corrupt parquet" in out


def test_truncated_video_is_a_warning(tmp_path: Path, capsys) -> None:
    """A truncated mp4 still decodes its first frames: inspect checks each checked episode's last frame too."""
    root = _copy(tmp_path)
    video = root / "videos/observation.images.front/chunk-000/file-000.mp4"
    video.write_bytes(video.read_bytes()[: int(video.stat().st_size * 0.6)])
    code, out, _ = run(["data", "inspect", str(root), "--json"], capsys)
    assert code == 0  # episodes 0-2 still decode
    (warning,) = json.loads(out)["sources"][0]["warnings"]
    assert warning.startswith("observation.images.front: undecodable frames in episode 3: no decoded frame")
    assert warning.endswith("(and 2 more of 6 checked episodes); training stops at them")
    video.write_bytes(b"\x00" * 64)  # no episode decodes: nothing is usable for training
    code, out, _ = run(["data", "inspect", str(root), "--json"], capsys)
    assert code == 1 and "corrupt video" in json.loads(out)["sources"][0]["warnings"][0]


def test_declared_shapes_that_disagree_with_the_data_are_a_warning(tmp_path: Path, capsys) -> None:
    root = _copy(tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.state"]["shape"] = [9]
    info["features"]["observation.images.wrist"]["shape"] = [48, 64, 3]
    (root / "meta/info.json").write_text(json.dumps(info))
    code, out, _ = run(["data", "inspect", str(root), "--json"], capsys)
    assert code == 0
    assert sorted(json.loads(out)["sources"][0]["warnings"]) == [
        "observation.images.wrist: meta/info.json declares 48x64 frames, they decode to 64x64",
        "observation.state: meta/info.json declares shape [9], the data has 8 values per frame",
    ]


def test_absurd_magnitudes_are_a_warning_naming_file_episode_and_column(tmp_path: Path, capsys) -> None:
    """Issue 14 D3: actions of 1e30 trained to NaN losses; inspect names such values before training does."""
    features = {
        "observation.images.front": {"dtype": "image", "shape": [8, 8, 3], "names": None},
        "observation.state": {"dtype": "float64", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float64", "shape": [2], "names": None},
    }
    writer = LeRobotV3Writer(tmp_path / "ds", 10, features)
    for ep in range(3):
        state = np.linspace(0, 1, 30).reshape(10, 3) + ep
        action = state[:, :2] * 0.1
        if ep == 1:
            action[3:6, 1] = 2e7  # in the wrong units, but still a float32
        if ep == 2:
            state[5, 0] = -1e39  # inf once training casts it to float32
        for f in range(10):
            img = np.full((8, 8, 3), 10 * f, np.uint8)
            writer.add_frame(
                {"observation.images.front": img, "observation.state": state[f], "action": action[f]}, "go"
            )
        writer.save_episode()
    writer.finalize()
    code, out, _ = run(["data", "inspect", str(tmp_path / "ds"), "--json"], capsys)
    assert code == 0  # a warning, as NaN values are
    file = tmp_path / "ds/data/chunk-000/file-000.parquet"
    assert sorted(json.loads(out)["sources"][0]["warnings"]) == [
        f"action: episode 1: 3 values beyond ±1e+06 in column 1 (largest 2e+07 at frame 3, column 1; file "
        f"{file}); a unit error or corrupt values",
        f"observation.state: episode 2: 1 value beyond ±1e+06 in column 0 (x) (largest -1e+39 at frame 5, "
        f"column 0 (x); file {file}); outside float32's range: inf in training, which stops at the first "
        "non-finite loss",
    ]
