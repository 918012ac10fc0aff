"""`xvla.demo.report`: report.md and plots drawn from synthetic results."""

from __future__ import annotations

import json
from pathlib import Path

from xvla.demo import report, write_report

from .results_helpers import synthetic_results


def test_report_and_plots_from_synthetic_results(tmp_path: Path) -> None:
    results = synthetic_results()
    report = write_report(results, tmp_path)
    text = report.read_text()
    for needle in (
        "45% (9/20; 95% CI 10-90%)",
        "| rs_panda | 4 |",
        "## Learned soft prompts",
        "2 CPU cores, AVX2 kernels",
        "21:40",
        "| rs_panda | 1/5 | 3/4 |",
        "| rs_panda | 75% (3/4; 95% CI 10-90%) | reach 4, grasp 3 of 4 |",
        "Wall-time target of this scale: 25:00, met.",
    ):
        assert needle in text, needle
    for plot in ("loss_per_source.png", "success_rates.png", "soft_prompts_pca.png", "learning_curve.png"):
        path = tmp_path / "plots" / plot
        assert path.stat().st_size > 5000 and f"plots/{plot}" in text
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_report_says_when_the_wall_time_target_is_missed() -> None:
    assert report.target_line(1500, 1600) == [
        "Wall-time target of this scale: 25:00, **missed** by 1:40.",
        "",
    ]
    assert report.target_line(None, 1600) == []


def test_report_of_an_adaptation_from_a_random_domain(tmp_path: Path) -> None:
    results = synthetic_results()
    results["config"]["adapt_init"] = "scratch"
    results["adapt"].update(init_from=None, init_domain_id=None, retrieval=[])
    del results["heldout_eval"]["pre_adaptation"]  # a random new domain has no pre-adaptation condition
    text = write_report(results, tmp_path).read_text()
    assert (
        "initialised at random (init `scratch`)" in text
        and "None" not in text.split("## Adaptation")[1][:200]
    )
