"""How a run spreads over processes, on Hugging Face `accelerate` (the same code on CPU, one GPU, DDP and FSDP,
one or many nodes): the `Accelerator`, each process's data loader over its shard of the mixture, and the launcher
of a data-parallel run on this machine's CPU cores.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType, ProjectConfiguration, send_to_device
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

import xvla
from xvla.configio import ConfigError, save_config
from xvla.data.mixture import MixtureDataset
from xvla.data.sources import Mixture
from xvla.data.transforms import ObservationTransform, collate
from xvla.devices import cpu_has_bf16
from xvla.model.fast.training import LAYER_CLASSES  # the repeated layers: FSDP units
from xvla.processes import run_process_group
from xvla.train.checkpointing import checkpoint_path
from xvla.train.config import AdaptConfig, TrainConfig
from xvla.train.job import Job

log = logging.getLogger(__name__)
# DaViT's depthwise convolutions return their weight gradients channels-last while DDP's buckets are contiguous:
# DDP copies those few kilobytes each step and says so in a warning on every rank.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def make_accelerator(cfg: TrainConfig, *, partial_training: bool) -> Accelerator:
    """bf16 autocast on GPU (fp32 master weights), DDP or FSDP from the launcher's environment.

    `partial_training`: some parameters are frozen for part of the run; DDP must then skip parameters that
    get no gradient (find_unused_parameters), FSDP must keep original parameters (use_orig_params).
    """
    # Without a GPU, accelerate must be told `cpu`: otherwise it ignores the launcher and every torchrun
    # process trains alone, all writing into one output folder.
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":  # on CPU bf16 only with bf16 instructions (docs/training.md, "Precision")
        precision = "bf16" if not on_cpu or cpu_has_bf16() else "no"
    log.info("mixed precision: %s", precision)
    fsdp = None
    if cfg.fsdp:
        if on_cpu:
            raise ConfigError("fsdp: needs GPUs (accelerate's FSDP has no CPU backend); use DDP on CPU")
        fsdp = fsdp_plugin(cfg)
    trackers: list[str] = []
    if cfg.log.tensorboard:
        trackers.append("tensorboard")
    if cfg.log.wandb and _wandb_available():
        trackers.append("wandb")
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=partial_training)],
        fsdp_plugin=fsdp,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard")
        ),
    )
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))  # set by torchrun/accelerate
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate joined "
            f"{accelerator.num_processes}: each would train alone into {cfg.output_dir}"
        )
    return accelerator


def fsdp_plugin(cfg: TrainConfig) -> FullyShardedDataParallelPlugin:
    """FULL_SHARD with each repeated layer (vision stage block, encoder layer, head block) as one unit."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=1,
        reshard_after_forward="FULL_SHARD",
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(LAYER_CLASSES),
        use_orig_params=True,
        state_dict_type="FULL_STATE_DICT",
        activation_checkpointing=cfg.model.activation_checkpointing,
        sync_module_states=True,
    )


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        log.warning("log.wandb is set but wandb is not installed; logging to TensorBoard only")
        return False
    return True


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def launch_cpu(cfg: TrainConfig | AdaptConfig, *, processes: int, threads: int, resume: bool = False) -> Path:
    """Run `xvla train` (a TrainConfig) or `xvla adapt` (an AdaptConfig) on `cfg` as `processes` data-parallel
    processes on this machine's CPU (torchrun, DDP over gloo, `threads` torch threads each) and wait; returns the
    final checkpoint folder.

    `cfg.batch_size` is per process. On a small CPU one single-threaded process per core trains faster than one
    process using every core (docs/performance.md): a model this size leaves intra-op threads idle.
    """
    command, train_cfg = ("adapt", cfg.train) if isinstance(cfg, AdaptConfig) else ("train", cfg)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        # The children import this same xvla, installed or not.
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(xvla.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p
        ),
    }
    with tempfile.TemporaryDirectory(prefix="xvla-launch-") as tmp:
        config = Path(tmp) / f"{command}.json"
        save_config(cfg, config)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "xvla.cli",
            command,
            str(config),
            *(["--resume"] if resume else []),
        ]
        code = run_process_group(cmd, env)
    if code != 0:
        raise RuntimeError(
            f"xvla {command} in {processes} processes failed (exit code {code}); its error is printed above"
        )
    return checkpoint_path(train_cfg.output_dir, train_cfg.steps)


# ------------------------------------------------------------------------------------------------------- data
class TransformedStream(IterableDataset):
    """`MixtureDataset` raw samples -> transformed model-batch entries (in the DataLoader workers).

    Colour jitter draws from a generator seeded by the sample's `augment_seed` (a function of its position in
    the stream), so resuming is exact with or without workers.
    """

    def __init__(self, dataset: MixtureDataset, transform: ObservationTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for raw in self.dataset:
            yield self.transform(raw, torch.Generator().manual_seed(raw["augment_seed"]))


def make_loader(
    job: Job, cfg: TrainConfig, accelerator: Accelerator, *, mixture: Mixture, split: str
) -> tuple[MixtureDataset, DataLoader]:
    """Per-process loader over `mixture` (the dataset shards itself by rank x worker)."""
    train = split == "train"
    dataset = MixtureDataset(
        mixture,
        split=split,
        seed=cfg.data.seed,
        split_seed=cfg.data.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        frame_cache_bytes=int(cfg.data.frame_cache_gib * 2**30),
    )
    workers = cfg.data.num_workers if train else 0
    if train and dataset.frame_cache_bytes:
        # Decode now, not during the first steps: before workers fork, so that they share one copy, and without
        # workers so that the logged samples/s is the steady rate (the decoding is the same work either way).
        t0 = time.perf_counter()
        cached = dataset.preload_frames()
        log.info(
            "decoded %.2f GiB of frames into the cache in %.1f s", cached / 2**30, time.perf_counter() - t0
        )
    loader = DataLoader(
        TransformedStream(
            dataset,
            ObservationTransform(job.xvla.config, job.tokenizer, train=train, augment=cfg.data.augment),
        ),
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=workers > 0,
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(cfg.data.seed * 1000 + accelerator.process_index),
    )
    return dataset, loader


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    """The tensors of a collated batch, on `device` (its other entries are left out)."""
    return send_to_device(
        {k: v for k, v in batch.items() if isinstance(v, Tensor)}, device, non_blocking=True
    )
