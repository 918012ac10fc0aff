"""xvla.sim: the built-in multi-robot simulation suite (scripted experts, data generation, evaluation).

Importing any `xvla.sim` module first runs this file, which picks the headless GL backend before MuJoCo can
be imported: EGL (Mesa llvmpipe) rendering in the calling thread, so N worker processes on N cores do not
fight over render threads. Set MUJOCO_GL / LP_NUM_THREADS yourself to override.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ.setdefault("LP_NUM_THREADS", "0")

_API = {
    "generate_suite": "xvla.sim.generate",
    "evaluate": "xvla.sim.evaluate",
    "oracle_check": "xvla.sim.evaluate",
    "SUITE": "xvla.sim.suite",
}


def __getattr__(name: str) -> object:
    """Lazy public API (`xvla.sim.generate_suite`, `evaluate`, `oracle_check`, `SUITE`)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'xvla.sim' has no attribute {name!r}")
