"""Adaptation: a new domain grows without touching the others, retrieval ranks domains, LoRA trains/saves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xvla.configio import ConfigError
from xvla.data.mixture import MixtureDataset
from xvla.data.sources import Mixture, Source
from xvla.data.transforms import ObservationTransform, collate
from xvla.model.tokenizer import load_tokenizer
from xvla.model.xvla import XVLA
from xvla.serve.policy import Policy
from xvla.train.adapt import adapt, build_adapt_job, load_adapted, rank_domains, save_lora
from xvla.train.checkpointing import STATE
from xvla.train.distributed import make_accelerator
from xvla.train.job import load_mixture
from xvla.train.run_folder import HISTORY_FILE

from .helpers import adapt_config, mixture, source_dict


def outputs(model: XVLA, checkpoint, datasets, domains: range) -> list[torch.Tensor]:
    """Sampled chunks for a fixed batch of arc_b observations and fixed noise, once per domain."""
    source = Source.from_dict(source_dict("arc_b", 0, datasets["arc_b"]))
    transform = ObservationTransform(model.config, load_tokenizer(checkpoint), train=False)
    stream = iter(MixtureDataset(Mixture((source,)), seed=5))
    batch = collate([transform(next(stream)) for _ in range(2)])
    noise = torch.randn(
        2, model.config.num_actions, model.action_space.dim, generator=torch.Generator().manual_seed(0)
    )
    model.eval()
    out = []
    for d in domains:
        batch["domain_id"] = torch.full((2,), d)
        out.append(model.generate(batch, steps=2, noise=noise))
    return out


def test_grow_keeps_old_domains_and_copies_named_init(tmp_path, datasets, base_checkpoint):
    cfg = adapt_config(tmp_path / "a", base_checkpoint, mixture(datasets, ("arc_b",)), ("init=arc_a",))
    base = XVLA.from_pretrained(base_checkpoint)
    before = outputs(base, base_checkpoint, datasets, range(4))
    job = build_adapt_job(cfg, make_accelerator(cfg.train, partial_training=True))
    assert job.xvla.num_domains == 5 and job.mixture.sources[0].domain_id == 4
    after = outputs(job.xvla, base_checkpoint, datasets, range(5))
    for d in range(4):
        assert torch.equal(before[d], after[d]), d  # every existing domain bit-identical
    assert torch.equal(after[4], after[0])  # initialised from arc_a (domain 0)
    assert job.adaptation["new_domains"]["arc_b"] == {"domain_id": 4, "init_from": "arc_a", "ranking": []}


def test_retrieval_ranks_alike_whatever_the_process_count(tmp_path, datasets, base_checkpoint):
    # Under DDP each process's batch_size is its share; retrieval probes with the global batch, so two processes
    # of 1 sample rank on the same samples, t and noise as one process of 2 (it once probed with half of them).
    one = adapt_config(
        tmp_path / "a", base_checkpoint, mixture(datasets, ("arc_b",)), ("train.batch_size=2",)
    )
    two = adapt_config(
        tmp_path / "b", base_checkpoint, mixture(datasets, ("arc_b",)), ("train.batch_size=1",)
    )
    model = XVLA.from_pretrained(base_checkpoint)
    tokenizer = load_tokenizer(base_checkpoint)
    (source,) = load_mixture(one.train).sources
    candidates = {d: f"domain_{d}" for d in range(model.num_domains)}

    class TwoProcesses:  # what rank_domains reads of a 2-process accelerator
        num_processes = 2
        device = torch.device("cpu")
        autocast = make_accelerator(two.train, partial_training=True).autocast

    single = rank_domains(
        model, tokenizer, source, candidates, one, make_accelerator(one.train, partial_training=True)
    )
    split = rank_domains(model, tokenizer, source, candidates, two, TwoProcesses())  # type: ignore[arg-type]
    assert [r["domain_id"] for r in split] == [r["domain_id"] for r in single]
    np.testing.assert_allclose([r["loss"] for r in split], [r["loss"] for r in single], rtol=1e-6)


def test_prompt_mode_with_retrieval_leaves_other_domains_bit_identical(tmp_path, datasets, base_checkpoint):
    cfg = adapt_config(tmp_path / "a", base_checkpoint, mixture(datasets, ("arc_b",)), ("mode=prompt",))
    final = adapt(cfg)
    notes = json.loads((tmp_path / "a" / "adaptation.json").read_text())
    ranking = notes["new_domains"]["arc_b"]["ranking"]
    assert len(ranking) == 4
    assert {r["name"] for r in ranking} == {"arc_a", "domain_1", "domain_2", "domain_3"}
    assert [r["loss"] for r in ranking] == sorted(r["loss"] for r in ranking)
    assert notes["new_domains"]["arc_b"]["init_from"] == ranking[0]["name"]
    base = XVLA.from_pretrained(base_checkpoint)
    tuned = XVLA.from_pretrained(final)
    assert tuned.num_domains == 5
    before, after = outputs(base, final, datasets, range(4)), outputs(tuned, final, datasets, range(5))
    for d in range(4):
        assert torch.equal(before[d], after[d]), d
    assert not torch.equal(after[4], before[ranking[0]["domain_id"]])  # the new domain did train
    sources = json.loads((final / "sources.json").read_text())
    assert sources["arc_b"]["domain_id"] == 4 and sources["arc_a"]["domain_id"] == 0
    # the checkpoint alone serves both the old and the new source
    for name in ("arc_a", "arc_b"):
        policy = Policy.from_checkpoint(final, source=name, device="cpu", steps=2)
        state = np.array([0.45, 0.0, 0.2, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=np.float32)
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        reply = policy.infer(
            {"state": state, "images": {"observation.images.front": image}, "instruction": "task 0"}
        )
        assert np.asarray(reply["actions"]).shape == (10, 8)  # 1 s at 10 Hz, native 8-d pose


def test_soft_prompts_mode_trains_the_new_prompt_alone(tmp_path, datasets, base_checkpoint):
    cfg = adapt_config(
        tmp_path / "a", base_checkpoint, mixture(datasets, ("arc_b",)), ("mode=soft_prompts", "init=arc_a")
    )
    tuned = XVLA.from_pretrained(adapt(cfg))
    grown = XVLA.from_pretrained(base_checkpoint)
    grown.grow_domains(1, init_from=0)  # what adaptation starts from: arc_a's prompt and heads copied
    before, after = grown.state_dict(), tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"transformer.soft_prompt_hub.weight"}  # heads, VLM and transformer untouched
    rows = (before["transformer.soft_prompt_hub.weight"] != after["transformer.soft_prompt_hub.weight"]).any(
        1
    )
    assert rows.tolist() == [False] * 4 + [True]  # only the new domain's prompt moved


def test_last_layer_mode_trains_prompt_heads_and_the_last_block_only(tmp_path, datasets, base_checkpoint):
    cfg = adapt_config(
        tmp_path / "a", base_checkpoint, mixture(datasets, ("arc_b",)), ("mode=last_layer", "init=arc_a")
    )
    tuned = XVLA.from_pretrained(adapt(cfg))
    grown = XVLA.from_pretrained(base_checkpoint)
    grown.grow_domains(1, init_from=0)
    before, after = grown.state_dict(), tuned.state_dict()
    changed = {
        k.split(".")[1] if k.startswith("transformer.") else k.split(".")[0]
        for k in before
        if not torch.equal(before[k], after[k])
    }
    last = f"blocks.{grown.config.head.depth - 1}."
    moved_blocks = {k for k in before if ".blocks." in k and not torch.equal(before[k], after[k])}
    assert moved_blocks and all(last in k for k in moved_blocks)  # only the last block of the head
    assert changed == {
        "blocks",
        "norm",
        "soft_prompt_hub",
        "action_encoder",
        "action_decoder",
    }  # VLM untouched


def test_lora_adapter_and_merged_exports_agree(tmp_path, datasets, base_checkpoint, capsys):
    cfg = adapt_config(
        tmp_path / "a", base_checkpoint, mixture(datasets, ("arc_b",)), ("init=scratch", "lora.save=adapter")
    )
    final = adapt(cfg)
    printed = capsys.readouterr().out
    assert "step 2: training soft_prompts, action_heads, lora:" in printed  # count and fraction printed
    assert {"adapter_config.json", "adapter_model.safetensors", "domain_heads.safetensors"} <= {
        p.name for p in final.iterdir()
    }
    adapted = load_adapted(final)
    raw = torch.load(final / STATE / "model.pt", weights_only=True)
    lora = cfg.lora.__class__(**{**cfg.lora.__dict__, "save": "merged"})
    save_lora(adapted.config, lora, raw, tmp_path / "merged", base=base_checkpoint, added=1)
    merged = XVLA.from_pretrained(tmp_path / "merged")
    a, b = (
        outputs(adapted, base_checkpoint, datasets, range(5)),
        outputs(merged, base_checkpoint, datasets, range(5)),
    )
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    base = outputs(XVLA.from_pretrained(base_checkpoint), base_checkpoint, datasets, range(1))
    assert not torch.equal(base[0], b[0])  # stage 2 trained the LoRA adapters of the shared layers


def test_lora_checkpoints_do_not_change_the_run(tmp_path, datasets, base_checkpoint):
    """Regression: exporting a LoRA checkpoint built a fresh model from the training RNG stream, so the losses
    after a save depended on how often checkpoints were written."""
    losses = []
    for every in (1, 4):
        out = tmp_path / f"every_{every}"
        cfg = adapt_config(
            out,
            base_checkpoint,
            mixture(datasets, ("arc_b",)),
            ("mode=lora", "init=scratch", f"train.checkpoint.every={every}", "train.val.every=0"),
        )
        adapt(cfg)
        losses.append(json.loads((out / HISTORY_FILE).read_text())["loss"])
    assert len(losses[0]) == 4
    assert losses[0] == losses[1]


@pytest.mark.parametrize(
    ("names", "overrides", "error", "message"),
    [
        (("arc_b",), ("init=nope",), ConfigError, "init: 'nope' is neither"),
        (("arc_a",), (), ValueError, "already domains of"),
    ],
)
def test_adapt_errors(tmp_path, datasets, base_checkpoint, names, overrides, error, message):
    cfg = adapt_config(tmp_path / "a", base_checkpoint, mixture(datasets, names), overrides)
    with pytest.raises(error, match=message):
        adapt(cfg)
