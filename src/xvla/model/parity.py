"""Replay of parity fixtures (`refs.safetensors` + `refs.json`) made with the authors' code or LeRobot's port.

Everything is derived from the files: image size, text length, views, steps and batch size come from the stored
inputs; each reference tensor that this module knows how to recompute is compared (features, DaViT stages,
denoiser calls, loss terms with the recorded draws, the sampler's steps, and LeRobot's policy-level block).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from xvla.model.checkpoint import load_state, read_checkpoint, resolve_folder
from xvla.model.flow import stratified_t
from xvla.model.xvla import XVLA


@dataclass(frozen=True)
class Comparison:
    """One output: `kind` is "abs" (atol), "rel" (loss scalars, rtol relative to the value) or "scaled" (DaViT
    debug stages: unnormalised intermediates whose magnitude grows with the model, atol per unit of max|ref|)."""

    name: str
    max_abs: float
    max_ref: float
    kind: str
    tol: float

    @property
    def error(self) -> float:
        if self.kind == "rel":
            return self.max_abs / max(self.max_ref, 1e-12)
        if self.kind == "scaled":
            return self.max_abs / max(self.max_ref, 1.0)
        return self.max_abs

    @property
    def ok(self) -> bool:
        return self.error <= self.tol


def _kind(name: str) -> str:
    if name.endswith("_loss") or name.endswith("loss_total"):
        return "rel"
    return "scaled" if name.startswith("davit_") else "abs"


def refs_batch(refs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model batch stored in a refs.safetensors (its `in_*` inputs)."""
    return {
        "pixel_values": refs["in_pixel_values"],
        "image_mask": refs["in_image_mask"].bool(),
        "input_ids": refs["in_input_ids"],
        "domain_id": refs["in_domain_id"],
        "proprio": refs["in_proprio"],
    }


def replay(model: XVLA, refs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Recompute every reference output that the stored inputs determine; keys follow refs.safetensors."""
    out: dict[str, Tensor] = {}
    space = model.action_space
    batch = refs_batch(refs)
    pixels, mask, ids = batch["pixel_values"], batch["image_mask"], batch["input_ids"]
    domain, proprio = batch["domain_id"], batch["proprio"]

    # (a) encoder: features, encoder inputs and DaViT stages of the first valid view
    enc = model.encode(pixels, mask, ids)
    out["vlm_features"], out["aux_visual_inputs"] = enc.vlm_features, enc.aux_features
    valid = pixels.flatten(0, 1)[mask.flatten()]
    out["valid_view_features"] = model.vlm.encode_images(valid)
    views = out["valid_view_features"].new_zeros(mask.numel(), *out["valid_view_features"].shape[1:])
    views[mask.flatten()] = out["valid_view_features"]
    primary = views.view(*mask.shape, *views.shape[1:])[:, 0]
    out["encoder_inputs_embeds"] = torch.cat([primary, model.vlm.text_encoder.embed_tokens(ids)], dim=1)
    h = valid[:1]
    tower = model.vlm.vision_tower
    for s, (conv, blocks) in enumerate(zip(tower.convs, tower.blocks, strict=True)):
        h = conv(h)
        out[f"davit_conv{s}_out"] = h.flatten(2).transpose(1, 2)
        for block in cast(nn.ModuleList, blocks):  # each DaViT stage is a ModuleList of blocks
            h = block(h)
        out[f"davit_stage{s}_out"] = h.flatten(2).transpose(1, 2)

    # (b) one denoiser call, raw and as the objective feeds it
    if "in_x_t" in refs:
        x_t, t = refs["in_x_t"], refs["in_t"]
        out["denoise_raw_out"] = model.denoise(x_t, t, proprio, domain, enc)
        p_m, x_m = space.preprocess(proprio, x_t)
        out["denoise_pre_proprio_m"], out["denoise_pre_x_t_m"] = p_m, x_m
        out["denoise_pre_out"] = model.denoise(x_m, t, p_m, domain, enc)

    # (c) loss with the recorded draws
    if "loss_u" in refs:
        out.update(
            _loss_block(
                model, {**batch, "action": refs["in_action"]}, refs["loss_u"], refs["loss_noise"], "loss_"
            )
        )

    # (d) sampler from the recorded noise, recording every step
    if "gen_x1_noise" in refs:
        steps = refs["gen_step_t"].shape[0] if "gen_step_t" in refs else model.config.num_steps
        rec: dict[str, list[Tensor]] = {"t": [], "x": [], "pred": []}
        p_m, _ = space.preprocess(proprio, refs["gen_x1_noise"])

        def net(x: Tensor, t: Tensor) -> Tensor:
            _, x_m = space.preprocess(proprio, x)
            pred = model.denoise(x_m, t, p_m, domain, enc)
            rec["t"].append(t)
            rec["x"].append(x_m)
            rec["pred"].append(pred)
            return pred

        out["gen_actions"] = model.objective.finish(
            model.objective.sample(net, refs["gen_x1_noise"], steps), space
        )
        out["gen_step_t"], out["gen_step_x_t_m"] = torch.stack(rec["t"]), torch.stack(rec["x"])
        out["gen_step_pred"], out["gen_proprio_m"] = torch.stack(rec["pred"]), p_m

    # (e) LeRobot policy level: present views all get mask 1, the state is zero-padded to the proprio width
    if "pol_loss_u" in refs:
        pol_mask = refs["pol_model_image_mask"].bool()
        state_key = next((k for k in sorted(refs) if k.startswith("in_state")), "pol_model_proprio")
        state = refs[state_key]
        pol_proprio = F.pad(state, (0, model.config.proprio_dim - state.shape[-1]))
        out["pol_model_proprio"] = pol_proprio
        pol_batch = {
            "pixel_values": pixels * pol_mask[..., None, None, None].to(pixels.dtype),
            "image_mask": pol_mask,
            "input_ids": ids,
            "domain_id": refs["pol_model_domain_id"],
            "proprio": pol_proprio,
            "action": refs["pol_model_action"],
        }
        out.update(_loss_block(model, pol_batch, refs["pol_loss_u"], refs["pol_loss_noise"], "pol_loss_"))
        out["pol_gen_actions"] = model.generate(pol_batch, noise=refs["pol_gen_x1_noise"])
    return out


def _loss_block(
    model: XVLA, batch: dict[str, Tensor], u: Tensor, noise: Tensor, prefix: str
) -> dict[str, Tensor]:
    action = model.action_space.pad(batch["action"])
    t = stratified_t(u, action.shape[0])
    loss = model(batch, t=t, noise=noise)
    p_m, x_m = model.action_space.preprocess(batch["proprio"], model.objective.noisy(action, noise, t))
    res = {
        f"{prefix}t": t,
        f"{prefix}pred_action": loss.pred,
        f"{prefix}action_noisy_m": x_m,
        f"{prefix}proprio_m": p_m,
    }
    res.update({f"{prefix}{k}": v for k, v in loss.terms.items()})
    res[f"{prefix}total"] = loss.loss
    return res


def run_parity(
    checkpoint: str | Path, refs_path: str | Path | None = None, atol: float = 1e-5, rtol: float = 1e-5
) -> tuple[list[Comparison], str]:
    """Load `checkpoint` (any layout), replay its refs; returns the comparisons and the detected layout."""
    folder = resolve_folder(checkpoint)
    refs_file = Path(refs_path) if refs_path else folder / "refs.safetensors"
    if not refs_file.is_file():
        raise FileNotFoundError(f"parity: reference file {refs_file} not found")
    refs = load_file(str(refs_file))
    meta_file = refs_file.with_suffix(".json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    for key in ("in_pixel_values", "in_image_mask", "in_input_ids", "in_domain_id", "in_proprio"):
        if key not in refs:
            raise KeyError(f"parity: {refs_file} lacks input tensor {key!r}")

    config, state, layout = read_checkpoint(folder)
    b, v, _, h, w = refs["in_pixel_values"].shape
    if h != w:
        raise ValueError(f"parity: in_pixel_values must hold square images, got {h}x{w}")
    config = config.replace(image_size=h, num_views=v, max_text_len=refs["in_input_ids"].shape[1])
    with torch.device("meta"):
        model = XVLA(config)
    load_state(model, state, source=str(folder))
    model.eval()
    with torch.no_grad():
        ours = replay(model, refs)
    expected = dict(refs)
    for name, value in (meta.get("pol_loss_log_dict") or {}).items():  # LeRobot's per-term log of (e)
        if name != "loss":
            expected[f"pol_loss_{name}"] = torch.tensor(value)
    results = []
    for name in sorted(set(ours) & set(expected)):
        if name.startswith("in_"):
            continue
        a, r = ours[name].float(), expected[name].float()
        if a.shape != r.shape:
            raise ValueError(f"parity: {name}: computed shape {tuple(a.shape)} vs reference {tuple(r.shape)}")
        kind = _kind(name)
        tol = rtol if kind == "rel" else atol
        results.append(Comparison(name, (a - r).abs().max().item(), r.abs().max().item(), kind, tol))
    if not results:
        raise ValueError(f"parity: {refs_file} holds no reference output this replay knows")
    return results, layout
