"""`xvla experiments`: the paper's findings reproduced in miniature, one command each.

Modules: `specs` (Arm, ExperimentSpec, the registry `EXPERIMENTS`), `runner` (cells: one folder per arm x seed,
resumable, built from `xvla.demo.stages`), `analysis` (prompt projections, validation error as a proxy),
`summary` (summary.json, summary.md, plots from whatever cells finished), `cli` (`xvla experiments`).
"""

from xvla.experiments.specs import EXPERIMENTS, Arm, ExperimentSpec, get_experiment

__all__ = ["EXPERIMENTS", "Arm", "ExperimentSpec", "get_experiment"]
