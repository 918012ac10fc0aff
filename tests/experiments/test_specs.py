"""`xvla.experiments.specs` and the grid the runner resolves from them (no training here)."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

import pytest

from xvla.demo.config import DemoConfig
from xvla.experiments.runner import LOCK_FILE, Cell, RunOptions, claim, data_dirs, resolve_cells, run_cell
from xvla.experiments.specs import EXPERIMENTS, Arm, ExperimentSpec, get_experiment


def test_registry_has_the_issues_experiments() -> None:
    assert {"pretraining", "adaptation", "prompts", "proxy", "smoke"} <= set(EXPERIMENTS)
    assert [a.name for a in EXPERIMENTS["pretraining"].arms] == [
        "shared_heads",
        "domain_heads",
        "xvla",
        "next_frames",
        "frame_sampling",
    ]
    assert all(len(s.seeds) >= 3 for n, s in EXPERIMENTS.items() if n != "smoke")


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_resolves_to_valid_cells(name: str) -> None:
    cells = resolve_cells(name)  # builds every DemoConfig: overrides are checked here
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys)) and keys
    for i, cell in enumerate(cells):
        if cell.base is not None:
            assert keys.index(cell.base.key) < i  # a base cell comes before the adaptation that needs it


def test_pretraining_arms_differ_only_in_their_option() -> None:
    cells = {c.arm.name: c.config for c in resolve_cells("pretraining", seeds=[0])}
    xvla = cells["xvla"]
    assert cells["shared_heads"].pretrain_domains == "shared"
    assert cells["shared_heads"].model_overrides["head"] == {"len_soft_prompts": 0}
    assert cells["domain_heads"].replace(model_overrides=xvla.model_overrides) == xvla
    assert cells["next_frames"].replace(targets="anchors") == xvla
    assert cells["frame_sampling"].replace(sampling="balanced") == xvla
    # same compute per arm
    assert len({(c.pretrain_steps, c.batch_size) for c in cells.values()}) == 1


def test_two_views_arm_adds_the_second_panda_view_to_xvla_only() -> None:
    """`prompts/xvla_two_views` is X-VLA (c) plus `rs_panda_side`; the demo's default sources stay as they were."""
    (cell,) = resolve_cells("prompts", seeds=[0], arms=["xvla_two_views"])
    xvla = {c.arm.name: c.config for c in resolve_cells("pretraining", seeds=[0])}["xvla"]
    assert cell.config.pretrain_sources == (*xvla.pretrain_sources, "rs_panda_side:Lift")
    assert cell.config.replace(pretrain_sources=xvla.pretrain_sources) == xvla
    assert "rs_panda_side" not in DemoConfig().pretrain_names and "rs_panda" in DemoConfig().pretrain_names
    # without --arms the grid also holds every pre-training and adaptation cell
    keys = [c.key for c in resolve_cells("prompts", seeds=[0])]
    assert keys[-1] == "prompts/xvla_two_views/seed_0" and "pretraining/xvla/seed_0" in keys


def test_adaptation_cells_inherit_their_base_and_count_demonstrations() -> None:
    cells = {c.key: c for c in resolve_cells("adaptation", seeds=[1])}
    lora = cells["adaptation/prompt_heads_lora-n5/seed_1"]
    assert lora.base is not None and lora.base.key == "pretraining/xvla/seed_1"
    assert lora.config.adapt_mode == "lora" and lora.config.seed == 1
    assert lora.config.heldout_episodes == 5 + lora.config.val_episodes  # 5 demonstrations to train on
    shared = cells["adaptation/from_shared_heads-n20/seed_1"]
    assert shared.config.pretrain_domains == "shared"  # the base's options come along
    assert cells["adaptation/scratch-n20/seed_1"].base is None
    out = Path("/o")
    assert data_dirs(lora, out)[0] == data_dirs(shared, out)[0] == out / "data/default/seed_1/pretrain"
    assert data_dirs(lora, out)[1] != data_dirs(shared, out)[1]  # 5 vs 20 demonstrations: two folders


def test_chosen_arms_bring_only_the_base_cells_they_need() -> None:
    cells = resolve_cells("adaptation", seeds=[0], arms=["from_shared_heads-n20", "prompt_heads_last-n20"])
    assert [c.key for c in cells] == [
        "pretraining/shared_heads/seed_0",
        "adaptation/from_shared_heads-n20/seed_0",
        "pretraining/xvla/seed_0",
        "adaptation/prompt_heads_last-n20/seed_0",
    ]
    assert cells[-1].config.adapt_mode == "last_layer"
    # without --arms the included experiments' cells all come along
    assert len(resolve_cells("adaptation", seeds=[0])) == len(EXPERIMENTS["pretraining"].arms) + len(
        EXPERIMENTS["adaptation"].arms
    )


def test_seeds_and_scale_override_the_spec() -> None:
    cells = resolve_cells("smoke", scale="default", seeds=[3, 4], arms=["xvla"])
    assert [c.key for c in cells] == ["smoke/xvla/seed_3", "smoke/xvla/seed_4"]
    assert {c.config.scale for c in cells} == {"default"}


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"experiment: unknown 'nope'; expected one of \['adaptation'"):
        get_experiment("nope")
    with pytest.raises(ValueError, match=r"experiment 'smoke' has no arm 'foo'; its arms: \['xvla'"):
        resolve_cells("smoke", arms=["foo"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a/b"}, "Arm.name: expected letters"),
        ({"name": "a", "kind": "adapt"}, "base: required for"),
        ({"name": "a", "base": "x"}, "base: required for"),
        ({"name": "a", "kind": "scratch", "demonstrations": 0}, "demonstrations: expected an integer >= 1"),
        ({"name": "a", "demonstrations": 3}, "demonstrations"),
    ],
)
def test_arm_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Arm(**kwargs)  # type: ignore[arg-type]


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="names must be unique"):
        ExperimentSpec("e", "", (Arm("a"), Arm("a")))
    with pytest.raises(ValueError, match="analyses: unknown"):
        ExperimentSpec("e", "", (), analyses=("plots",))  # type: ignore[arg-type]


def test_claim_refuses_a_folder_of_another_configuration(tmp_path: Path) -> None:
    (cell,) = resolve_cells("smoke", arms=["xvla"])
    claim(cell, tmp_path)
    claim(cell, tmp_path)  # the same cell again: fine
    (other,) = resolve_cells("smoke", scale="default", seeds=[0], arms=["xvla"])
    with pytest.raises(
        ValueError, match=r"another configuration \(differs in demo, demo\.adapt_prompt_steps"
    ):
        claim(other, tmp_path)


def _claimed_without(field: str, out: Path) -> tuple[Cell, Path, dict[str, Any]]:
    """A claimed smoke cell whose stored config.json lacks DemoConfig `field`, as a cell run before it existed."""
    (cell,) = resolve_cells("smoke", arms=["xvla"])
    claim(cell, out)
    path = cell.folder(out) / "config.json"
    stored = json.loads(path.read_text())
    del stored["demo"][field]
    path.write_text(json.dumps(stored))
    return cell, path, stored


def test_claim_accepts_a_cell_from_before_a_field_was_added(tmp_path: Path) -> None:
    # A cell run before DemoConfig.noise_scale existed: its config.json lacks the field, whose default is the
    # behaviour the cell ran with; a rerun must resume it, not refuse it.
    cell, path, stored = _claimed_without("noise_scale", tmp_path)
    claim(cell, tmp_path)
    stored["demo"]["sample_steps"] = 3  # a field the cell did set differently is still a different cell
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"differs in demo, demo\.sample_steps\)"):
        claim(cell, tmp_path)


def test_a_field_added_with_a_new_default_reads_as_the_old_behaviour(tmp_path: Path) -> None:
    # Before DemoConfig.gripper_close_at existed every cell closed binary grippers at 0.5; the default is now 0.1,
    # so an old cell is not the default cell and must not be resumed as one.
    cell, _, _ = _claimed_without("gripper_close_at", tmp_path)
    with pytest.raises(ValueError, match=r"differs in demo, demo\.gripper_close_at\)"):
        claim(cell, tmp_path)


def test_a_cell_another_process_runs_is_refused(tmp_path: Path) -> None:
    (cell,) = resolve_cells("smoke", arms=["xvla"])
    folder = cell.folder(tmp_path)
    folder.mkdir(parents=True)
    opts = RunOptions(out=tmp_path, device="cpu", workers=1, threads=1, sim_workers=1, progress=False)
    with open(folder / LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's runner, as far as flock can tell
        with pytest.raises(RuntimeError, match=r"cell smoke/xvla/seed_0: another process is running it"):
            run_cell(cell, opts)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing was started
