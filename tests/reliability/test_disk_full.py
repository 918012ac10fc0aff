"""A full disk while writing a checkpoint: one line naming the step, the folder and the last complete checkpoint;
the partial folder removed; the previous checkpoint intact (issue 14 D9)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from train.helpers import arc_datasets, make_config, mixture
from xvla.cli import main
from xvla.configio import to_dict
from xvla.model import checkpoint as model_checkpoint
from xvla.model.xvla import XVLA
from xvla.train import checkpointing
from xvla.train.trainer import train


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return arc_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory, datasets: dict[str, Path]) -> Path:
    """A finished 3-step run (one checkpoint) that the tests copy and resume to step 6."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("three") / "run"
    train(make_config(out, mixture(datasets), ("steps=3", "val.every=0")))
    return out


def _resume_config(out: Path, datasets: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(to_dict(make_config(out, mixture(datasets), ("steps=6", "val.every=0")))))
    return path


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _check_left_behind(out: Path) -> None:
    root = out / checkpointing.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]  # no partial, no temporary
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]
    XVLA.from_pretrained(root / "step_00000003")  # the previous checkpoint is intact


@pytest.mark.parametrize("where", ["optimizer", "weights", "rank_state"])
def test_no_space_is_one_line_and_removes_the_partial_folder(
    where: str,
    tmp_path: Path,
    datasets: dict[str, Path],
    three_steps: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    config = _resume_config(out, datasets, tmp_path)
    if where == "optimizer":  # the first torch.save of the training state
        real_save = torch.save

        def save(obj: object, path: object, *args: object, **kwargs: object) -> None:
            if str(path).endswith("optimizer.pt"):
                _no_space()
            real_save(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    elif where == "weights":  # inside save_pretrained, whose own temporary folder must go too
        monkeypatch.setattr(model_checkpoint, "save_file", _no_space)
    else:  # the last file written, by every rank
        monkeypatch.setattr(checkpointing, "save_rank_state", _no_space)
    assert main(["train", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    last = checkpointing.checkpoint_path(out, 3)
    assert err == (
        f"xvla train: error: no space left while writing checkpoint 6 to {out / 'checkpoints'}; "
        f"last complete checkpoint 3 ({last})\n"
    )
    _check_left_behind(out)


def test_other_write_errors_name_the_cause(
    tmp_path: Path, datasets: dict[str, Path], three_steps: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpointing, "save_rank_state", read_only)
    cfg = make_config(out, mixture(datasets), ("steps=6", "val.every=0"))
    with pytest.raises(checkpointing.CheckpointWriteError, match=r"^writing checkpoint 6 to .* failed \("):
        train(cfg, resume=True)
    _check_left_behind(out)


@pytest.fixture
def small_disk(tmp_path: Path, three_steps: Path) -> Iterator[Path]:
    """A tmpfs that holds one checkpoint of the run but not two (root only)."""
    size = sum(p.stat().st_size for p in three_steps.rglob("*") if p.is_file())
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {err}")
    try:
        yield mount
    finally:
        # lazily: a failed run's traceback may still hold a file open on it
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_a_real_full_disk(
    small_disk: Path,
    tmp_path: Path,
    datasets: dict[str, Path],
    three_steps: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """torch's zip writer reports a full disk without an errno ("unexpected pos"): the free space tells."""
    out = small_disk / "run"
    shutil.copytree(three_steps, out)
    assert main(["train", str(_resume_config(out, datasets, tmp_path)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xvla train: error: no space left while writing checkpoint 6 to ")
    assert err.endswith(f"; last complete checkpoint 3 ({checkpointing.checkpoint_path(out, 3)})\n")
    _check_left_behind(out)
