"""A tiny generated suite shared by the simulation tests (2 episodes per source, 32 px images)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixture file of a freshly generated suite with every source."""
    from xvla.sim.generate import generate_suite

    out = tmp_path_factory.mktemp("suite")
    return generate_suite(["all"], episodes=2, out=out, workers=1, image_size=32, seed=0, progress=False)


@pytest.fixture(scope="session")
def random_demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `demo`-preset checkpoint with random weights (seed 0) and the builtin tokenizer, no sources.json."""
    import torch

    from xvla.config import get_preset
    from xvla.model.tokenizer import build_tokenizer
    from xvla.model.xvla import XVLA

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("sim_ckpt") / "ckpt"
    config = get_preset("demo")
    XVLA(config).save_pretrained(folder)
    build_tokenizer(folder, vocab_size=config.text.vocab_size)
    return folder
