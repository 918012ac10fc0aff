"""`xvla.demo.stages`: one `--scale smoke` run end to end, --skip-generate errors, learning-curve steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xvla.configio import ConfigError
from xvla.demo import SCALES, stages
from xvla.demo.stages import Runtime

from .results_helpers import RESULT_KEYS, SUMMARY_KEYS


def test_smoke_run_writes_report_results_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("mujoco")
    pytest.importorskip("robosuite")
    from xvla.demo import main

    out = tmp_path / "demo"
    args = [
        "--scale",
        "smoke",
        "--out",
        str(out),
        "--workers",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--train-processes",  # every training stage as two DDP processes (torchrun, gloo)
        "2",
        "--no-progress",
        "--set",
        "source_weights.rs_panda=3",
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    cfg = SCALES["smoke"]
    held = cfg.heldout_name
    assert set(results["heldout_eval"]) == {"untrained", "pre_adaptation", "adapted", "scratch"}
    for summary in results["heldout_eval"].values():
        assert set(summary) >= SUMMARY_KEYS and summary["episodes"] == cfg.eval_episodes
    # the learning curve: the intermediate checkpoint (step 2 of 4), then the final one, per pre-training source
    assert set(results["learning_curve"]) == set(cfg.pretrain_names)
    assert all([p["step"] for p in points] == [2, 4] for points in results["learning_curve"].values())
    assert results["machine"]["train_processes"] == 2
    # each process trained half of every batch, in lockstep
    for run, steps in (
        ("pretrain", cfg.pretrain_steps),
        ("adapt", cfg.adapt_steps),
        ("scratch", cfg.adapt_steps),
    ):
        folder = out / run / "checkpoints" / f"step_{steps:08d}"
        assert sorted(p.name for p in (folder / "training_state").glob("rank_*.pt")) == [
            "rank_0.pt",
            "rank_1.pt",
        ]
        assert json.loads((out / run / "train_config.json").read_text())["batch_size"] == cfg.batch_size // 2
    assert set(results["data"]) == {*cfg.pretrain_names, held}
    weights = {
        s["name"]: s["weight"]
        for s in json.loads((out / "mixtures" / "pretrain.json").read_text())["sources"]
    }
    assert weights == {"mw_sawyer": 1.0, "rs_panda": 3.0}
    assert set(results["pretrain"]["validation"]["per_source"]) == set(cfg.pretrain_names)
    assert set(results["oracle"]) == {*cfg.pretrain_names, held}
    assert results["adapt"]["domain_id"] == len(cfg.pretrain_names)  # a new domain after the trained ones
    assert results["adapt"]["init_from"] in cfg.pretrain_names
    assert set(results["soft_prompts"]["domains"]) == {*cfg.pretrain_names, held}
    assert set(results["timing_s"]) == {
        "generate",
        "oracle",
        "pretrain",
        "adapt",
        "evaluate",
        "report",
        "total",
    }
    report = (out / "report.md").read_text()
    assert "## Closed-loop success" in report and "95% CI" in report
    for plot in ("loss_per_source.png", "success_rates.png", "soft_prompts_pca.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    assert list((out / "videos").rglob("*.mp4"))

    # --resume continues the same run: the finished training stages are not trained again, the evaluation of the
    # same checkpoints gives the same counts
    trained = {run: (out / run / "history.json").stat().st_mtime_ns for run in stages.TRAINING_FOLDERS}
    assert main([*args, "--resume"]) == 0
    assert {
        run: (out / run / "history.json").stat().st_mtime_ns for run in stages.TRAINING_FOLDERS
    } == trained
    again = json.loads((out / "results.json").read_text())
    for group in ("heldout_eval", "pretrain_eval"):
        assert {k: v["successes"] for k, v in again[group].items()} == {
            k: v["successes"] for k, v in results[group].items()
        }


def test_resume_needs_the_run_of_the_same_settings(tmp_path: Path) -> None:
    cfg = SCALES["smoke"]
    with pytest.raises(ConfigError, match="holds no demo run to continue"):
        stages.check_resumable(cfg, tmp_path)
    (tmp_path / stages.CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))
    stages.check_resumable(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"other settings \(lr, seed differ\)"):
        stages.check_resumable(cfg.replace(seed=3, lr=5e-4), tmp_path)


def test_skip_generate_without_data_names_the_missing_source(tmp_path: Path) -> None:
    pytest.importorskip("mujoco")
    from xvla.demo.stages import generate_data

    rt = Runtime(
        out=tmp_path,
        data=tmp_path / "data",
        device="cpu",
        workers=1,
        threads=1,
        skip_generate=True,
        progress=False,
    )
    with pytest.raises(FileNotFoundError, match="--skip-generate: no generated dataset for 'mw_sawyer'"):
        generate_data(SCALES["smoke"], rt)


def test_training_processes_need_the_cpu_and_a_batch_they_split() -> None:
    common = {"out": Path("o"), "data": Path("d"), "workers": 1, "threads": 1}
    with pytest.raises(ValueError, match="train_processes: expected 1, or more on device cpu; got 2 on cuda"):
        Runtime(device="cuda", train_processes=2, **common)
    rt = Runtime(device="cpu", train_processes=3, **common)
    with pytest.raises(ConfigError, match="batch_size: 32 does not split over 3 training processes"):
        stages.train_config(
            SCALES["default"],
            rt,
            output=Path("o"),
            model={},
            mixture=Path("m"),
            steps=4,
            lr=1e-3,
            prompt_steps=0,
        )


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_every_training_run_takes_the_demo_precision(precision: str) -> None:
    rt = Runtime(out=Path("o"), data=Path("d"), device="cpu", workers=1, threads=1, train_processes=2)
    cfg = SCALES["default"].replace(precision=precision)
    tcfg = stages.train_config(
        cfg, rt, output=Path("o"), model={}, mixture=Path("m"), steps=4, lr=1e-3, prompt_steps=0
    )
    assert tcfg.precision == precision and tcfg.batch_size == cfg.batch_size // 2


def test_learning_curve_steps_split_pretraining_evenly() -> None:
    cfg = SCALES["default"].replace(pretrain_steps=1200, curve_points=2)
    assert stages.curve_steps(cfg) == [400, 800]
    assert stages.curve_steps(cfg.replace(curve_points=0)) == []
    assert stages.curve_steps(cfg.replace(pretrain_steps=7, curve_points=1)) == [3]  # checkpoints at 3, 6, 7
    with pytest.raises(ValueError, match="curve_points"):
        SCALES["default"].replace(pretrain_steps=3, curve_points=3)


def test_eval_jobs_serve_the_binary_grippers_with_the_scale_threshold() -> None:
    from xvla.data.sources import Source
    from xvla.sim.suite import entry

    rt = Runtime(out=Path("o"), data=Path("d"), device="cpu", workers=1, threads=1)
    source = entry("rs_kinova3").source("d/rs_kinova3")
    cfg = SCALES["smoke"].replace(gripper_close_at=0.2)
    (job,) = stages.eval_jobs(cfg, rt, source, ["Lift"], "ckpt", episodes=3)
    served = Source.from_dict(job.options["source"])
    assert [a.gripper_convention.close_at for a in served.action.arms] == [0.2]  # type: ignore[union-attr]
    assert served.state == source.state
    with pytest.raises(ValueError, match="gripper_close_at"):
        SCALES["smoke"].replace(gripper_close_at=1.0)
