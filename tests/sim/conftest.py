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
