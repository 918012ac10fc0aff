"""Training loop on CPU: exact resume, crash-safe checkpoints, the prompt warm-up phase, learning, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from xvla.configio import ConfigError
from xvla.model.xvla import XVLA
from xvla.train import checkpointing, distributed, run_folder, trainer
from xvla.train.distributed import make_accelerator, make_loader
from xvla.train.job import build_job
from xvla.train.trainer import run, train

from .helpers import make_config, mixture, source_dict, write_dataset


def history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


class Killed(Exception):
    """Stands in for the process being killed."""


@pytest.mark.parametrize("extra", [(), ("checkpoint.ema_decay=0.9",)], ids=["plain", "ema"])
def test_resume_continues_bit_identically(tmp_path, datasets, monkeypatch, extra):
    data = mixture(datasets)
    full = train(make_config(tmp_path / "full", data, extra))
    reference = history(tmp_path / "full")
    assert full == checkpointing.checkpoint_path(tmp_path / "full", 6)

    save = run_folder.save_checkpoint

    def save_then_die(folder, *args, **kwargs):
        save(folder, *args, **kwargs)
        if checkpointing.checkpoint_step(folder) == 3:
            raise Killed

    monkeypatch.setattr(run_folder, "save_checkpoint", save_then_die)
    cut = make_config(tmp_path / "cut", data, extra)
    with pytest.raises(Killed):
        train(cut)
    monkeypatch.setattr(run_folder, "save_checkpoint", save)
    assert history(tmp_path / "cut")["step"] == [1, 2, 3]
    train(cut, resume=True)
    resumed = history(tmp_path / "cut")
    assert resumed["step"] == reference["step"] == [1, 2, 3, 4, 5, 6]
    assert resumed["loss"] == reference["loss"]  # bit-identical, steps 4..6 included
    assert resumed["per_source"] == reference["per_source"]
    val = [json.loads((tmp_path / d / "validation.json").read_text()) for d in ("full", "cut")]
    assert val[0] == val[1]
    a, b = (XVLA.from_pretrained(checkpointing.checkpoint_path(tmp_path / d, 6)) for d in ("full", "cut"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, datasets, monkeypatch):
    cfg = make_config(tmp_path / "run", mixture(datasets))
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        if "step_00000006" in str(path) and str(path).endswith("optimizer.pt"):
            raise Killed  # mid-write: model files of step 6 are already in the temporary folder
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    latest = checkpointing.latest_checkpoint(cfg.output_dir)
    assert latest is not None and latest.name == "step_00000003"
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    XVLA.from_pretrained(latest)  # loadable
    final = train(cfg, resume=True)
    assert final.is_dir() and checkpointing.latest_checkpoint(cfg.output_dir) == final
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    # keep_last = 2 and the servable files are all there
    assert [p.name for p in checkpointing.list_checkpoints(cfg.output_dir)] == [
        "step_00000003",
        "step_00000006",
    ]
    assert {"config.json", "model.safetensors", "tokenizer.json", "sources.json"} <= {
        p.name for p in final.iterdir()
    }
    assert set(json.loads((final / "sources.json").read_text())) == {"arc_a", "arc_b"}


def test_prompt_warmup_trains_only_prompts_and_heads(tmp_path, datasets):
    cfg = make_config(tmp_path / "run", mixture(datasets), ("steps=4", "checkpoint.every=2", "val.every=0"))
    accelerator = make_accelerator(cfg, partial_training=True)
    set_seed(cfg.seed)
    job = build_job(cfg)
    names = {id(p): n for n, p in job.model.named_parameters()}
    group_of = {names[id(p)]: g for g, ps in job.groups.items() for p in ps}
    before = {n: p.detach().clone() for n, p in job.model.named_parameters()}
    run(cfg, job, accelerator, resume=False)
    mid = XVLA.from_pretrained(checkpointing.checkpoint_path(cfg.output_dir, 2)).state_dict()
    end = XVLA.from_pretrained(checkpointing.checkpoint_path(cfg.output_dir, 4)).state_dict()

    def changed(a: dict, b: dict) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for name, group in group_of.items():
            out[group] = out.get(group, False) or not torch.equal(a[name], b[name])
        return out

    assert changed(before, mid) == {
        "vlm": False,
        "transformer": False,
        "soft_prompts": True,
        "action_heads": True,
    }
    assert changed(mid, end) == {"vlm": True, "transformer": True, "soft_prompts": True, "action_heads": True}


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process: a test that changes it starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_overfits_a_tiny_dataset(tmp_path, datasets, precision, fresh_accelerator_state):
    """4 episodes of one source: 80 steps bring the flow loss to ~1% of its start (the model can learn), in fp32
    and under CPU bf16 autocast."""
    one = {"sources": [source_dict("arc_a", 0, datasets["arc_a"], val_count=0)]}
    overrides = (
        f"precision='{precision}'",  # quoted: YAML reads a bare no as false
        "steps=80",
        "optim.prompt_warmup_steps=0",
        "optim.warmup_steps=10",
        "optim.lr=2e-3",
        "checkpoint.every=1000",
        "val.every=0",
    )
    train(make_config(tmp_path / "run", one, overrides))
    losses = history(tmp_path / "run")["loss"]
    assert sum(losses[-10:]) / 10 < 0.03 * losses[0], losses


def test_refuses_a_folder_with_another_run(tmp_path, datasets):
    cfg = make_config(tmp_path / "run", mixture(datasets), ("steps=1",))
    train(cfg)
    with pytest.raises(FileExistsError, match="holds another run.*--resume"):
        train(cfg)


def test_refuses_checkpoint_of_another_architecture(tmp_path, datasets):
    cfg = make_config(tmp_path / "run", mixture(datasets), ("steps=3",))
    train(cfg)
    wider = make_config(
        tmp_path / "run", mixture(datasets), ("steps=6", "model.overrides.head.hidden_size=32")
    )
    with pytest.raises(ValueError, match="different architecture.*head.hidden_size: checkpoint 64 vs run 32"):
        train(wider, resume=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.overrides.action_space=joint",), "action space 'ee6d' conflicts with the model's 'joint'"),
        (("model.overrides.head.num_domains=1",), "domain_id 1 is outside the model's 1 domains"),
        (("model.overrides.head.width=3",), "unknown config key 'head.width'"),
        (("fsdp=true",), "fsdp: needs GPUs"),
    ],
)
def test_mixture_and_model_mismatch_errors(tmp_path, datasets, overrides, message):
    with pytest.raises((ValueError, ConfigError), match=message):
        train(make_config(tmp_path / "run", mixture(datasets), overrides))


def test_a_space_with_the_sources_layout_trains(tmp_path, datasets):
    """agibot_ee6d differs from ee6d only in losses and masking: ee6d sources train it."""
    train(
        make_config(
            tmp_path / "run", mixture(datasets), ("steps=2", "model.overrides.action_space=agibot_ee6d")
        )
    )
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_missing_views_reach_the_batches_and_sources_json(tmp_path, datasets):
    """A source's `missing_views` fills the training batches (1 camera on the 2-view model) and is written to the
    checkpoint's sources.json; choices the model cannot honour are refused before training."""
    data = {
        "sources": [
            source_dict("arc_a", 0, datasets["arc_a"], missing_views="repeat_primary"),
            source_dict("arc_b", 1, datasets["arc_b"]),
        ]
    }
    cfg = make_config(tmp_path / "run", data, ("batch_size=8",))
    job = build_job(cfg)
    assert (
        job.sources["arc_a"]["missing_views"] == "repeat_primary"
        and job.sources["arc_b"]["missing_views"] == "zeros"
    )
    _, loader = make_loader(
        job, cfg, make_accelerator(cfg, partial_training=True), mixture=job.mixture, split="train"
    )
    batch = next(iter(loader))
    assert batch["image_mask"][:, 0].all()
    assert batch["image_mask"][:, 1].tolist() == (batch["domain_id"] == 0).tolist()  # arc_a's view repeated
    repeated = batch["domain_id"] == 0
    torch.testing.assert_close(batch["pixel_values"][repeated, 1], batch["pixel_values"][repeated, 0])
    three = [{"key": k} for k in ("observation.images.front", "wrist", "side")]
    refused = [
        (
            source_dict("arc_a", 0, datasets["arc_a"], cameras=three),
            r"cameras: 3 cameras, but the model takes 2",
        ),
        (
            source_dict("arc_a", 0, datasets["arc_a"], missing_views="mask"),
            "missing_views: 'mask' needs a model",
        ),
    ]
    for source, message in refused:
        with pytest.raises(ValueError, match=r"source 'arc_a': " + message):
            build_job(make_config(tmp_path / "bad", {"sources": [source]}))
    masked = make_config(
        tmp_path / "masked", {"sources": [refused[1][0]]}, ("model.overrides.mask_missing_views=true",)
    )
    assert build_job(masked).xvla.config.mask_missing_views


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, datasets):
    runs = {}
    for name, extra in (("plain", ()), ("recompute", ("model.activation_checkpointing=true",))):
        train(make_config(tmp_path / name, mixture(datasets), ("steps=3", "val.every=0", *extra)))
        runs[name] = history(tmp_path / name)["loss"]
    assert runs["plain"] == runs["recompute"]


def test_dataloader_workers_resume(tmp_path, datasets, monkeypatch):
    """With DataLoader workers too, a resumed run repeats the uninterrupted one bit for bit: the sampler
    position and the colour-jitter draws (seeded by each sample's stream position) both resume. The stop is
    at the end of the prompt warm-up (step 2), where the backbone groups have no optimiser state yet."""
    overrides = ("steps=4", "val.every=0", "checkpoint.every=2", "data.num_workers=2")
    train(make_config(tmp_path / "full", mixture(datasets), overrides))
    cfg = make_config(tmp_path / "run", mixture(datasets), overrides)
    save = run_folder.save_checkpoint

    def save_then_die(folder, *args, **kwargs):
        save(folder, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(run_folder, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(run_folder, "save_checkpoint", save)
    train(cfg, resume=True)
    state = checkpointing.load_file(
        checkpointing.checkpoint_path(cfg.output_dir, 4) / "training_state" / "rank_0.pt"
    )
    assert state["data"]["consumed"] == [8, 8]  # 4 batches of 4 samples, round-robin over 2 workers
    resumed, reference = history(tmp_path / "run"), history(tmp_path / "full")
    assert resumed["step"] == reference["step"] == [1, 2, 3, 4]
    assert resumed["loss"] == reference["loss"]


def test_finetune_from_checkpoint_merges_sources(tmp_path, datasets, base_checkpoint):
    data = mixture(datasets, ("arc_a", "arc_b"))  # arc_a keeps domain 0, arc_b takes domain 1
    cfg = make_config(
        tmp_path / "ft", data, ("steps=2", "val.every=0", f"model.checkpoint={base_checkpoint}")
    )
    with pytest.raises(ConfigError, match="model.overrides: only for presets"):
        train(cfg)
    cfg = make_config(tmp_path / "ft", data, ("steps=2", "val.every=0"))
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, checkpoint=str(base_checkpoint), overrides={})
    )
    final = train(cfg)
    sources = json.loads((final / "sources.json").read_text())
    assert {n: s["domain_id"] for n, s in sources.items()} == {"arc_a": 0, "arc_b": 1}
    moved = {"sources": [source_dict("arc_b", 0, datasets["arc_b"])]}  # arc_b now on arc_a's domain
    cfg = dataclasses.replace(
        cfg, output_dir=str(tmp_path / "ft2"), data=dataclasses.replace(cfg.data, mixture=moved)
    )
    sources = json.loads((train(cfg) / "sources.json").read_text())
    assert {n: s["domain_id"] for n, s in sources.items()} == {"arc_b": 0}


def test_absurd_targets_stop_training_at_the_first_non_finite_loss(tmp_path, datasets):
    """Actions of 1e30 (finite in float32, their squared error is not): training stops at once, naming the step
    and the sources of the bad samples; no checkpoint is written."""
    bad = write_dataset(tmp_path / "bad_units", episodes=2, length=24, phase=1.0, action_x=1e30)
    data = {
        "sources": [
            source_dict("arc_a", 0, datasets["arc_a"]),
            source_dict("bad_units", 1, bad, targets="action"),
        ]
    }
    cfg = make_config(tmp_path / "run", data, ("val.every=0", "optim.prompt_warmup_steps=0"))
    with pytest.raises(
        trainer.DivergedError,
        match=r"step 1: non-finite loss for \d+ sample\(s\) from bad_units x\d+; .*\(batch: arc_a x\d+, "
        r"bad_units x\d+\); stopped before the optimiser step.*last checkpoint: none",
    ):
        train(cfg)
    assert checkpointing.list_checkpoints(cfg.output_dir) == []
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "history.json").exists()  # no NaN was ever logged


def test_a_non_finite_gradient_stops_before_the_next_checkpoint(tmp_path, datasets, monkeypatch):
    clip = Accelerator.clip_grad_norm_
    calls = []

    def inf_at_step_5(self, *args, **kwargs):
        norm = clip(self, *args, **kwargs)
        calls.append(1)
        return torch.tensor(float("inf")) if len(calls) == 5 else norm

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", inf_at_step_5)
    cfg = make_config(tmp_path / "run", mixture(datasets), ("val.every=0",))
    with pytest.raises(
        trainer.DivergedError, match=r"step 5: gradient norm inf .*last checkpoint: .*step_00000003"
    ):
        train(cfg)
    assert [p.name for p in checkpointing.list_checkpoints(cfg.output_dir)] == ["step_00000003"]
    assert history(tmp_path / "run")["step"] == [1, 2, 3, 4]


def test_sources_sharing_a_domain_train_and_validate_per_source(tmp_path, datasets):
    data = {
        "sources": [source_dict(n, 0, datasets[n]) for n in ("arc_a", "arc_b")]
    }  # one prompt and head set
    cfg = make_config(tmp_path / "run", data, ("steps=2", "checkpoint.every=2", "val.every=2"))
    train(cfg)
    logged = history(tmp_path / "run")["per_source"]
    # training losses are kept by domain: a shared domain cannot say which source a loss came from
    assert logged == {"arc_a": [None, None], "arc_b": [None, None]}
    (validation,) = json.loads((tmp_path / "run" / "validation.json").read_text())
    assert set(validation["per_source"]) == {"arc_a", "arc_b"}  # validation runs source by source


@pytest.mark.parametrize(("bf16_instructions", "expected"), [(False, "no"), (True, "bf16")])
def test_auto_precision_on_cpu_is_bf16_only_with_bf16_instructions(
    tmp_path, datasets, fresh_accelerator_state, monkeypatch, bf16_instructions, expected
):
    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: bf16_instructions)
    cfg = make_config(tmp_path / "run", mixture(datasets), ("precision=auto",))
    assert make_accelerator(cfg, partial_training=False).mixed_precision == expected
