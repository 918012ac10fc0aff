"""`MixtureDataset`: an endless, weighted, balanced, sharded and resumable stream of raw samples.

Sample ``k`` of shard ``s`` is a pure function of ``(seed, split, s, k)``: draw a source by normalised weight,
then an episode uniformly among the source's episodes of the split (balanced over trajectories), then a
frame uniformly among the episode's non-static frames; so is its ``augment_seed`` (for colour jitter). Every
sample redraws its episode, so consecutive samples (and so a batch) mix episodes and sources. A shard is one ``(rank, dataloader worker)`` pair, so no two
workers yield the same stream.

Resuming: the state is the number of samples each worker has yielded. The DataLoader hands out batches round-robin
over its workers, so a trainer that knows how many batches it consumed gets the exact state with
``state_dict(batches=..., batch_size=..., num_workers=...)``; ``load_state_dict`` on a fresh dataset (same
mixture, seed, rank, world size and number of workers) continues the very same batch stream. Without workers
the dataset counts what it yields itself.

Datasets are opened lazily inside each worker; at most ``max_open_datasets`` readers and ``episode_cache_bytes``
of episodes' low-dimensional arrays are kept (LRU; the default holds every episode of a demo-sized mixture, so
no episode is read and converted twice). Images are read one frame at a time unless
``frame_cache_bytes`` > 0: then each (episode, camera) is decoded once, whole, and kept in RAM until the cache
holds that many bytes; episodes beyond the cap are streamed frame by frame as before. ``preload_frames()``
fills the cache before DataLoader workers fork, so they share one copy (copy-on-write pages).
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from xvla.data import anchors
from xvla.data.episode_base import EpisodeDataset
from xvla.data.episodes import open_dataset
from xvla.data.sources import Mixture, Source

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")
MAX_DRAWS = 100  # episode draws per sample before giving up (empty/static/bad episodes are redrawn)
AUGMENT_STREAM = 1  # extra seed word: augmentation draws are independent of the sampling draws


class MixtureDataError(RuntimeError):
    """A sample could not be built; the message names the source, dataset path, episode and frame."""


@dataclass(frozen=True)
class _Episode:
    """Per-episode arrays a sample needs (kept in the LRU)."""

    times: np.ndarray  # [N] seconds
    proprio: np.ndarray  # [N, P] canonical state
    target_times: np.ndarray  # [N] time each target row is reached
    targets: np.ndarray  # [N, P] canonical absolute trajectory the anchors follow
    valid: np.ndarray  # [M] frame indices with a non-static window
    task: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.times, self.proprio, self.target_times, self.targets, self.valid))


def _default_open(source: Source) -> EpisodeDataset:
    return open_dataset(source.path, format=source.format, **source.reader_options)  # type: ignore[arg-type]


class MixtureDataset(IterableDataset):
    """Raw samples (see docs/design.md) drawn from a `Mixture`; iterate it, or call `sample(shard, index)`."""

    def __init__(
        self,
        mixture: Mixture,
        *,
        split: str = "train",
        seed: int = 0,
        split_seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_bad_episodes: bool = False,
        max_open_datasets: int = 16,
        episode_cache_bytes: int = 256 * 2**20,
        frame_cache_bytes: int = 0,
        open_fn: Callable[[Source], EpisodeDataset] = _default_open,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
        self.mixture = mixture
        self.split = split
        self.seed = int(seed)
        self.split_seed = int(split_seed)
        self.rank = rank
        self.world_size = world_size
        self.skip_bad_episodes = skip_bad_episodes
        self.max_open_datasets = max(1, max_open_datasets)
        self.episode_cache_bytes = max(0, int(episode_cache_bytes))
        self.frame_cache_bytes = max(0, int(frame_cache_bytes))
        self.open_fn = open_fn
        self.skipped_episodes = 0  # bad episodes skipped in this process
        self._start: list[int] = [0]  # samples already consumed, per worker role
        self._rotation = 0  # worker w plays role (w + rotation) % num_workers (round-robin continuation)
        self._yielded = 0  # samples yielded in-process (num_workers == 0)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._datasets: OrderedDict[int, EpisodeDataset] = OrderedDict()
        self._episodes: OrderedDict[tuple[int, int], _Episode] = OrderedDict()
        self._episode_bytes = 0
        self._splits: list[np.ndarray] | None = None
        self._bad: set[tuple[int, int]] = set()
        self._frames: dict[tuple[int, int, str], np.ndarray] = {}  # (source, episode, camera) -> [N, H, W, 3]
        self._frame_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # workers get empty caches: every reader is opened inside its worker
        for key in ("_datasets", "_episodes", "_episode_bytes", "_splits", "_bad", "_frames", "_frame_bytes"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    # ------------------------------------------------------------ datasets and episodes

    def dataset(self, source_idx: int) -> EpisodeDataset:
        """The open reader of a source (LRU of at most ``max_open_datasets``)."""
        if source_idx in self._datasets:
            self._datasets.move_to_end(source_idx)
            return self._datasets[source_idx]
        source = self.mixture.sources[source_idx]
        try:
            ds = self.open_fn(source)
        except Exception as err:
            raise MixtureDataError(
                f"source {source.name!r}: cannot open dataset {source.path}: {err}"
            ) from err
        _check_keys(source, ds)
        self._datasets[source_idx] = ds
        if len(self._datasets) > self.max_open_datasets:
            self._datasets.popitem(last=False)
        return ds

    def split_episodes(self, source_idx: int) -> np.ndarray:
        """Episode indices [E] of this dataset's split for a source (held-out set fixed by ``split_seed``)."""
        if self._splits is None:
            self._splits = [self._split_of(i) for i in range(len(self.mixture.sources))]
        return self._splits[source_idx]

    def _split_of(self, source_idx: int) -> np.ndarray:
        source = self.mixture.sources[source_idx]
        n = self.dataset(source_idx).num_episodes
        n_val = source.val_count or (max(1, round(source.val_fraction * n)) if source.val_fraction else 0)
        if n_val >= n:
            raise MixtureDataError(
                f"source {source.name!r}: val_count/val_fraction holds out {n_val} of {n} episodes; "
                "expected at least one training episode"
            )
        rng = np.random.default_rng([self.split_seed, zlib.crc32(source.name.encode())])
        perm = rng.permutation(n)
        return np.sort(perm[:n_val] if self.split == "val" else perm[n_val:])

    def episode(self, source_idx: int, ep: int) -> _Episode:
        """Canonical arrays and valid frames of one episode (LRU of at most ``episode_cache_bytes``; the most
        recent episode is always kept)."""
        key = (source_idx, ep)
        if key in self._episodes:
            self._episodes.move_to_end(key)
            return self._episodes[key]
        source = self.mixture.sources[source_idx]
        ds = self.dataset(source_idx)
        times = np.asarray(ds.read_timestamps(ep), dtype=np.float64)
        state = ds.read_lowdim(ep, source.state.key)
        proprio = source.state_to_canonical(state)
        if source.targets == "action":
            assert source.action is not None
            targets = source.actions_to_canonical(ds.read_lowdim(ep, source.action.key), state)
            target_times = times + 1.0 / ds.fps  # action row i is the pose commanded for the next frame
        else:
            targets, target_times = proprio, times
        valid = anchors.valid_frames(times, proprio, target_times, targets, source.horizon_s)
        task = source.instruction if source.instruction is not None else ds.episode_task(ep)
        episode = _Episode(times, proprio, target_times, targets, valid, task)
        self._episodes[key] = episode
        self._episode_bytes += episode.nbytes
        while self._episode_bytes > self.episode_cache_bytes and len(self._episodes) > 1:
            self._episode_bytes -= self._episodes.popitem(last=False)[1].nbytes
        return episode

    def frames(self, source_idx: int, ep: int, camera: str, frame: int) -> np.ndarray:
        """One decoded frame [H, W, 3] uint8, from the frame cache when it is on (see the module docstring)."""
        key = (source_idx, ep, camera)
        cached = self._frames.get(key)
        if cached is not None:
            return cached[frame]
        ds = self.dataset(source_idx)
        if not self.frame_cache_bytes or self._frame_bytes >= self.frame_cache_bytes:
            return ds.read_frames(ep, camera, [frame])[0]
        whole = ds.read_frames(ep, camera, range(ds.episode_length(ep)))
        if self._frame_bytes + whole.nbytes <= self.frame_cache_bytes:
            self._frames[key] = whole
        self._frame_bytes += whole.nbytes  # counted even when not kept: the cache is full from here on
        return whole[frame]

    def preload_frames(self) -> int:
        """Decode every camera of every episode of this split into the frame cache (up to its cap) now, e.g.
        before DataLoader workers fork. Returns the cached bytes."""
        for i, source in enumerate(self.mixture.sources):
            for ep in self.split_episodes(i):
                for cam in source.cameras:
                    if self._frame_bytes >= self.frame_cache_bytes:
                        return self.cached_frame_bytes
                    self.frames(i, int(ep), cam.key, 0)
        return self.cached_frame_bytes

    @property
    def cached_frame_bytes(self) -> int:
        return sum(v.nbytes for v in self._frames.values())

    # ------------------------------------------------------------ sampling

    def _active_sources(self) -> tuple[np.ndarray, np.ndarray]:
        """Sources with episodes in this split [S'] and their normalised weights [S']."""
        idx = np.array([i for i in range(len(self.mixture.sources)) if len(self.split_episodes(i))])
        if not len(idx):
            raise MixtureDataError(
                f"no source has episodes in split {self.split!r} (set val_fraction/val_count)"
            )
        w = np.array([self.mixture.sources[i].weight for i in idx])
        return idx, w / w.sum()

    def sample(self, shard: int, index: int) -> dict[str, Any]:
        """The raw sample number ``index`` of stream ``shard`` (deterministic)."""
        split_code = SPLITS.index(self.split)
        rng = np.random.default_rng([self.seed, split_code, shard, index])
        active, weights = self._active_sources()
        source_idx = int(active[rng.choice(len(active), p=weights)])
        source = self.mixture.sources[source_idx]
        episodes = self.split_episodes(source_idx)
        for _ in range(MAX_DRAWS):
            ep = int(episodes[rng.integers(len(episodes))])
            frame_draw = rng.random()  # drawn even when the episode is unusable, so streams do not shift
            if (source_idx, ep) in self._bad:
                continue
            frame = None
            try:
                episode = self.episode(source_idx, ep)
                if not len(episode.valid):
                    continue
                frame = int(episode.valid[int(frame_draw * len(episode.valid))])
                sample = self._build(source, source_idx, ep, frame, episode)
                # Random augmentation (colour jitter) is seeded by the stream position too, so it resumes
                # exactly whatever process or DataLoader worker transforms the sample.
                augment = np.random.default_rng([self.seed, split_code, shard, index, AUGMENT_STREAM])
                sample["augment_seed"] = int(augment.integers(2**63))
                return sample
            except Exception as err:
                where = f"episode {ep}" + ("" if frame is None else f", frame {frame}")
                message = f"source {source.name!r}: dataset {source.path}: {where}: {err}"
                if not self.skip_bad_episodes:
                    raise MixtureDataError(message) from err
                logger.warning("skipping bad episode: %s", message)
                self._bad.add((source_idx, ep))
                self.skipped_episodes += 1
        raise MixtureDataError(
            f"source {source.name!r}: dataset {source.path}: no usable episode in {MAX_DRAWS} draws "
            f"(episodes are empty, static over the horizon, or bad)"
        )

    def _build(
        self, source: Source, source_idx: int, ep: int, frame: int, episode: _Episode
    ) -> dict[str, Any]:
        images = [cam.apply(self.frames(source_idx, ep, cam.key, frame)) for cam in source.cameras]
        t = float(episode.times[frame])
        # The trajectory starts at the proprio: action targets then move from the current pose to the first
        # commanded one (for state targets this is the state trajectory itself).
        after = int(np.searchsorted(episode.target_times, t + 1e-9, side="right"))
        end = int(np.searchsorted(episode.target_times, t + source.horizon_s, side="right")) + 1
        targets = anchors.intention_targets(
            np.concatenate([[t], episode.target_times[after:end]]),
            np.concatenate([episode.proprio[frame : frame + 1], episode.targets[after:end]]),
            t,
            source.horizon_s,
            num_arms=source.num_arms,
            rot6d_layout=source.rot6d_layout,
            binary_grippers=source.binary_grippers,
        )
        return {
            "images": images,
            "instruction": episode.task,
            "proprio": episode.proprio[frame].astype(np.float32),
            "domain_id": source.domain_id,
            "missing_views": source.missing_views,
            "action": targets.astype(np.float32),
            "source": source.name,
            # Where the sample comes from, so consumers (replay, debugging) can go back to the raw frame.
            "source_idx": source_idx,
            "episode": ep,
            "frame": frame,
        }

    # ------------------------------------------------------------ iteration and resuming

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if len(self._start) != num_workers and any(self._start):
            raise ValueError(
                f"MixtureDataset state was saved with {len(self._start)} dataloader workers, "
                f"resumed with {num_workers}: expected the same number"
            )
        role = (worker + self._rotation) % num_workers
        index = self._start[role] if len(self._start) == num_workers else 0
        if info is None:
            index += self._yielded  # a second iter() in-process continues the stream
        shard = self.rank * num_workers + role
        while True:
            sample = self.sample(shard, index)
            index += 1
            if info is None:
                self._yielded += 1
            yield sample

    def state_dict(
        self, *, batches: int | None = None, batch_size: int | None = None, num_workers: int = 0
    ) -> dict[str, Any]:
        """Resumable state. With DataLoader workers pass the batches the trainer consumed since this
        dataset's start (or last `load_state_dict`), the batch size and the number of workers."""
        if batches is None:
            if num_workers:
                raise ValueError("state_dict: with dataloader workers, pass batches= and batch_size=")
            consumed, rotation = [self._start[0] + self._yielded], 0
        else:
            if batch_size is None or batch_size <= 0:
                raise ValueError(f"state_dict: batch_size: expected an integer > 0, got {batch_size!r}")
            w = max(1, num_workers)
            start = self._start if len(self._start) == w else [0] * w
            # Batch b came from the worker playing role (b + rotation) % w.
            consumed = [
                start[r] + batch_size * len(range((r - self._rotation) % w, batches, w)) for r in range(w)
            ]
            rotation = (self._rotation + batches) % w
        return {
            "seed": self.seed,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "consumed": consumed,
            "rotation": rotation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "split", "rank", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"MixtureDataset state: {key} is {state.get(key)!r}, this dataset has {getattr(self, key)!r}"
                )
        self._start = [int(c) for c in state["consumed"]]
        self._rotation = int(state["rotation"])
        self._yielded = 0


def _check_keys(source: Source, ds: EpisodeDataset) -> None:
    needed = [("state", source.state.key, ds.lowdim_keys)]
    if source.action is not None and source.targets == "action":
        needed.append(("action", source.action.key, ds.lowdim_keys))
    needed += [(f"cameras[{i}]", c.key, ds.camera_keys) for i, c in enumerate(source.cameras)]
    for name, key, available in needed:
        if key not in available:
            raise MixtureDataError(
                f"source {source.name!r}: {name}: key {key!r} is not in dataset {source.path} (it has {list(available)})"
            )
