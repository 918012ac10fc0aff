"""MixtureDataset: weighted + balanced draws, valid frames, splits, sharding, exact resume, bad data, LRU bounds."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from torch.utils.data import DataLoader

from conftest import fixture_dir
from xvla.data import rotations
from xvla.data.episode_base import DatasetError
from xvla.data.mixture import MixtureDataError, MixtureDataset
from xvla.data.sources import Mixture, Source

STATIC_TAIL = 5  # frames the fake robot rests at the end of every episode


class FakeDataset:
    """In-memory EpisodeDataset. ``path`` = "fake:<num_episodes>:<base_length>[:<bad episode>,...]"; episode e is
    base_length + 7 * e frames long, moves for all but its last STATIC_TAIL frames, and its images encode
    (episode, frame) in pixel (0, 0)."""

    fps = 10.0
    camera_keys = ("front", "wrist")
    lowdim_keys = ("observation.state", "action")

    def __init__(self, path: str) -> None:
        parts = path.split(":")
        self.root = Path(path)
        self.num_episodes, self.base = int(parts[1]), int(parts[2])
        self.bad = {int(e) for e in parts[3].split(",")} if len(parts) > 3 else set()
        self.tag = sum(map(ord, path)) % 200

    def episode_length(self, ep: int) -> int:
        return self.base + 7 * ep

    def episode_task(self, ep: int) -> str:
        return f"task {ep}"

    def read_timestamps(self, ep: int) -> np.ndarray:
        return np.arange(self.episode_length(ep)) / self.fps

    def read_lowdim(self, ep: int, key: str) -> np.ndarray:
        if ep in self.bad:
            raise DatasetError(
                "corrupt parquet row group", dataset=self.root, file="data/file-000.parquet", episode=ep
            )
        n = self.episode_length(ep)
        s = np.minimum(np.arange(n + 1), n - STATIC_TAIL) / self.fps  # the last frames hold still
        state = np.zeros((n + 1, 8))
        state[:, 0] = 0.1 * ep + 0.05 * s
        state[:, 1] = 0.02 * np.sin(s)
        state[:, 3:7] = rotations.convert(np.outer(s, [0.0, 0.0, 0.3]), "axis_angle", "quat_xyzw")
        state[:, 7] = (s > 1.0).astype(float)
        if key == "observation.state":
            return state[:n].astype(np.float32)
        nxt = state[1:]  # action = the next pose, axis-angle
        return np.concatenate(
            [nxt[:, :3], rotations.convert(nxt[:, 3:7], "quat_xyzw", "axis_angle"), nxt[:, 7:]], 1
        )

    def read_frames(self, ep: int, camera: str, frames: Sequence[int]) -> np.ndarray:
        out = np.zeros((len(frames), 8, 6, 3), dtype=np.uint8)
        out[:, 0, 0] = [[ep, f, self.tag] for f in frames]
        out[:, 7, 5, 2] = self.camera_keys.index(camera) + 1
        return out


def open_fake(source: Source) -> FakeDataset:
    return FakeDataset(source.path)


def fake_source(name: str, domain_id: int, path: str, **changes: Any) -> Source:
    arm = {"position": "0:3", "rotation": "3:7", "gripper": 7, "gripper_convention": {"binary": True}}
    action_arm = {"position": "0:3", "rotation": "3:6", "gripper": 6, "pose": {"rotation": "axis_angle"}}
    data = {
        "name": name,
        "domain_id": domain_id,
        "path": path,
        "cameras": [{"key": "front"}, {"key": "wrist", "flip": "horizontal"}],
        "state": {"key": "observation.state", "dim": 8, "arms": [arm]},
        "action": {
            "key": "action",
            "dim": 7,
            "arms": [{**action_arm, "gripper_convention": {"binary": True}}],
        },
        "rot6d_layout": "interleaved",
        "control_hz": 10.0,
        "horizon_s": 1.0,
        **changes,
    }
    return Source.from_dict(data)


def fake_mixture(**changes: Any) -> Mixture:
    return Mixture(
        (
            fake_source("a", 0, "fake:6:20", weight=3.0, val_count=1, **changes),
            fake_source("b", 5, "fake:4:30", weight=1.0, val_fraction=0.25, **changes),
        )
    )


def dataset(mixture: Mixture | None = None, **kw: Any) -> MixtureDataset:
    return MixtureDataset(mixture or fake_mixture(), open_fn=open_fake, **kw)


def key(sample: dict[str, Any]) -> tuple[str, int, int]:
    """(source, episode, frame) read back from the image."""
    ep, frame, _ = sample["images"][0][0, 0]
    return sample["source"], int(ep), int(frame)


def take(ds: MixtureDataset, n: int) -> list[dict[str, Any]]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_sample_contract() -> None:
    ds = dataset()
    s = ds.sample(0, 0)
    assert set(s) == {
        "images",
        "instruction",
        "proprio",
        "domain_id",
        "missing_views",
        "action",
        "source",
        "source_idx",
        "episode",
        "frame",
        "augment_seed",
    }
    assert s["augment_seed"] == ds.sample(0, 0)["augment_seed"] != ds.sample(0, 1)["augment_seed"]
    assert s["augment_seed"] != ds.sample(1, 0)["augment_seed"]  # per stream position and shard
    assert len(s["images"]) == 2 and s["images"][0].dtype == np.uint8 and s["images"][0].shape == (8, 6, 3)
    assert s["images"][1][7, 0, 2] == 2 and s["images"][1][7, 5, 2] == 0  # the wrist view is flipped
    assert s["proprio"].dtype == np.float32 and s["proprio"].shape == (20,)
    assert s["action"].dtype == np.float32 and s["action"].shape == (30, 20)
    source, ep, frame = key(s)
    assert (ds.mixture.sources[s["source_idx"]].name, s["episode"], s["frame"]) == (source, ep, frame)
    assert s["domain_id"] == ds.mixture[source].domain_id and s["instruction"] == f"task {ep}"
    assert s["missing_views"] == ds.mixture[source].missing_views == "zeros"
    fake = FakeDataset(ds.mixture[source].path)
    expected = ds.mixture[source].state_to_canonical(fake.read_lowdim(ep, "observation.state")[frame])
    np.testing.assert_allclose(s["proprio"], expected, atol=1e-6)
    assert set(np.unique(s["action"][:, 9])) <= {0.0, 1.0}  # binary gripper held


def test_deterministic_and_seed_dependent() -> None:
    first = [key(s) for s in take(dataset(seed=1), 30)]
    assert first == [key(s) for s in take(dataset(seed=1), 30)]
    assert first != [key(s) for s in take(dataset(seed=2), 30)]
    a, b = dataset(seed=1).sample(3, 11), dataset(seed=1).sample(3, 11)
    np.testing.assert_array_equal(a["action"], b["action"])


def test_weighted_sources_balanced_episodes_valid_frames() -> None:
    ds = dataset()
    keys = [key(ds.sample(0, i)) for i in range(1500)]
    by_source = collections.Counter(k[0] for k in keys)
    assert by_source["a"] / len(keys) == pytest.approx(0.75, abs=0.04)
    # episodes uniform within a source although they have different lengths (20..55 frames)
    eps_a = collections.Counter(k[1] for k in keys if k[0] == "a")
    assert set(eps_a) == set(ds.split_episodes(0).tolist()) and len(eps_a) == 5
    assert max(eps_a.values()) / min(eps_a.values()) < 1.4
    for source, ep, frame in keys:
        n = FakeDataset(ds.mixture[source].path).episode_length(ep)
        assert frame < n - STATIC_TAIL  # static tail frames are never drawn


def test_episodes_interleave_within_a_batch() -> None:
    samples = take(dataset(), 16)
    assert len({key(s)[:2] for s in samples}) >= 6


def test_train_val_split_is_disjoint_and_fixed_by_split_seed() -> None:
    train, val = dataset(split="train"), dataset(split="val", seed=9)
    for i, n in ((0, 6), (1, 4)):
        tr, va = set(train.split_episodes(i).tolist()), set(val.split_episodes(i).tolist())
        assert not tr & va and tr | va == set(range(n)) and len(va) == 1
    assert dataset(split="val", split_seed=1).split_episodes(0).tolist() != val.split_episodes(
        0
    ).tolist() or (
        dataset(split="val", split_seed=2).split_episodes(0).tolist() != val.split_episodes(0).tolist()
    )
    val_eps = {(s, e) for s, e, _ in map(key, take(val, 40))}
    assert val_eps <= {("a", int(val.split_episodes(0)[0])), ("b", int(val.split_episodes(1)[0]))}


def test_val_split_needs_held_out_episodes() -> None:
    mixture = Mixture((fake_source("a", 0, "fake:3:20"),))
    with pytest.raises(MixtureDataError, match="no source has episodes in split 'val'"):
        dataset(mixture, split="val").sample(0, 0)
    mixture = Mixture((fake_source("a", 0, "fake:3:20", val_count=3),))
    with pytest.raises(MixtureDataError, match="source 'a': .*holds out 3 of 3 episodes"):
        dataset(mixture).sample(0, 0)


def test_shards_are_distinct_streams() -> None:
    ds0, ds1 = dataset(rank=0, world_size=2), dataset(rank=1, world_size=2)
    a, b = [key(s) for s in take(ds0, 20)], [key(s) for s in take(ds1, 20)]
    assert a != b
    assert a == [key(ds0.sample(0, i)) for i in range(20)] and b == [key(ds0.sample(1, i)) for i in range(20)]


def test_resume_in_process() -> None:
    ds = dataset(seed=4)
    it = iter(ds)
    head = [key(next(it)) for _ in range(7)]
    state = ds.state_dict()
    tail = [key(next(it)) for _ in range(5)]
    resumed = dataset(seed=4)
    resumed.load_state_dict(state)
    assert [key(s) for s in take(resumed, 5)] == tail
    assert head != tail
    with pytest.raises(ValueError, match="seed is 4, this dataset has 5"):
        dataset(seed=5).load_state_dict(state)


def collate_keys(batch: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    return [key(s) for s in batch]


@pytest.mark.parametrize("consumed", [4, 5])
def test_resume_with_dataloader_workers(consumed: int) -> None:
    def loader(ds: MixtureDataset) -> DataLoader:
        return DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_keys)

    ds = dataset(seed=3)
    it = iter(loader(ds))
    batches = [next(it) for _ in range(consumed + 3)]
    del it
    assert batches[0] != batches[1]  # the two workers do not repeat each other
    state = ds.state_dict(batches=consumed, batch_size=3, num_workers=2)
    resumed = dataset(seed=3)
    resumed.load_state_dict(state)
    it = iter(loader(resumed))
    assert [next(it) for _ in range(3)] == batches[consumed:]
    del it
    # a second save/restore composes with the first
    again = dataset(seed=3)
    again.load_state_dict(resumed.state_dict(batches=1, batch_size=3, num_workers=2))
    it = iter(loader(again))
    assert [next(it) for _ in range(2)] == batches[consumed + 1 :]
    del it
    with pytest.raises(ValueError, match="saved with 2 dataloader workers, resumed with 1"):
        next(iter(again))


def test_bad_episodes_raise_or_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    mixture = Mixture((fake_source("bad", 2, "fake:4:20:1,2"),))
    with pytest.raises(
        MixtureDataError,
        match=r"source 'bad': dataset fake:4:20:1,2: episode [12]: corrupt parquet.*episode [12]",
    ):
        [dataset(mixture).sample(0, i) for i in range(50)]
    ds = dataset(mixture, skip_bad_episodes=True)
    with caplog.at_level(logging.WARNING, logger="xvla.data.mixture"):
        keys = [key(ds.sample(0, i)) for i in range(50)]
    assert {ep for _, ep, _ in keys} == {0, 3}
    assert ds.skipped_episodes == 2 and "skipping bad episode" in caplog.text
    # skipping keeps the stream deterministic: a fresh dataset gives the same samples from any point on
    fresh = dataset(mixture, skip_bad_episodes=True)
    assert [key(fresh.sample(0, i)) for i in range(30, 50)] == keys[30:]


def test_static_episodes_are_redrawn_and_unusable_sources_named() -> None:
    partly = Mixture((fake_source("partly", 0, "fake:2:5"),))  # episode 0: 5 frames, all static
    assert {key(s)[1] for s in take(dataset(partly), 20)} == {1}
    static = Mixture((fake_source("still", 0, "fake:1:5"),))
    with pytest.raises(MixtureDataError, match="source 'still': .*no usable episode"):
        dataset(static).sample(0, 0)


def test_missing_keys_are_named() -> None:
    mixture = Mixture((fake_source("a", 0, "fake:3:20", cameras=[{"key": "top"}]),))
    with pytest.raises(MixtureDataError, match=r"source 'a': cameras\[0\]: key 'top' is not in dataset"):
        dataset(mixture).sample(0, 0)


def test_caches_are_bounded_and_not_pickled() -> None:
    shortest = dataset().episode(0, 0).nbytes  # episode 0 is the shortest fake episode
    ds = dataset(max_open_datasets=1, episode_cache_bytes=2 * shortest)
    for i in range(40):
        ds.sample(0, i)
        assert len(ds._datasets) <= 1 and len(ds._episodes) <= 2
        assert ds._episode_bytes == sum(e.nbytes for e in ds._episodes.values())
        assert ds._episode_bytes <= 2 * shortest or len(ds._episodes) == 1
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._datasets and not clone._episodes


def test_action_targets_match_state_targets_when_actions_are_next_poses() -> None:
    by_state, by_action = dataset(), dataset(fake_mixture(targets="action"))
    compared = 0
    for i in range(40):
        s, a = by_state.sample(0, i), by_action.sample(0, i)
        assert key(s) == key(a)
        source, ep, frame = key(s)
        # the action stream ends one period later (its last row is the pose after the last frame), so only
        # windows that are not clipped at the episode end are the same
        if frame + 10 < FakeDataset(by_state.mixture[source].path).episode_length(ep):
            np.testing.assert_allclose(s["action"], a["action"], atol=1e-6)
            compared += 1
    assert compared > 20


PALETTE = np.array(
    [(240, 50, 50), (40, 220, 40), (70, 120, 255), (240, 230, 40), (235, 70, 235), (40, 225, 235)]
)


def _square(image: np.ndarray) -> tuple[int, int]:
    """(episode, frame) encoded by the fixture's 16x16 square: colour -> episode, position -> frame."""
    pixels = image.reshape(-1, 3).astype(int)
    on = np.abs(pixels - np.median(pixels, 0)).sum(1) > 100  # the square covers 1/16 of the image
    colour = pixels[on].mean(0)
    y, x = np.argwhere(on.reshape(image.shape[:2])).mean(0) - 7.5
    return int(np.argmin(np.abs(PALETTE - colour).sum(1))), int(round(y / 4)) * 13 + int(round(x / 4))


def test_end_to_end_on_the_lerobot_fixture() -> None:
    root = fixture_dir("lerobot_v3_small")
    data = yaml.safe_load(Path(__file__).with_name("lerobot_v3_small.mixture.yaml").read_text())
    mixture = Mixture.from_dict(data, base_dir=root.parent)
    source = mixture.sources[0]
    ds = MixtureDataset(mixture, seed=0)
    (held_out,) = MixtureDataset(mixture, split="val").split_episodes(0).tolist()
    assert held_out not in ds.split_episodes(0).tolist()
    reader = ds.dataset(0)
    compared = 0
    for s in take(ds, 8):
        front, wrist = s["images"]
        assert front.shape == wrist.shape == (64, 64, 3)
        ep, frame = _square(front)
        assert ep != held_out
        assert _square(wrist) == (
            ep,
            frame,
        )  # the horizontal flip makes the wrist square move like the front one
        assert s["instruction"] == reader.episode_task(ep) and s["domain_id"] == 3
        state = reader.read_lowdim(ep, "observation.state")
        np.testing.assert_allclose(s["proprio"], source.state_to_canonical(state[frame]), atol=1e-6)
        # frames are 0.1 s apart and the horizon is 1 s: every third anchor is the state 1..10 frames later
        last = len(state) - 1
        expected = source.state_to_canonical(state[np.minimum(frame + np.arange(1, 11), last)])
        if frame + 10 <= last:
            np.testing.assert_allclose(s["action"][2::3], expected, atol=1e-5)
            compared += 1
    assert compared >= 2


def test_lerobot_v21_and_v30_copies_give_the_same_stream() -> None:
    root = fixture_dir("lerobot_v3_small")
    v21 = fixture_dir("lerobot_v21_small")
    data = yaml.safe_load(Path(__file__).with_name("lerobot_v3_small.mixture.yaml").read_text())
    v3_mix = Mixture.from_dict(data, base_dir=root.parent)
    v21_mix = Mixture((dataclasses.replace(v3_mix.sources[0], path=str(v21)),))
    for a, b in zip(
        take(MixtureDataset(v3_mix, seed=5), 4), take(MixtureDataset(v21_mix, seed=5), 4), strict=True
    ):
        np.testing.assert_array_equal(a["proprio"], b["proprio"])
        np.testing.assert_array_equal(a["action"], b["action"])
        assert a["instruction"] == b["instruction"]
        for x, y in zip(a["images"], b["images"], strict=True):
            assert np.abs(x.astype(int) - y.astype(int)).mean() < 8  # both lossy AV1 encodes of one frame


def test_frame_cache_gives_the_same_stream_and_respects_its_cap() -> None:
    plain = take(dataset(), 30)
    cached_ds = dataset(frame_cache_bytes=10**9)
    for a, b in zip(plain, take(cached_ds, 30), strict=True):
        assert key(a) == key(b)
        for x, y in zip(a["images"], b["images"], strict=True):
            np.testing.assert_array_equal(x, y)
    assert cached_ds.cached_frame_bytes > 0
    # One (episode, camera) of the fake data is at most (20 + 7 * 5) x 8 x 6 x 3 = 7920 bytes: a 10 kB cap keeps
    # the first one or two decoded and streams the rest, with the same samples.
    capped = dataset(frame_cache_bytes=10_000)
    for a, b in zip(plain, take(capped, 30), strict=True):
        assert key(a) == key(b)
    assert 0 < capped.cached_frame_bytes <= 10_000
    preloaded = dataset(frame_cache_bytes=10**9)
    total = preloaded.preload_frames()
    frames = sum(
        FakeDataset(s.path).episode_length(int(e)) * len(s.cameras)
        for i, s in enumerate(preloaded.mixture.sources)
        for e in preloaded.split_episodes(i)
    )
    assert total == frames * 8 * 6 * 3
    assert [key(s) for s in take(preloaded, 30)] == [key(s) for s in plain]
    import pickle

    assert not pickle.loads(pickle.dumps(preloaded))._frames  # workers under spawn start empty
