"""LeRobot v3.0 / v2.1 readers against datasets written by the real `lerobot` library (shared fixtures)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_dir
from xvla.data.episode_base import DatasetError, EpisodeDataset
from xvla.data.episodes import open_dataset
from xvla.data.lerobot import LeRobotDataset

FIXTURES = ("lerobot_v3_small", "lerobot_v21_small")


def _expected(root: Path) -> dict:
    return json.loads((root / "expected.json").read_text())


def _square_centres(frames: np.ndarray, square_rgb, background_rgb) -> np.ndarray:
    """`[K, 2]` (x, y) centroid of the pixels nearer the square colour than the background colour."""
    img = frames.astype(np.float64)
    near = np.abs(img - square_rgb).sum(-1) < np.abs(img - background_rgb).sum(-1)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    count = near.sum((1, 2))
    return np.stack([(near * xs).sum((1, 2)) / count, (near * ys).sum((1, 2)) / count], 1)


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request) -> tuple[Path, LeRobotDataset, dict]:
    root = fixture_dir(request.param)
    return root, open_dataset(root), _expected(root)


def test_metadata(fixture) -> None:
    root, ds, exp = fixture
    assert isinstance(ds, EpisodeDataset)
    assert ds.version == exp["codebase_version"]
    assert (ds.num_episodes, ds.fps) == (exp["total_episodes"], exp["fps"])
    assert ds.camera_keys == tuple(exp["cameras"])
    assert ds.lowdim_keys == ("observation.state", "action")
    for ep, meta in enumerate(exp["episodes"]):
        assert ds.episode_length(ep) == meta["length"]
        assert ds.episode_task(ep) == meta["task"]
    with pytest.raises(IndexError, match="episode 6 out of range"):
        ds.episode_length(6)


def test_lowdim_and_timestamps_bit_exact(fixture) -> None:
    _, ds, exp = fixture
    for ep, meta in enumerate(exp["episodes"]):
        state, action = ds.read_lowdim(ep, "observation.state"), ds.read_lowdim(ep, "action")
        assert state.dtype == action.dtype == np.float32
        assert state.shape == (meta["length"], 8) and action.shape == (meta["length"], 7)
        assert state.astype(np.float64).sum() == meta["state_sum_float64"]
        assert action.astype(np.float64).sum() == meta["action_sum_float64"]
        ts = ds.read_timestamps(ep)
        np.testing.assert_array_equal(ts, (np.arange(meta["length"]) / exp["fps"]).astype(np.float32))
    for sample in exp["samples"]:
        ep, f = sample["episode_index"], sample["frame_index"]
        np.testing.assert_array_equal(
            ds.read_lowdim(ep, "observation.state")[f], np.float32(sample["observation.state"])
        )
        np.testing.assert_array_equal(ds.read_lowdim(ep, "action")[f], np.float32(sample["action"]))
        assert ds.read_timestamps(ep)[f] == np.float32(sample["timestamp"])


def test_every_frame_is_aligned(fixture) -> None:
    """Square centre within 1 px for every frame of every episode and camera (off by one frame = 4 px)."""
    _, ds, exp = fixture
    for cam in ds.camera_keys:
        for ep in range(ds.num_episodes):
            sample = next(s for s in exp["samples"] if s["episode_index"] == ep)["images"][cam]
            frames = ds.read_frames(ep, cam, range(ds.episode_length(ep)))
            assert frames.dtype == np.uint8 and frames.shape == (ds.episode_length(ep), 64, 64, 3)
            centres = _square_centres(frames, sample["square_rgb"], sample["background_rgb"])
            expected = np.array(exp["square_center_xy_per_frame"][cam][str(ep)])
            assert np.abs(centres - expected).max() <= 1.0, (cam, ep)


def test_sample_colours(fixture) -> None:
    _, ds, exp = fixture
    for sample in exp["samples"]:
        ep, f = sample["episode_index"], sample["frame_index"]
        for cam, img_exp in sample["images"].items():
            img = ds.read_frames(ep, cam, [f])[0].astype(np.float64)
            x0, y0 = img_exp["square_top_left_xy"]
            inner = img[y0 + 4 : y0 + 12, x0 + 4 : x0 + 12].mean((0, 1))
            assert np.abs(inner - img_exp["square_rgb"]).max() <= 15, (ep, f, cam)
            far = np.ones(img.shape[:2], bool)
            far[max(0, y0 - 4) : y0 + 20, max(0, x0 - 4) : x0 + 20] = False
            assert np.abs(img[far].mean(0) - img_exp["background_rgb"]).max() <= 8, (ep, f, cam)
            quads = [img[:32, :32], img[:32, 32:], img[32:, :32], img[32:, 32:]]
            means = np.array([q.mean((0, 1)) for q in quads])
            assert np.abs(means - np.array(img_exp["quadrant_mean_rgb"])).max() <= 8, (ep, f, cam)


def test_random_access_matches_sequential(fixture) -> None:
    """Seeking (any order, repeats, jumps across episodes) returns the same frames as decoding straight through."""
    _, ds, _ = fixture
    cam = ds.camera_keys[1]
    full = {ep: ds.read_frames(ep, cam, range(ds.episode_length(ep))) for ep in (1, 2, 4)}
    rng = np.random.default_rng(0)
    for ep in (2, 1, 4, 2, 1):
        frames = rng.integers(0, ds.episode_length(ep), size=7)
        frames[1] = frames[0]
        np.testing.assert_array_equal(ds.read_frames(ep, cam, frames), full[ep][frames])
    # one frame per call, forwards (decoding goes on from the last frame) and backwards (seeks every time)
    n = ds.episode_length(2)
    for order in (range(n), range(n - 1, -1, -1)):
        np.testing.assert_array_equal(
            np.concatenate([ds.read_frames(2, cam, [f]) for f in order]), full[2][order]
        )
    with pytest.raises(DatasetError, match="frame index out of range"):
        ds.read_frames(1, cam, [ds.episode_length(1)])


def test_forked_worker_reopens_files(fixture) -> None:
    """A data-loader worker forked after the parent read (and so opened files) reads the same frames, and the
    parent's open decoders are undisturbed."""
    _, ds, _ = fixture
    cam = ds.camera_keys[0]
    expected = ds.read_frames(4, cam, [7, 2, 8])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=lambda: queue.put(ds.read_frames(4, cam, [7, 2, 8])))
    worker.start()
    got = queue.get(timeout=60)
    worker.join(timeout=60)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(ds.read_frames(4, cam, [8]), expected[2:])


def test_pickles_without_open_files(fixture) -> None:
    """A reader sent to a spawned data-loader worker reopens its files there."""
    _, ds, _ = fixture
    ds.read_frames(0, ds.camera_keys[0], [3])
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(
        clone.read_frames(0, ds.camera_keys[0], [3]), ds.read_frames(0, ds.camera_keys[0], [3])
    )
    np.testing.assert_array_equal(clone.read_lowdim(5, "action"), ds.read_lowdim(5, "action"))


def test_v3_and_v21_return_the_same_tensors() -> None:
    v3, v21 = (open_dataset(fixture_dir(name)) for name in FIXTURES)
    assert v3.num_episodes == v21.num_episodes
    for ep in range(v3.num_episodes):
        assert v3.episode_task(ep) == v21.episode_task(ep)
        for key in v3.lowdim_keys:
            np.testing.assert_array_equal(v3.read_lowdim(ep, key), v21.read_lowdim(ep, key))
        np.testing.assert_array_equal(v3.read_timestamps(ep), v21.read_timestamps(ep))
        frames = [0, v3.episode_length(ep) // 2, v3.episode_length(ep) - 1]
        for cam in v3.camera_keys:
            a, b = (d.read_frames(ep, cam, frames).astype(np.float64) for d in (v3, v21))
            assert np.abs(a - b).mean() <= 8, (ep, cam)


def test_readers_write_nothing(tmp_path: Path) -> None:
    """Reading never creates or touches a file in the dataset folder."""
    root = tmp_path / "ds"
    shutil.copytree(fixture_dir("lerobot_v3_small"), root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    ds = open_dataset(root)
    ds.read_frames(3, ds.camera_keys[0], [0, 5])
    ds.read_lowdim(3, "action")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def v3_copy(tmp_path: Path) -> Path:
    root = tmp_path / "v3"
    shutil.copytree(fixture_dir("lerobot_v3_small"), root)
    return root


@pytest.fixture
def v21_copy(tmp_path: Path) -> Path:
    root = tmp_path / "v21"
    shutil.copytree(fixture_dir("lerobot_v21_small"), root)
    return root


def test_missing_data_file_names_file_and_episode(v21_copy: Path) -> None:
    os.remove(v21_copy / "data/chunk-000/episode_000002.parquet")
    ds = open_dataset(v21_copy)
    ds.read_lowdim(1, "action")  # other episodes still read
    with pytest.raises(DatasetError, match=r"missing file.*episode_000002\.parquet.*episode 2"):
        ds.read_lowdim(2, "action")


def test_corrupt_parquet(v3_copy: Path) -> None:
    path = v3_copy / "data/chunk-000/file-000.parquet"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"corrupt parquet.*file-000\.parquet.*episode 0"):
        open_dataset(v3_copy).read_lowdim(0, "observation.state")
    table = v3_copy / "meta/episodes/chunk-000/file-000.parquet"
    table.write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(DatasetError, match=r"corrupt parquet.*meta/episodes/chunk-000/file-000\.parquet"):
        open_dataset(v3_copy)


def test_corrupt_and_truncated_video(v3_copy: Path, v21_copy: Path) -> None:
    front = v3_copy / "videos/observation.images.front/chunk-000/file-000.mp4"
    front.write_bytes(b"\x00" * 64 + front.read_bytes()[64:])
    with pytest.raises(DatasetError, match=r"corrupt video.*file-000\.mp4.*episode 4"):
        open_dataset(v3_copy).read_frames(4, "observation.images.front", [0])
    # a video that ends before its episode does: the missing frame is named
    wrist = v21_copy / "videos/chunk-000/observation.images.wrist/episode_000001.mp4"
    shutil.copy(v21_copy / "videos/chunk-000/observation.images.wrist/episode_000000.mp4", wrist)  # 20 < 33
    with pytest.raises(DatasetError, match=r"episode_000001\.mp4.*episode 1, frame 2[0-9]"):
        open_dataset(v21_copy).read_frames(1, "observation.images.wrist", [3, 25])


def test_length_mismatch(v21_copy: Path) -> None:
    path = v21_copy / "meta/episodes.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[3]["length"] += 1
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match=r"27 rows .* length 28.*episode 3"):
        open_dataset(v21_copy).read_lowdim(3, "action")


def test_missing_key(v3_copy: Path) -> None:
    info = json.loads((v3_copy / "meta/info.json").read_text())
    info["features"]["observation.velocity"] = {"dtype": "float32", "shape": [3], "names": None}
    (v3_copy / "meta/info.json").write_text(json.dumps(info))
    ds = open_dataset(v3_copy)
    with pytest.raises(DatasetError, match=r"lacks columns \['observation.velocity'\].*episode 1"):
        ds.read_lowdim(1, "observation.velocity")
    with pytest.raises(DatasetError, match="unknown low-dim key 'effort'"):
        ds.read_lowdim(1, "effort")


def test_unsupported_version_and_missing_meta(v3_copy: Path, tmp_path: Path) -> None:
    os.remove(v3_copy / "meta/episodes/chunk-000/file-000.parquet")
    with pytest.raises(DatasetError, match="no episode table"):
        open_dataset(v3_copy)
    info = json.loads((v3_copy / "meta/info.json").read_text())
    (v3_copy / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(DatasetError, match="unsupported codebase_version 'v1.6'"):
        open_dataset(v3_copy)
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "nope")


@pytest.mark.parametrize("fps", [0, -10, None, "fast", float("inf")])
def test_a_bad_fps_is_a_named_error(v3_copy: Path, fps) -> None:
    """`fps: 0` used to be a ZeroDivisionError in inspect and training (issue 14 D14)."""
    info_path = v3_copy / "meta/info.json"
    info = json.loads(info_path.read_text())
    info["fps"] = fps
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=rf"^fps: expected a frame rate > 0, got .*file {info_path}\)$"):
        open_dataset(v3_copy)


def test_timestamps_that_disagree_with_fps_are_refused(v3_copy: Path, v21_copy: Path) -> None:
    """info.json fps 30 on 10 fps data paired rows with frames [0, 1, 1, 1, 2, 2, 2, ...] (issue 14 D11)."""
    for root, data_file in ((v3_copy, "file-000.parquet"), (v21_copy, "episode_000002.parquet")):
        info_path = root / "meta/info.json"
        info = json.loads(info_path.read_text())
        info_path.write_text(json.dumps({**info, "fps": 30}))
        ds = open_dataset(root)
        with pytest.raises(
            DatasetError, match=rf"^timestamps disagree with fps 30: frame \d+ .*{data_file}, episode 2\)$"
        ):
            ds.read_timestamps(2)
        ds.read_lowdim(2, "action")  # values are still readable (inspect reports them)
        info_path.write_text(json.dumps({**info, "fps": 10.05}))  # within half a frame over every episode
        assert len(open_dataset(root).read_timestamps(2)) == open_dataset(root).episode_length(2)
