"""`xvla experiments smoke` end to end: every cell's files and the summary; a rerun redoes nothing; a cell
with a lost stage, or an interrupted training run, resumes and redoes only what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from xvla.experiments.runner import (
    DONE_FILE,
    RESULTS_FILE,
    TRAIN_FILE,
    RunOptions,
    resolve_cells,
    run_experiment,
)

# The smoke grid trains and evaluates four cells (about 75 s on a busy 2-core machine, then about 25 s more).
pytestmark = pytest.mark.slow

pytest.importorskip("mujoco")
pytest.importorskip("robosuite")
pytest.importorskip("sklearn")

CELLS = ["smoke/xvla/seed_0", "smoke/ablated/seed_0", "smoke/scratch/seed_0", "smoke/two_step/seed_0"]


def options(out: Path) -> RunOptions:
    # simulators in this process: spawning workers costs more than the smoke scale's episodes
    return RunOptions(out=out, device="cpu", workers=1, threads=1, sim_workers=1, progress=False)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    out = tmp_path_factory.mktemp("experiments")
    return out, run_experiment("smoke", options(out))


def mtimes(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_run_writes_every_cell_and_the_summary(grid: tuple[Path, dict[str, list[str]]]) -> None:
    out, done = grid
    assert sorted(done["ran"]) == sorted(CELLS) and done["skipped"] == []
    for key in CELLS:
        folder = out / key
        for name in ("config.json", TRAIN_FILE, RESULTS_FILE, DONE_FILE, "prompts.json"):
            assert (folder / name).is_file(), (key, name)
        results = json.loads((folder / RESULTS_FILE).read_text())
        assert results["curve"] and all(p["success"] for p in results["curve"])
    xvla = json.loads((out / "smoke/xvla/seed_0" / RESULTS_FILE).read_text())
    assert [p["step"] for p in xvla["curve"]] == [2, 4]  # the intermediate and the final checkpoint
    assert set(xvla["curve"][-1]["validation"]) == {"mw_sawyer", "rs_panda"}
    assert set(xvla["prompts"]["domains"]) == {"mw_sawyer", "rs_panda"}
    adapted = json.loads((out / "smoke/two_step/seed_0" / RESULTS_FILE).read_text())
    assert [p["step"] for p in adapted["curve"]] == [0, 2, 4]  # before adaptation, then the learning curve
    assert adapted["train"]["base_checkpoint"] == xvla["train"]["checkpoint"]
    # the ablated arm: one shared domain, no prompts, next-frame horizons, weights in proportion to frames
    mixture = json.loads((out / "smoke/ablated/seed_0/mixtures/pretrain.json").read_text())["sources"]
    assert {s["domain_id"] for s in mixture} == {0}
    assert {s["name"]: s["horizon_s"] for s in mixture} == {"mw_sawyer": 30 / 80, "rs_panda": 30 / 20}
    assert all(s["weight"] > 2 for s in mixture)  # frames, not 1.0
    assert "domains" not in json.loads((out / "smoke/ablated/seed_0/prompts.json").read_text())  # no prompts
    summary = json.loads((out / "smoke/summary.json").read_text())
    assert summary["cells"] == {"finished": 4, "total": 4}
    assert set(summary["arms"]) == {f"smoke/{a}" for a in ("xvla", "ablated", "two_step", "scratch")}
    assert summary["proxy"]["points"] and "rho" in summary["proxy"]["flow_loss"]
    assert set(summary["proxy"]["per_source"]) == {p["source"] for p in summary["proxy"]["points"]}
    assert set(summary["prompts"]) == {"smoke/xvla/seed_0", "smoke/two_step/seed_0"}
    text = (out / "smoke/summary.md").read_text()
    assert "| smoke/xvla | pretrain | 1 | mw_sawyer |" in text
    assert "validation flow_loss vs success over" in text
    for plot in ("final_success.png", "learning_curves.png", "proxy.png", "prompts_smoke_xvla_seed_0.png"):
        assert (out / "smoke/plots" / plot).stat().st_size > 0


def test_a_second_run_redoes_nothing(grid: tuple[Path, dict[str, list[str]]]) -> None:
    out, _ = grid
    before = {key: mtimes(out / key) for key in CELLS}
    again = run_experiment("smoke", options(out))
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(CELLS)
    assert {key: mtimes(out / key) for key in CELLS} == before


def test_a_cell_that_lost_a_stage_redoes_only_that_stage(grid: tuple[Path, dict[str, list[str]]]) -> None:
    out, _ = grid
    folder = out / "smoke/two_step/seed_0"
    final_eval = folder / "eval" / "step_00000004.json"
    for lost in (folder / DONE_FILE, folder / RESULTS_FILE, final_eval):
        lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (folder / TRAIN_FILE, folder / "eval" / "step_00000002.json")}
    again = run_experiment("smoke", options(out))
    assert again["ran"] == ["smoke/two_step/seed_0"]
    assert final_eval.is_file() and (folder / DONE_FILE).is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # training and the other evaluation: not redone


def test_an_interrupted_training_run_resumes_from_its_checkpoint(
    grid: tuple[Path, dict[str, list[str]]],
) -> None:
    out, _ = grid
    (cell,) = resolve_cells("smoke", arms=["scratch"])
    folder = cell.folder(out)
    run = folder / "scratch"
    # as if killed between the step-2 and the step-4 checkpoint
    for lost in (folder / DONE_FILE, folder / RESULTS_FILE, folder / TRAIN_FILE):
        lost.unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(folder / "eval")
    first = run / "checkpoints" / "step_00000002" / "model.safetensors"
    kept = first.stat().st_mtime_ns
    again = run_experiment("smoke", options(out))
    assert again["ran"] == ["smoke/scratch/seed_0"]
    assert first.stat().st_mtime_ns == kept  # steps 1-2 were not trained again
    assert (run / "checkpoints" / "step_00000004").is_dir()
    history = json.loads((run / "history.json").read_text())
    assert history["step"][-1] == 4
    results = json.loads((folder / RESULTS_FILE).read_text())
    assert [p["step"] for p in results["curve"]] == [2, 4]


def test_cells_side_by_side_in_worker_processes(
    grid: tuple[Path, dict[str, list[str]]], tmp_path: Path
) -> None:
    out, _ = grid
    shutil.copytree(out / "data", tmp_path / "data")  # the generated datasets: generation is not under test
    parallel = RunOptions(out=tmp_path, device="cpu", workers=2, threads=1, sim_workers=1, progress=False)
    done = run_experiment("smoke", parallel, arms=["xvla", "ablated"])
    assert sorted(done["ran"]) == ["smoke/ablated/seed_0", "smoke/xvla/seed_0"]
    for key in done["ran"]:
        assert (tmp_path / key / DONE_FILE).is_file()
    # one thread per cell and the same seeds: the same training as the cells run one by one
    for key in done["ran"]:
        ours = json.loads((tmp_path / key / TRAIN_FILE).read_text())["final_loss"]
        assert ours == json.loads((out / key / TRAIN_FILE).read_text())["final_loss"]
