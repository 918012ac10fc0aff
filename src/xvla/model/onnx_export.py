"""Export a checkpoint as two ONNX graphs and a manifest, run by `xvla.serve.onnx_runtime` (onnxruntime + numpy)
or handed to TensorRT.

- `encoder.onnx`, once per chunk: pixel_values [B, V, 3, S, S] f32, image_mask [B, V] bool, input_ids [B, L] i64,
  (attention_mask [B, L] i64 when `config.mask_text_padding`), domain_id [B] i64 -> context [B, Nc, H] f32: the
  Florence-2 encoder with static shapes (`static_encode`: every view through DaViT, missing ones zeroed), the
  head's projections, position embedding and the domain's soft prompts (`SoftPromptedTransformer.context`); plus
  key_mask [B, 1, 1, N] bool when a masking option is on.
- `denoise_step.onnx`, once per sampler step: x_t [B, T, A] f32 (before gripper masking), t [B] f32, proprio [B, P]
  f32, domain_id [B] i64, context (, key_mask) -> prediction [B, T, A] f32: the gripper masking of x_t and proprio
  the model applies, then the head (`SoftPromptedTransformer.run`).
- `manifest.json` (`xvla.serve.onnx_runtime.Manifest`): inputs/outputs, the sampler (objective, steps, action
  dims, finish), input sizes, domains.

The domain id is a graph input (per-domain weights and prompts are gathered inside), V = config.num_views and
L = config.max_text_len are static, the batch axis is dynamic. The graphs are float32 (TensorRT picks its own
precision). Exported with torch's dynamo exporter (`torch.onnx.export(dynamo=True)`): the TorchScript exporter
traced a batch-dependent constant into the DaViT encoder and gave wrong features at another batch size.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xvla.model.action_spaces import ActionSpace
from xvla.model.checkpoint import read_sources, resolve_folder
from xvla.model.fast.sampling import static_encode
from xvla.model.flow import FlowObjective
from xvla.model.transformer import HeadContext
from xvla.model.xvla import XVLA
from xvla.serve.onnx_runtime import MANIFEST_NAME, SAMPLER_LOOPS, Manifest, Sampler

log = logging.getLogger(__name__)

ENCODER_NAME = "encoder.onnx"
STEP_NAME = "denoise_step.onnx"
DEFAULT_OPSET = 18
# torch.export specialises a dimension of size 1 to a constant, so the graphs are traced at batch 2.
TRACE_BATCH = 2


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the folder, the two graphs, the manifest, and every file (external weights too)."""

    folder: Path
    encoder: Path
    step: Path
    manifest: Path
    files: tuple[Path, ...]


class EncoderGraph(nn.Module):
    """The per-chunk graph: model inputs -> (context [B, Nc, H], key_mask [B, 1, 1, N] when masking)."""

    def __init__(self, model: XVLA) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: Tensor,
        image_mask: Tensor,
        input_ids: Tensor,
        domain_id: Tensor,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        m = self.model
        enc = static_encode(m, pixel_values, image_mask, input_ids, attention_mask, torch.float32)
        ctx = m.transformer.context(
            domain_id, enc.vlm_features, enc.aux_features, m.config.num_actions, enc.vlm_mask, enc.aux_mask
        )
        return (ctx.tokens,) if ctx.mask is None else (ctx.tokens, ctx.mask)


class StepGraph(nn.Module):
    """One network call of the sampler: (x_t [B, T, A], t [B], proprio [B, P], domain_id [B], context, key_mask)
    -> prediction [B, T, A], with the model's gripper masking of x_t and proprio."""

    def __init__(self, model: XVLA) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        proprio: Tensor,
        domain_id: Tensor,
        context: Tensor,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        m = self.model
        ctx = HeadContext(tokens=context, mask=key_mask, domain_id=domain_id)
        return m.transformer.run(ctx, m.action_input(x_t), m.proprio_input(proprio), t)


def finish_settings(objective: FlowObjective, space: ActionSpace) -> tuple[int, tuple[int, ...]]:
    """(output_dim, sigmoid_channels) describing `objective.finish` for `space`, read off by probing it: each kept
    channel must come out either unchanged or through a sigmoid, else the runtime cannot reproduce it."""
    probe = torch.linspace(-4.0, -1.0, space.dim).view(1, 1, -1)  # negative: sigmoid(x) != x
    out = objective.finish(probe, space)[0, 0]
    kept = probe[0, 0, : out.shape[-1]]
    sigmoid = []
    for c in range(out.shape[-1]):
        if torch.allclose(out[c], torch.sigmoid(kept[c])):
            sigmoid.append(c)
        elif not torch.allclose(out[c], kept[c]):
            raise ValueError(
                f"objective {objective.name!r} with action space {space.name!r}: the finish of channel {c} is "
                "neither the identity nor a sigmoid; the ONNX runtime cannot reproduce it"
            )
    return int(out.shape[-1]), tuple(sigmoid)


def sampler_settings(model: XVLA, steps: int | None = None) -> Sampler:
    """The runtime's sampler for `model` (`steps`: its default number of network calls, else config.num_steps)."""
    objective, space, cfg = model.objective, model.action_space, model.config
    if objective.name not in SAMPLER_LOOPS:
        raise ValueError(
            f"objective {objective.name!r} has no numpy sampler in xvla.serve.onnx_runtime.SAMPLER_LOOPS; "
            f"known: {sorted(SAMPLER_LOOPS)}"
        )
    output_dim, sigmoid = finish_settings(objective, space)
    return Sampler(
        objective=objective.name,
        steps=steps or cfg.num_steps,
        num_actions=cfg.num_actions,
        action_dim=space.dim,
        output_dim=output_dim,
        sigmoid_channels=sigmoid,
    )


def example_inputs(model: XVLA, batch: int = TRACE_BATCH) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Random encoder and step inputs of `batch` rows (their values do not shape the graphs: nothing in them
    branches on data). Returns (encoder inputs, step inputs without context/key_mask)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    s, v, n = cfg.image_size, cfg.num_views, model.num_domains
    encoder = {
        "pixel_values": torch.randn(batch, v, 3, s, s, generator=g),
        "image_mask": torch.ones(batch, v, dtype=torch.bool),
        "input_ids": torch.randint(0, cfg.text.vocab_size, (batch, cfg.max_text_len), generator=g),
        "domain_id": torch.arange(batch) % n,
    }
    if cfg.mask_text_padding:
        encoder["attention_mask"] = torch.ones(batch, cfg.max_text_len, dtype=torch.long)
    step = {
        "x_t": torch.randn(batch, cfg.num_actions, model.action_space.dim, generator=g),
        "t": torch.rand(batch, generator=g),
        "proprio": torch.randn(batch, cfg.proprio_dim, generator=g),
        "domain_id": encoder["domain_id"],
    }
    return encoder, step


def _export(module: nn.Module, inputs: dict[str, Tensor], outputs: list[str], path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        module.eval(),
        (),
        str(path),
        kwargs=inputs,
        input_names=list(inputs),
        output_names=outputs,
        dynamic_shapes={k: {0: batch} for k in inputs},
        opset_version=opset,
        dynamo=True,
        external_data=True,  # weights beside the graph: a full-size encoder is over protobuf's 2 GB
        verbose=False,
    )


def _shapes(path: Path) -> tuple[dict[str, list[int | str]], dict[str, list[int | str]]]:
    """({input: dims}, {output: dims}) of an ONNX file (the dynamic axis by its name, "batch")."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {i.name: dims(i) for i in graph.input}, {o.name: dims(o) for o in graph.output}


def export_onnx(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxExport:
    """Write `encoder.onnx`, `denoise_step.onnx` (+ their external weights) and `manifest.json` into `out_dir`.

    checkpoint_dir: any layout `XVLA.from_pretrained` reads (its `sources.json` names the domains in the
    manifest); steps: the runtime's default sampler steps (default config.num_steps); opset: >= 17."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {missing}: pip install 'xvla[onnx]'")
    if opset < 17:
        raise ValueError(f"opset: expected >= 17 (LayerNormalization), got {opset}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    folder = resolve_folder(checkpoint_dir)
    model = XVLA.from_pretrained(folder, device="cpu", dtype=torch.float32).eval()
    sampler = sampler_settings(model, steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder_inputs, step_inputs = example_inputs(model)
    with torch.no_grad():
        context = EncoderGraph(model)(**encoder_inputs)
    encoder_outputs = ["context", "key_mask"][: len(context)]
    step_inputs.update(zip(encoder_outputs, context, strict=True))

    encoder_path, step_path = out / ENCODER_NAME, out / STEP_NAME
    log.info("exporting %s", encoder_path)
    _export(EncoderGraph(model), encoder_inputs, encoder_outputs, encoder_path, opset)
    log.info("exporting %s", step_path)
    _export(StepGraph(model), step_inputs, ["prediction"], step_path, opset)

    enc_in, enc_out = _shapes(encoder_path)
    step_in, step_out = _shapes(step_path)
    cfg = model.config
    manifest = Manifest(
        encoder=ENCODER_NAME,
        step=STEP_NAME,
        encoder_inputs=enc_in,
        encoder_outputs=enc_out,
        step_inputs=step_in,
        step_outputs=step_out,
        sampler=sampler,
        num_views=cfg.num_views,
        image_size=cfg.image_size,
        max_text_len=cfg.max_text_len,
        vocab_size=cfg.text.vocab_size,
        proprio_dim=cfg.proprio_dim,
        num_domains=model.num_domains,
        domains={name: int(spec["domain_id"]) for name, spec in read_sources(folder).items()},
        opset=opset,
    )
    manifest_path = out / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
    files = tuple(sorted(p for p in out.iterdir() if p.name.startswith((ENCODER_NAME, STEP_NAME))))
    return OnnxExport(out, encoder_path, step_path, manifest_path, files + (manifest_path,))
