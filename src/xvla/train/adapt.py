"""Adaptation: add a domain to a trained checkpoint and fit it to new data (`xvla adapt`).

Each source of the new mixture gets a new domain (prompt + per-domain heads) through `XVLA.grow_domains`, so
the existing domains' outputs are untouched. The new prompt and heads start from scratch, from a named
existing domain, or from the existing domain whose prompt and heads fit the new data best ("retrieval": the
flow loss of every existing domain on a few batches of the new data, ranked). Stage 1 trains only the new
prompt and heads (`train.optim.prompt_warmup_steps`), stage 2 trains what `mode` says: everything ("full"),
LoRA adapters on every linear layer through `peft` plus prompts and heads ("lora"), still only prompts and
heads ("prompt"), or prompts, heads and the head's last transformer block ("last_layer", the paper's
"+ last layer" arm); "soft_prompts" trains the soft prompts alone in both stages. A LoRA run saves merged weights
(a plain checkpoint) or the adapter only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from xvla.configio import ConfigError
from xvla.data.mixture import MixtureDataset
from xvla.data.sources import Mixture, Source
from xvla.data.transforms import ObservationTransform, collate
from xvla.model.checkpoint import read_sources
from xvla.model.tokenizer import load_tokenizer
from xvla.model.xvla import XVLA
from xvla.train.config import AdaptConfig, LoraSettings
from xvla.train.distributed import TransformedStream, make_accelerator
from xvla.train.job import Job, check_mixture, load_mixture, merge_sources
from xvla.train.modes import ADAPT_INITS
from xvla.train.optim import ALL_GROUPS, PROMPT_PHASE_GROUPS
from xvla.train.trainer import run

if TYPE_CHECKING:  # peft is imported where LoRA is used
    from peft import PeftModel

ADAPTER_HEADS = "domain_heads.safetensors"  # prompts + per-domain heads of an adapter-only checkpoint
ADAPTER_META = "adapter_base.json"  # in an adapter checkpoint: its base checkpoint and domains added
SOFT_PROMPTS_ONLY = ("soft_prompts",)  # the groups mode "soft_prompts" trains, in both stages
LAST_BLOCK = "last_block"  # mode "last_layer": the head's last transformer block and its final norm


def adapt(cfg: AdaptConfig, *, resume: bool = False) -> Path:
    """Adapt `cfg.train.model.checkpoint` to the sources of `cfg.train.data.mixture`; returns the final
    checkpoint folder (merged weights, or an adapter folder when `cfg.lora.save == "adapter"`)."""
    cfg.train.validate()
    if cfg.train.model.checkpoint is None:
        raise ConfigError("train.model.checkpoint: required (the trained checkpoint to adapt)")
    if cfg.retrieval_batches < 1:
        raise ConfigError(f"retrieval_batches: expected >= 1, got {cfg.retrieval_batches}")
    if cfg.mode == "lora" and cfg.train.fsdp:
        raise ConfigError("mode: LoRA adaptation does not support fsdp (the adapters are small: use DDP)")
    accelerator = make_accelerator(cfg.train, partial_training=True)
    set_seed(cfg.train.seed)
    job = build_adapt_job(cfg, accelerator)
    return run(cfg.train, job, accelerator, resume=resume)


def build_adapt_job(cfg: AdaptConfig, accelerator: Accelerator) -> Job:
    """Grow the checkpoint by one domain per new source, initialise it, and choose what trains."""
    base = Path(cfg.train.model.checkpoint)  # type: ignore[arg-type]
    model = XVLA.from_pretrained(base).train()
    tokenizer = load_tokenizer(base)
    known = read_sources(base)
    new = load_mixture(cfg.train)
    clash = sorted(set(known) & {s.name for s in new.sources})
    if clash:
        raise ValueError(
            f"mixture sources {clash} are already domains of {base}; give the new sources new names"
        )
    names = {int(d["domain_id"]): name for name, d in known.items()}
    candidates = {d: names.get(d, f"domain_{d}") for d in range(model.num_domains)}

    grown: list[Source] = []
    report: dict[str, Any] = {}
    for source in new.sources:
        # Any valid domain id: here only the action space is checked, and retrieval sets the ids itself.
        probe = dataclasses.replace(source, domain_id=0)
        check_mixture(Mixture((probe,)), model)
        ranking: list[dict[str, Any]] = []
        if cfg.init == "scratch":
            init_from = None
        elif cfg.init == "retrieval":
            ranking = rank_domains(model, tokenizer, probe, candidates, cfg, accelerator)
            init_from = ranking[0]["domain_id"]
        else:
            by_name = {v: k for k, v in candidates.items()}
            if cfg.init not in by_name:
                raise ConfigError(
                    f"init: {cfg.init!r} is neither one of {ADAPT_INITS} nor a domain of {base} "
                    f"(domains: {sorted(by_name)})"
                )
            init_from = by_name[cfg.init]
        (new_id,) = model.grow_domains(1, init_from=init_from)
        grown.append(dataclasses.replace(source, domain_id=new_id))
        report[source.name] = {
            "domain_id": new_id,
            "init_from": None if init_from is None else candidates[init_from],
            "ranking": ranking,
        }
        if ranking:
            lines = ", ".join(f"{r['name']}={r['loss']:.4g}" for r in ranking)
            accelerator.print(f"retrieval for {source.name!r} (flow loss, best first): {lines}")

    mixture = Mixture(tuple(grown))
    sources = merge_sources(known, mixture)
    groups = model.parameter_groups()
    notes = {"base": str(base), "mode": cfg.mode, "init": cfg.init, "new_domains": report}
    export: Callable[[dict[str, Tensor], Path], None] | None
    if cfg.mode == "lora":
        trained: nn.Module = wrap_lora(model, cfg.lora)
        groups = lora_groups(groups, trained)
        main: tuple[str, ...] = tuple(groups)
        grown_config = model.config

        def export(state: dict[str, Tensor], folder: Path) -> None:
            save_lora(grown_config, cfg.lora, state, folder, base=base, added=len(grown))

    elif cfg.mode == "last_layer":
        trained, export = model, None
        groups = split_last_block(model, groups)
        main = (*PROMPT_PHASE_GROUPS, LAST_BLOCK)
    else:
        trained, export = model, None
        main = {"prompt": PROMPT_PHASE_GROUPS, "soft_prompts": SOFT_PROMPTS_ONLY}.get(cfg.mode, ALL_GROUPS)
    if cfg.mode == "soft_prompts" and not groups["soft_prompts"]:
        raise ConfigError(f"mode: 'soft_prompts' needs a model with soft prompts; {base} has none")
    return Job(
        model=trained,
        xvla=model,
        groups=groups,
        tokenizer=tokenizer,
        mixture=mixture,
        sources=sources,
        prompt_groups=SOFT_PROMPTS_ONLY if cfg.mode == "soft_prompts" else PROMPT_PHASE_GROUPS,
        main_groups=main,
        export=export,
        adaptation=notes,
    )


def split_last_block(model: XVLA, groups: dict[str, list[nn.Parameter]]) -> dict[str, list[nn.Parameter]]:
    """`groups` with the head's last block and final norm moved out of "transformer" into `LAST_BLOCK`."""
    tr = model.transformer
    last = {id(p) for p in (*tr.blocks[-1].parameters(), *tr.norm.parameters())}
    core = groups["transformer"]
    return {
        **groups,
        "transformer": [p for p in core if id(p) not in last],
        LAST_BLOCK: [p for p in core if id(p) in last],
    }


@torch.no_grad()
def rank_domains(
    model: XVLA,
    tokenizer: Any,
    source: Source,
    candidates: dict[int, str],
    cfg: AdaptConfig,
    accelerator: Accelerator,
) -> list[dict[str, Any]]:
    """Flow loss of each existing domain's prompt and heads on `cfg.retrieval_batches` batches of `source`,
    best first. Same batches, t and noise for every candidate; identical on every rank (rank 0's stream).
    Batches are global (`batch_size` x processes), so the choice does not depend on how many processes run."""
    dataset = MixtureDataset(
        Mixture((source,)), split="train", seed=cfg.train.data.seed, split_seed=cfg.train.data.seed
    )
    loader = DataLoader(
        TransformedStream(dataset, ObservationTransform(model.config, tokenizer, train=False)),
        batch_size=cfg.train.batch_size * accelerator.num_processes,
        collate_fn=collate,
    )
    gen = torch.Generator().manual_seed(cfg.train.seed)
    batches = []
    for raw in loader:
        b = raw["proprio"].shape[0]
        t = (torch.rand(1, generator=gen) + torch.arange(b) / b) % (1 - 1e-5)
        noise = torch.randn(b, model.config.num_actions, model.action_space.dim, generator=gen)
        batches.append((raw, t, noise))
        if len(batches) == cfg.retrieval_batches:
            break
    was_training = model.training
    model.eval().to(accelerator.device)
    ranking = []
    for domain, name in candidates.items():
        total = 0.0
        for raw, t, noise in batches:
            batch = {k: v.to(accelerator.device) for k, v in raw.items()}
            batch["domain_id"] = torch.full_like(batch["domain_id"], domain)
            with accelerator.autocast():
                total += float(
                    model(batch, t=t.to(accelerator.device), noise=noise.to(accelerator.device)).loss
                )
        ranking.append({"domain_id": domain, "name": name, "loss": total / len(batches)})
    model.train(was_training)
    return sorted(ranking, key=lambda r: r["loss"])


# ------------------------------------------------------------------------------------------------------ LoRA
def lora_targets(model: XVLA, settings: LoraSettings) -> list[str] | str:
    """ "all-linear": every nn.Linear of the vision tower, text encoder and head (peft's own "all-linear" only
    works on transformers models); otherwise the names given."""
    if settings.targets != "all-linear":
        return settings.targets
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def wrap_lora(model: XVLA, settings: LoraSettings) -> PeftModel:
    """peft LoRA on `model` (base weights frozen by peft; prompts and heads are trained by their groups)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings),
    )
    return get_peft_model(model, config)


def lora_groups(groups: dict[str, list[nn.Parameter]], wrapped: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trained groups of LoRA fine-tuning: the model's prompts and heads (`groups`, from
    `XVLA.parameter_groups`) and every adapter weight of the peft-`wrapped` model."""
    return {
        **{g: groups[g] for g in PROMPT_PHASE_GROUPS},
        "lora": [p for n, p in wrapped.named_parameters() if "lora_" in n],
    }


def save_lora(
    config: Any, settings: LoraSettings, state: dict[str, Tensor], folder: Path, *, base: Path, added: int
) -> None:
    """Write the servable model from the full LoRA-wrapped `state`: merged into a plain checkpoint, or the
    adapter (peft files + prompts and heads of every domain, `load_adapted` rebuilds it on the base)."""
    # Initialising the skeleton must not move the training RNG stream (saving would change the run).
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        skeleton = wrap_lora(XVLA(config), settings)
    skeleton.load_state_dict(state)
    if settings.save == "merged":
        skeleton.merge_and_unload().save_pretrained(folder)
        return
    skeleton.save_pretrained(str(folder))  # adapter_config.json + adapter_model.safetensors (LoRA only)
    inner = cast(XVLA, skeleton.get_base_model())  # the model wrap_lora was given
    groups = inner.parameter_groups()
    names = {id(p): n for n, p in inner.named_parameters()}
    heads = {names[id(p)]: p.detach().contiguous() for g in PROMPT_PHASE_GROUPS for p in groups[g]}
    save_file(heads, str(folder / ADAPTER_HEADS))
    (folder / ADAPTER_META).write_text(
        json.dumps({"base": str(base), "domains_added": added}, indent=1) + "\n"
    )


def load_adapted(folder: str | Path, base: str | Path | None = None) -> XVLA:
    """An adapter-only checkpoint on top of its base checkpoint (recorded in the folder, or `base`), merged."""
    from peft import PeftModel

    folder = Path(folder)
    meta = json.loads((folder / ADAPTER_META).read_text())
    model = XVLA.from_pretrained(base or meta["base"])
    model.grow_domains(meta["domains_added"])
    heads = load_file(str(folder / ADAPTER_HEADS))
    missing = set(heads) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(
            f"{folder / ADAPTER_HEADS}: parameters {sorted(missing)} are not in the grown base model"
        )
    model.load_state_dict(heads, strict=False)
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()
