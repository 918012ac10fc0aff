"""HDF5 episodes: robomimic/LIBERO files with many demos, and generic one-episode-per-file folders."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from xvla.data.episode_base import DatasetError, EpisodeDataset
from xvla.data.episodes import detect_format, open_dataset
from xvla.data.hdf5 import HDF5Dataset

LENGTHS = {"demo_0": 5, "demo_1": 7, "demo_10": 4}


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _smooth(n: int, seed: int, size: int = 16) -> np.ndarray:
    """Frames that JPEG keeps well: a flat colour per frame and episode."""
    colours = np.random.default_rng(seed).integers(30, 226, size=(n, 1, 1, 3))
    return np.broadcast_to(colours, (n, size, size, 3)).astype(np.uint8)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_libero(path: Path) -> None:
    """robomimic/LIBERO layout: data/demo_N/{obs/..., actions}, instruction in problem_info, rate in env_args."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": "put the bowl on the plate"})
        data.attrs["env_args"] = json.dumps({"env_name": "x", "env_kwargs": {"control_freq": 20}})
        for i, (name, n) in enumerate(LENGTHS.items()):
            demo = data.create_group(name)
            demo.create_dataset("obs/agentview_rgb", data=_images(n, i))
            demo.create_dataset("obs/ee_pos", data=np.arange(n * 3, dtype=np.float64).reshape(n, 3) + i)
            demo.create_dataset("obs/gripper_states", data=np.full((n, 2), i, np.float32))
            demo.create_dataset("next_obs/agentview_rgb", data=_images(n, i))
            demo.create_dataset("actions", data=np.full((n, 7), i, np.float32))
            demo.create_dataset("dones", data=np.zeros(n, np.uint8))


def write_generic(folder: Path, n_episodes: int = 3, *, encoding: str = "vlen") -> None:
    """ALOHA-like files, one episode each, a JPEG camera (variable-length bytes or zero-padded rows)."""
    folder.mkdir()
    for ep in range(n_episodes):
        n = 6 + ep
        with h5py.File(folder / f"episode_{ep * 5}.hdf5", "w") as f:  # 0, 5, 10: natural order
            f.attrs["fps"] = 50
            f.attrs["task"] = f"fold towel {ep}"
            jpegs = [_jpeg(img) for img in _smooth(n, 100 + ep)]
            if encoding == "vlen":
                cells = np.empty(n, dtype=object)
                cells[:] = [np.frombuffer(b, np.uint8) for b in jpegs]
                f.create_dataset("observations/images/cam_high", data=cells, dtype=h5py.vlen_dtype(np.uint8))
            else:
                padded = np.zeros((n, max(map(len, jpegs)) + 7), np.uint8)
                for i, b in enumerate(jpegs):
                    padded[i, : len(b)] = np.frombuffer(b, np.uint8)
                f.create_dataset("observations/images/cam_high", data=padded)
            f.create_dataset("observations/images/cam_wrist", data=_images(n, 200 + ep))
            f.create_dataset("observations/qpos", data=np.full((n, 14), ep, np.float32))
            f.create_dataset("action", data=np.tile(np.arange(n, dtype=np.float32)[:, None], (1, 14)))


def test_libero_layout(tmp_path: Path) -> None:
    path = tmp_path / "task_demo.hdf5"
    write_libero(path)
    assert detect_format(path) == "hdf5" and detect_format(tmp_path) == "hdf5"
    for ds in (open_dataset(path), open_dataset(tmp_path)):
        assert isinstance(ds, EpisodeDataset) and isinstance(ds, HDF5Dataset)
        assert ds.layout == "robomimic" and ds.num_episodes == 3 and ds.fps == 20
        assert ds.camera_keys == ("obs/agentview_rgb",)
        assert ds.lowdim_keys == ("actions", "dones", "obs/ee_pos", "obs/gripper_states")
        for ep, (name, n) in enumerate(LENGTHS.items()):  # demo_10 after demo_1
            assert ds.episode_file(ep) == (path, f"data/{name}")
            assert ds.episode_length(ep) == n
            assert ds.episode_task(ep) == "put the bowl on the plate"
            ee = ds.read_lowdim(ep, "obs/ee_pos")
            np.testing.assert_array_equal(ee, np.arange(n * 3).reshape(n, 3) + ep)
            assert ds.read_lowdim(ep, "dones").shape == (n, 1)
            np.testing.assert_allclose(ds.read_timestamps(ep), np.arange(n) / 20)
            frames = [n - 1, 0, 2, 0]
            np.testing.assert_array_equal(
                ds.read_frames(ep, "obs/agentview_rgb", frames), _images(n, ep)[frames]
            )


@pytest.mark.parametrize("encoding", ["vlen", "padded"])
def test_generic_folder(tmp_path: Path, encoding: str) -> None:
    folder = tmp_path / "aloha"
    write_generic(folder, encoding=encoding)
    ds = open_dataset(folder)
    assert ds.layout == "generic" and ds.num_episodes == 3 and ds.fps == 50
    assert ds.camera_keys == ("observations/images/cam_high", "observations/images/cam_wrist")
    assert ds.lowdim_keys == ("action", "observations/qpos")
    assert [ds.episode_file(ep)[0].name for ep in range(3)] == [
        "episode_0.hdf5",
        "episode_5.hdf5",
        "episode_10.hdf5",
    ]
    for ep in range(3):
        n = 6 + ep
        assert ds.episode_length(ep) == n and ds.episode_task(ep) == f"fold towel {ep}"
        np.testing.assert_array_equal(
            ds.read_lowdim(ep, "observations/qpos"), np.full((n, 14), ep, np.float32)
        )
        truth = _smooth(n, 100 + ep)
        high = ds.read_frames(ep, "observations/images/cam_high", [3, 1, 3])
        assert high.shape == (3, 16, 16, 3) and high.dtype == np.uint8
        assert np.abs(high.astype(float) - truth[[3, 1, 3]]).max() <= 3  # JPEG: lossy
        np.testing.assert_array_equal(high[0], high[2])
        np.testing.assert_array_equal(
            ds.read_frames(ep, "observations/images/cam_wrist", [1, 0]), _images(n, 200 + ep)[[1, 0]]
        )


def test_fps_required_when_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "ep.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("state", data=np.zeros((4, 2)))
        f.create_dataset("timestamps", data=10.0 + np.array([0.0, 0.1, 0.25, 0.3]))
    with pytest.raises(DatasetError, match=r"no frame rate recorded.*pass fps="):
        open_dataset(path)
    ds = open_dataset(path, fps=10)
    assert ds.fps == 10 and ds.lowdim_keys == ("state",) and ds.episode_task(0) == ""
    np.testing.assert_allclose(ds.read_timestamps(0), [0.0, 0.1, 0.25, 0.3])


def test_forked_worker_reads(tmp_path: Path) -> None:
    write_libero(tmp_path / "a.hdf5")
    ds = open_dataset(tmp_path / "a.hdf5")
    expected = ds.read_frames(1, "obs/agentview_rgb", [2, 0])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=lambda: queue.put(ds.read_frames(1, "obs/agentview_rgb", [2, 0])))
    worker.start()
    got = queue.get(timeout=60)
    worker.join(timeout=60)
    np.testing.assert_array_equal(got, expected)


def test_pickles_without_open_files(tmp_path: Path) -> None:
    write_libero(tmp_path / "a.hdf5")
    ds = open_dataset(tmp_path / "a.hdf5")
    ds.read_lowdim(2, "actions")
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.read_frames(2, "obs/agentview_rgb", [1]), _images(4, 2)[[1]])


def test_readers_write_nothing(tmp_path: Path) -> None:
    write_libero(tmp_path / "a.hdf5")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    ds = open_dataset(tmp_path)
    ds.read_frames(1, "obs/agentview_rgb", [0])
    ds.read_lowdim(1, "actions")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_bad_input_names_file_episode_and_frame(tmp_path: Path) -> None:
    folder = tmp_path / "aloha"
    write_generic(folder)
    with h5py.File(folder / "episode_5.hdf5", "a") as f:
        del f["action"]
    with h5py.File(folder / "episode_10.hdf5", "a") as f:
        f["observations/qpos"][4, 3] = np.nan
        del f["observations/images/cam_wrist"]
        f.create_dataset("observations/images/cam_wrist", data=_images(3, 0))  # 3 frames instead of 8
    ds = open_dataset(folder)
    with pytest.raises(DatasetError, match=r"missing key 'action'.*episode_5\.hdf5, episode 1"):
        ds.read_lowdim(1, "action")
    with pytest.raises(
        DatasetError, match=r"non-finite value in 'observations/qpos'.*episode_10\.hdf5, episode 2, frame 4"
    ):
        ds.read_lowdim(2, "observations/qpos")
    assert np.isnan(ds.read_lowdim(2, "observations/qpos", allow_nan=True)[4, 3])
    with pytest.raises(
        DatasetError, match=r"'observations/images/cam_wrist' has 3 frames but 'action' has 8"
    ):
        ds.read_frames(2, "observations/images/cam_wrist", [0])
    with pytest.raises(DatasetError, match=r"frame index out of range \[0, 6\).*episode 0, frame 6"):
        ds.read_frames(0, "observations/images/cam_high", [6])
    with pytest.raises(DatasetError, match="unknown camera 'cam_low'"):
        ds.read_frames(0, "cam_low", [0])


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "aloha"
    write_generic(folder)
    (folder / "episode_0.hdf5").write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DatasetError, match=r"corrupt HDF5 file.*episode_0\.hdf5"):
        open_dataset(folder)
    (folder / "episode_0.hdf5").unlink()
    ds = open_dataset(folder)
    (folder / "episode_10.hdf5").unlink()
    with pytest.raises(DatasetError, match=r"missing file.*episode_10\.hdf5, episode 1"):
        ds.read_lowdim(1, "action")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        open_dataset(tmp_path / "empty")


def test_a_zero_fps_is_a_named_error(tmp_path: Path) -> None:
    """A recorded or given rate of 0 is refused where it is read, not a ZeroDivisionError later (issue 14 D14)."""
    path = tmp_path / "ep.h5"
    with h5py.File(path, "w") as f:
        f.attrs["fps"] = 0
        f.create_dataset("state", data=np.zeros((4, 2)))
    with pytest.raises(
        DatasetError, match=rf"recorded frame rate: expected a frame rate > 0, got .*file {path}"
    ):
        open_dataset(path)
    with pytest.raises(DatasetError, match="fps option: expected a frame rate > 0, got 0"):
        open_dataset(path, fps=0)
