"""LeRobot v3.0 writer: layout compatible with lerobot's own files, round trip through the reader, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import fixture_dir
from xvla.data.episode_base import DatasetError
from xvla.data.episodes import open_dataset
from xvla.data.lerobot_writer import LeRobotV3Writer, available_video_encoder

PALETTE = [(240, 50, 50), (40, 220, 40), (70, 120, 255)]
SIZE = 64
FEATURES = {
    "observation.images.front": {
        "dtype": "video",
        "shape": [SIZE, SIZE, 3],
        "names": ["height", "width", "channels"],
    },
    "observation.images.wrist": {
        "dtype": "video",
        "shape": [SIZE, SIZE, 3],
        "names": ["height", "width", "channels"],
    },
    "observation.images.top": {
        "dtype": "image",
        "shape": [SIZE, SIZE, 3],
        "names": ["height", "width", "channels"],
    },
    "observation.state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "gripper"]},
    "action": {"dtype": "float32", "shape": [2], "names": None},
}
LENGTHS = (12, 25, 17)


def render(ep: int, f: int, cam: int) -> np.ndarray:
    """A 16x16 square coloured by episode on a background coloured by camera, moving 4 px per frame."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = (20 + 10 * ep, 30 + 40 * cam, 40)
    x0, y0 = 4 * (f % 12), 4 * ((f // 12) % 12)
    img[y0 : y0 + 16, x0 : x0 + 16] = PALETTE[ep % 3]
    return img


def frame(ep: int, f: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * ep + f)
    return {
        "observation.images.front": render(ep, f, 0),
        "observation.images.wrist": render(ep, f, 1),
        "observation.images.top": render(ep, f, 2),
        "observation.state": rng.normal(size=4).astype(np.float32),
        "action": rng.normal(size=2).astype(np.float32),
    }


def write(root: Path, **kw) -> Path:
    with LeRobotV3Writer(root, 10, FEATURES, "test_robot", **kw) as writer:
        for ep, n in enumerate(LENGTHS):
            for f in range(n):
                writer.add_frame(frame(ep, f), task=f"task {ep % 2}")
            if ep == 1:  # a discarded attempt leaves no trace
                writer.discard_episode()
                for f in range(n):
                    writer.add_frame(frame(ep, f), task=f"task {ep % 2}")
            assert writer.save_episode() == ep
        assert not root.exists()  # nothing at root before finalize
        return writer.finalize()


TINY = {"data_files_size_in_mb": 0.0005, "video_files_size_in_mb": 0.001, "chunks_size": 2}
CASES = [(None, TINY), (None, {}), ("libx264", {})]


@pytest.mark.parametrize(
    ("codec", "limits"), CASES, ids=[f"{c}-{'tiny' if lim else 'default'}" for c, lim in CASES]
)
def test_round_trip(tmp_path: Path, codec: str | None, limits: dict) -> None:
    if codec == "libx264" and "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264 encoder")
    root = write(tmp_path / "ds", video_codec=codec, **limits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the temporary folder is gone
    # tiny limits force one data file and one mp4 per episode (checked before adding each episode)
    # (at most 2 files per chunk folder here); default limits put all episodes back to back in one file
    files = (
        ["chunk-000/file-000", "chunk-000/file-001", "chunk-001/file-000"]
        if limits
        else ["chunk-000/file-000"]
    )
    assert sorted(str(p.relative_to(root / "data"))[:-8] for p in (root / "data").rglob("*.parquet")) == files
    videos = root / "videos/observation.images.front"
    assert sorted(str(p.relative_to(videos))[:-4] for p in videos.rglob("*.mp4")) == files
    meta = root / "meta/episodes"  # the episode table rolls over at the data size limit too
    assert sorted(str(p.relative_to(meta))[:-8] for p in meta.rglob("*.parquet")) == files
    ds = open_dataset(root)
    assert ds.version == "v3.0" and ds.fps == 10 and ds.num_episodes == 3
    assert ds.camera_keys == (
        "observation.images.front",
        "observation.images.wrist",
        "observation.images.top",
    )
    assert ds.lowdim_keys == ("observation.state", "action")
    ys, xs = np.mgrid[:SIZE, :SIZE]
    for ep, n in enumerate(LENGTHS):
        assert ds.episode_length(ep) == n and ds.episode_task(ep) == f"task {ep % 2}"
        for key in ds.lowdim_keys:
            np.testing.assert_array_equal(
                ds.read_lowdim(ep, key), np.stack([frame(ep, f)[key] for f in range(n)])
            )
        np.testing.assert_array_equal(ds.read_timestamps(ep), (np.arange(n) / 10).astype(np.float32))
        top = ds.read_frames(ep, "observation.images.top", range(n))
        np.testing.assert_array_equal(top, np.stack([render(ep, f, 2) for f in range(n)]))  # PNG: lossless
        for cam, key in enumerate(ds.camera_keys[:2]):
            frames = ds.read_frames(ep, key, range(n)).astype(np.float64)
            truth = np.stack([render(ep, f, cam) for f in range(n)]).astype(np.float64)
            assert np.abs(frames - truth).mean() <= 8, (ep, key)
            near = np.abs(frames - PALETTE[ep % 3]).sum(-1) < np.abs(frames - truth[0, -1, -1]).sum(-1)
            cx = (near * xs).sum((1, 2)) / near.sum((1, 2))
            np.testing.assert_allclose(cx, [4 * (f % 12) + 7.5 for f in range(n)], atol=1.0)


def test_layout_matches_lerobot(tmp_path: Path) -> None:
    """Same info.json keys, episode-table columns, task table and stats keys as lerobot 0.4.4 writes."""
    ref = fixture_dir("lerobot_v3_small")
    root = write(tmp_path / "ds")
    info, ref_info = (json.loads((r / "meta/info.json").read_text()) for r in (root, ref))
    assert info.keys() == ref_info.keys()
    assert (
        info["codebase_version"] == "v3.0"
        and info["total_frames"] == sum(LENGTHS)
        and info["total_tasks"] == 2
    )
    assert info["splits"] == {"train": "0:3"}
    front = info["features"]["observation.images.front"]
    assert front["info"].keys() == ref_info["features"]["observation.images.front"]["info"].keys()
    assert front["info"]["video.codec"] == available_video_encoder()[1]
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert info["features"][key] == ref_info["features"][key]

    def columns(r: Path) -> set[str]:
        names = pq.read_schema(r / "meta/episodes/chunk-000/file-000.parquet").names
        return {n.replace("front", "CAM").replace("wrist", "CAM").replace("top", "CAM") for n in names}

    assert columns(ref) <= columns(root)
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks.schema.names == pq.read_table(ref / "meta/tasks.parquet").schema.names
    assert tasks.to_pylist() == [
        {"task_index": 0, "__index_level_0__": "task 0"},
        {"task_index": 1, "__index_level_0__": "task 1"},
    ]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["__index_level_0__"]
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.column("index").to_pylist() == list(range(sum(LENGTHS)))
    assert str(data.schema.field("observation.state").type) == "fixed_size_list<element: float>[4]"

    stats = json.loads((root / "meta/stats.json").read_text())
    state = np.stack([frame(ep, f)["observation.state"] for ep, n in enumerate(LENGTHS) for f in range(n)])
    np.testing.assert_allclose(stats["observation.state"]["mean"], state.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["observation.state"]["std"], state.std(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(stats["observation.state"]["min"], state.min(0))
    assert stats["observation.state"]["count"] == [sum(LENGTHS)]
    assert np.array(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)
    assert stats.keys() == {*FEATURES, "timestamp", "frame_index", "episode_index", "index", "task_index"}


def test_atomic_and_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"), LeRobotV3Writer(root, 10, FEATURES) as writer:
        writer.add_frame(frame(0, 0), task="t")
        writer.save_episode()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # nothing at root, no temporary folder left
    write(root)
    with pytest.raises(FileExistsError, match="already exists"):
        LeRobotV3Writer(root, 10, FEATURES)
    writer = LeRobotV3Writer(root, 10, FEATURES, overwrite=True)
    writer.add_frame(frame(0, 0), task="new")
    writer.save_episode()
    assert open_dataset(root).num_episodes == 3  # the old dataset is untouched until finalize
    writer.finalize()
    assert open_dataset(root).episode_task(0) == "new" and open_dataset(root).num_episodes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_bad_frames_and_calls(tmp_path: Path) -> None:
    writer = LeRobotV3Writer(tmp_path / "ds", 10, FEATURES)
    good = frame(0, 0)
    with pytest.raises(ValueError, match=r"missing \['action'\]"):
        writer.add_frame({k: v for k, v in good.items() if k != "action"}, task="t")
    with pytest.raises(ValueError, match=r"frame\['observation.state'\]: expected shape \[4\]"):
        writer.add_frame({**good, "observation.state": np.zeros(5)}, task="t")
    with pytest.raises(ValueError, match=r"expected uint8 \[64, 64, 3\] RGB, got float32"):
        writer.add_frame(
            {**good, "observation.images.front": np.zeros((SIZE, SIZE, 3), np.float32)}, task="t"
        )
    with pytest.raises(ValueError, match="no frames"):
        writer.save_episode()
    writer.add_frame(good, task="t")
    with pytest.raises(ValueError, match="added but not saved"):
        writer.finalize()
    writer.abort()
    with pytest.raises(ValueError, match="must be even"):
        LeRobotV3Writer(tmp_path / "odd", 10, {"cam": {"dtype": "video", "shape": [63, 64, 3]}})
    with pytest.raises(ValueError, match="not an encoder"):
        available_video_encoder("no-such-encoder")
    assert list(tmp_path.iterdir()) == []


def test_nan_is_reported_with_its_frame(tmp_path: Path) -> None:
    features = {"observation.state": {"dtype": "float32", "shape": [3], "names": None}}
    writer = LeRobotV3Writer(tmp_path / "ds", 5, features)
    for f in range(6):
        writer.add_frame({"observation.state": np.array([f, np.nan if f == 4 else 0.0, 1.0])}, task="t")
    writer.save_episode()
    ds = open_dataset(writer.finalize())
    with pytest.raises(
        DatasetError, match=r"non-finite value in 'observation.state'.*file-000\.parquet, episode 0, frame 4"
    ):
        ds.read_lowdim(0, "observation.state")
    assert np.isnan(ds.read_lowdim(0, "observation.state", allow_nan=True)[4, 1])


def test_image_features_stored_as_files(tmp_path: Path) -> None:
    """An `image` cell with null bytes points at a file relative to the dataset (older LeRobot exports)."""
    from PIL import Image

    features = {"observation.images.top": FEATURES["observation.images.top"], "action": FEATURES["action"]}
    writer = LeRobotV3Writer(tmp_path / "ds", 10, features)
    for f in range(4):
        writer.add_frame({"observation.images.top": render(0, f, 2), "action": np.zeros(2)}, task="t")
    writer.save_episode()
    root = writer.finalize()
    data = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data)
    (root / "images").mkdir()
    for f in range(4):
        Image.fromarray(render(0, f, 2)).save(root / f"images/frame_{f}.png")
    cells = pa.array(
        [{"bytes": None, "path": f"images/frame_{f}.png"} for f in range(4)],
        table.schema.field("observation.images.top").type,
    )
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("observation.images.top"), "observation.images.top", cells
        ),
        data,
    )
    ds = open_dataset(root)
    np.testing.assert_array_equal(
        ds.read_frames(0, "observation.images.top", [3, 1]), np.stack([render(0, 3, 2), render(0, 1, 2)])
    )
    (root / "images/frame_1.png").unlink()
    with pytest.raises(
        DatasetError, match=r"unreadable image in 'observation.images.top'.*frame_1.png.*episode 0, frame 1"
    ):
        ds.read_frames(0, "observation.images.top", [1])
