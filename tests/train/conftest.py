"""Fixtures for training tests (tests/train is a package, so this file never shadows tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xvla.train.trainer import train

from .helpers import arc_datasets, make_config, mixture

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return arc_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory, datasets: dict[str, Path]) -> Path:
    """A checkpoint trained on source arc_a only (domain 0 of 4)."""

    out = tmp_path_factory.mktemp("base") / "run"
    cfg = make_config(
        out, mixture(datasets, ("arc_a",)), ("steps=4", "val.every=0", "optim.prompt_warmup_steps=0")
    )
    return train(cfg)
