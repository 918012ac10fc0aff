"""`xvla train` / `xvla adapt` command lines: overrides, clear errors, TensorBoard output, EMA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from torch._utils import ExceptionWrapper

from xvla.cli import main
from xvla.configio import to_dict
from xvla.data.mixture import MixtureDataError
from xvla.model.xvla import XVLA
from xvla.train.checkpointing import STATE, checkpoint_path
from xvla.train.cli import one_line

from .helpers import adapt_config, make_config, mixture, source_dict, write_dataset


def test_train_cli_with_overrides_tensorboard_and_ema(tmp_path, datasets, capsys):
    cfg = make_config(
        tmp_path / "run", mixture(datasets), ("log.tensorboard=true", "checkpoint.ema_decay=0.9")
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    code = main(["train", str(tmp_path / "run.yaml"), "--override", "steps=3", "grad_accum=2", "val.every=0"])
    assert code == 0
    final = checkpoint_path(tmp_path / "run", 3)
    assert f"final checkpoint: {final}" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["steps"] == 3 and saved["grad_accum"] == 2
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    # with EMA the servable weights are the average; the raw weights sit in training_state for resuming
    ema, raw = XVLA.from_pretrained(final).state_dict(), (final / STATE / "model.pt")
    assert raw.is_file() and (final / STATE / "ema.pt").is_file()
    raw_state = torch.load(raw, weights_only=True)
    assert any(not torch.equal(ema[k], raw_state[k]) for k in ema)


def test_cli_errors_are_one_line(tmp_path, datasets, capsys):
    (tmp_path / "run.json").write_text(json.dumps(to_dict(make_config(tmp_path / "run", mixture(datasets)))))
    assert main(["train", str(tmp_path / "run.json"), "-o", "optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'; did you mean lr?" in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_adapt_cli_shortcuts(tmp_path, datasets, base_checkpoint, capsys):
    cfg = adapt_config(tmp_path / "a", base_checkpoint, mixture(datasets, ("arc_b",)), ("mode=full",))
    data = to_dict(cfg)
    data["train"]["model"] = {}
    mix = tmp_path / "new.json"
    mix.write_text(json.dumps(data["train"]["data"].pop("mixture")))
    (tmp_path / "adapt.yaml").write_text(yaml.safe_dump(data))
    argv = [
        "adapt",
        str(tmp_path / "adapt.yaml"),
        "--checkpoint",
        str(base_checkpoint),
        "--mixture",
        str(mix),
    ]
    assert main([*argv, "-o", "train.steps=2", "train.optim.prompt_warmup_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "retrieval for 'arc_b'" in out and "step 1: training vlm, transformer" in out
    assert XVLA.from_pretrained(checkpoint_path(tmp_path / "a", 2)).num_domains == 5


def test_diverged_training_is_a_one_line_error(tmp_path, capsys):
    bad = write_dataset(tmp_path / "bad_units", episodes=2, length=24, phase=0.0, action_x=1e30)
    data = {"sources": [source_dict("bad_units", 0, bad, targets="action")]}
    cfg = make_config(tmp_path / "run", data, ("val.every=0",))
    (tmp_path / "run.json").write_text(json.dumps(to_dict(cfg)))
    assert main(["train", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xvla train: error: step 1: non-finite loss") and "Traceback" not in err


def test_bad_data_is_a_one_line_error(tmp_path, datasets, capsys):
    """A MixtureDataError (here a camera key the dataset lacks) is `xvla train: error: ...` (issue 14 D13)."""
    data = {
        "sources": [source_dict("arc_a", 0, datasets["arc_a"], cameras=[{"key": "observation.images.top"}])]
    }
    (tmp_path / "run.json").write_text(json.dumps(to_dict(make_config(tmp_path / "run", data))))
    assert main(["train", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "xvla train: error: source 'arc_a': cameras[0]: key 'observation.images.top' is not in"
    )
    assert err.count("\n") == 1


def test_an_error_from_a_dataloader_worker_is_its_own_message() -> None:
    """torch re-raises a worker's error with the worker's whole traceback as the message; print its last line."""
    try:
        try:
            raise OSError("disk")
        except OSError as cause:
            raise MixtureDataError("source 'a': dataset /d: episode 3, frame 7: corrupt video") from cause
    except MixtureDataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(MixtureDataError) as info:
        wrapped.reraise()
    assert "Traceback" in str(info.value)
    assert one_line(info.value) == (
        "source 'a': dataset /d: episode 3, frame 7: corrupt video (in a DataLoader worker)"
    )
    assert one_line(ValueError("plain")) == "plain"


def test_a_zero_fps_dataset_is_a_one_line_error(tmp_path, datasets, capsys):
    """Issue 14 D14: training on a dataset whose info.json says `fps: 0` names the file and the field."""
    root = tmp_path / "zero_fps"
    shutil.copytree(datasets["arc_a"], root)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "fps": 0}))
    data = {"sources": [source_dict("arc_a", 0, root)]}
    (tmp_path / "run.json").write_text(json.dumps(to_dict(make_config(tmp_path / "run", data))))
    assert main(["train", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xvla train: error: ") and err.count("\n") == 1
    assert "fps: expected a frame rate > 0, got 0" in err and str(root / "meta/info.json") in err


def test_timestamps_off_the_declared_fps_refuse_training(tmp_path, datasets, capsys):
    """Issue 14 D11: info.json fps 30 on 10 fps data used to train on misaligned frames with rc 0."""
    root = tmp_path / "fps30"
    shutil.copytree(datasets["arc_a"], root)
    info = json.loads((root / "meta/info.json").read_text())
    (root / "meta/info.json").write_text(json.dumps({**info, "fps": 30}))
    data = {"sources": [source_dict("arc_a", 0, root)]}
    (tmp_path / "run.json").write_text(json.dumps(to_dict(make_config(tmp_path / "run", data))))
    assert main(["train", str(tmp_path / "run.json")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"xvla train: error: source 'arc_a': dataset {root}: episode ")
        and err.count("\n") == 1
    )
    assert "timestamps disagree with fps 30" in err and str(root / "data/chunk-000/file-000.parquet") in err
