"""Shared test helpers: the location of ../shared fixtures, skipping with a clear reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XVLA_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")


def fixture_dir(name: str) -> Path:
    """Path of a shared fixture; skips the test with a reason when this clone has no ../shared."""
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"shared fixture {name!r} not found at {path} (clone has no ../shared; set XVLA_SHARED)")
    return path
