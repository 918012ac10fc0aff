"""The X-VLA model: Florence-2 encoder + soft-prompted transformer head + flow objective."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xvla.config import XVLAConfig
from xvla.model.action_spaces import ActionSpace, build_action_space
from xvla.model.florence import EncodedObservation, FlorenceEncoder
from xvla.model.flow import FlowObjective, Inpainting, get_objective, stratified_t
from xvla.model.transformer import SoftPromptedTransformer


@dataclass
class LossOutput:
    """loss: scalar sum of terms; terms: {name: scalar}; per_sample [B]: sum of weighted terms per sample
    (loss == per_sample.mean()); pred [B, T, A]: raw network output; t [B], noise [B, T, A]: the draws used."""

    loss: Tensor
    terms: dict[str, Tensor]
    per_sample: Tensor
    pred: Tensor
    t: Tensor
    noise: Tensor


def _check_draw(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")


class XVLA(nn.Module):
    """X-VLA. See docs/design.md for the batch layout (`pixel_values`, `image_mask`, `input_ids`, ...)."""

    def __init__(self, config: XVLAConfig) -> None:
        super().__init__()
        self.config = config
        self.action_space: ActionSpace = build_action_space(
            config.action_space, config.real_action_dim, config.max_action_dim
        )
        self.objective: FlowObjective = get_objective(config.objective)
        self.vlm = FlorenceEncoder(config)
        self.transformer = SoftPromptedTransformer(
            config.head,
            vlm_dim=config.text.d_model,
            action_dim=self.action_space.dim,
            proprio_dim=config.proprio_dim,
        )

    @property
    def num_domains(self) -> int:
        return self.transformer.num_domains

    # ----------------------------------------------------------------------------------------------- validation
    def _check_batch(self, batch: dict[str, Tensor], training: bool) -> None:
        cfg = self.config
        required = ["pixel_values", "image_mask", "input_ids", "domain_id", "proprio"] + (
            ["action"] if training else []
        )
        missing = [k for k in required if k not in batch]
        if missing:
            raise KeyError(f"model batch is missing {missing}; expected keys {required}")
        pv = batch["pixel_values"]
        if pv.dim() != 5 or pv.shape[2] != 3:
            raise ValueError(f"pixel_values: expected [B, V, 3, H, W], got shape {tuple(pv.shape)}")
        b, v = pv.shape[:2]
        if not 1 <= v <= cfg.num_views:
            raise ValueError(f"pixel_values: expected 1..{cfg.num_views} views (config.num_views), got {v}")
        if tuple(pv.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values: expected images of {cfg.image_size}x{cfg.image_size} (config.image_size), "
                f"got {pv.shape[-2]}x{pv.shape[-1]}"
            )
        if tuple(batch["image_mask"].shape) != (b, v):
            raise ValueError(f"image_mask: expected shape {(b, v)}, got {tuple(batch['image_mask'].shape)}")
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != b or ids.shape[1] > cfg.max_text_len:
            raise ValueError(
                f"input_ids: expected [{b}, L] with L <= {cfg.max_text_len} (config.max_text_len), got {tuple(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.text.vocab_size):
            raise ValueError(
                f"input_ids: token ids must lie in [0, {cfg.text.vocab_size}) (config.text.vocab_size)"
            )
        dom = batch["domain_id"]
        if tuple(dom.shape) != (b,):
            raise ValueError(f"domain_id: expected shape ({b},), got {tuple(dom.shape)}")
        if dom.numel() and (int(dom.min()) < 0 or int(dom.max()) >= self.num_domains):
            raise ValueError(
                f"domain_id: expected values in [0, {self.num_domains}) (number of domains), got {dom.tolist()}"
            )
        prop = batch["proprio"]
        if tuple(prop.shape) != (b, cfg.proprio_dim):
            raise ValueError(
                f"proprio: expected shape ({b}, {cfg.proprio_dim}) (config.proprio_dim), got {tuple(prop.shape)}"
            )
        if not bool(torch.isfinite(prop).all()):
            raise ValueError("proprio: contains NaN or inf")
        if training:
            act = batch["action"]
            a_dims = {self.action_space.input_dim, self.action_space.dim}
            if (
                act.dim() != 3
                or act.shape[0] != b
                or act.shape[1] != cfg.num_actions
                or act.shape[2] not in a_dims
            ):
                raise ValueError(
                    f"action: expected shape ({b}, {cfg.num_actions}, {self.action_space.input_dim}) for action space "
                    f"{cfg.action_space!r}, got {tuple(act.shape)}"
                )
            if not bool(torch.isfinite(act).all()):
                raise ValueError("action: contains NaN or inf")

    # ------------------------------------------------------------------------------------------------- network
    def encode(
        self,
        pixel_values: Tensor,
        image_mask: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
    ) -> EncodedObservation:
        """pixel_values [B, V, 3, H, W], image_mask [B, V], input_ids [B, L] -> EncodedObservation."""
        return self.vlm(pixel_values, image_mask.bool(), input_ids, attention_mask)

    def denoise(
        self, x_t: Tensor, t: Tensor, proprio: Tensor, domain_id: Tensor, encoded: EncodedObservation
    ) -> Tensor:
        """Raw network: x_t [B, T, A], t [B], proprio [B, P], domain_id [B] -> [B, T, A]. Nothing is zeroed here."""
        return self.transformer(
            domain_id,
            encoded.vlm_features,
            encoded.aux_features,
            x_t,
            proprio,
            t,
            encoded.vlm_mask,
            encoded.aux_mask,
        )

    def _net(
        self, x_t: Tensor, t: Tensor, proprio: Tensor, domain_id: Tensor, encoded: EncodedObservation
    ) -> Tensor:
        """The network as the objective feeds it (`action_input`, `proprio_input`)."""
        return self.denoise(self.action_input(x_t), t, self.proprio_input(proprio), domain_id, encoded)

    def action_input(self, x_t: Tensor) -> Tensor:
        """x_t [B, T, A] as the network reads it: gripper channels zeroed by the action space when the objective
        hides them (x0 models; a velocity model needs the noise on every channel)."""
        return self.action_space.mask_gripper(x_t) if self.objective.masks_gripper_inputs else x_t

    def proprio_input(self, proprio: Tensor) -> Tensor:
        """proprio [B, P] as the network reads it: gripper channels zeroed as released, unless
        `config.proprio_gripper`."""
        return proprio if self.config.proprio_gripper else self.action_space.mask_gripper(proprio)

    def _encode_batch(self, batch: dict[str, Tensor]) -> EncodedObservation:
        return self.encode(
            batch["pixel_values"], batch["image_mask"], batch["input_ids"], batch.get("attention_mask")
        )

    # ----------------------------------------------------------------------------------------------- training
    def forward(
        self, batch: dict[str, Tensor], *, t: Tensor | None = None, noise: Tensor | None = None
    ) -> LossOutput:
        """Flow-matching loss. Draws (when not given) in the authors' order: u = rand(1) (t stratified), then noise."""
        self._check_batch(batch, training=True)
        action = self.action_space.pad(batch["action"])
        b = action.shape[0]
        encoded = self._encode_batch(batch)
        if t is None:
            t = stratified_t(torch.rand(1, device=action.device), b)
        if noise is None:
            noise = torch.randn_like(action)
        _check_draw("t", t, (b,))
        _check_draw("noise", noise, tuple(action.shape))
        t = t.to(action.dtype)
        x_t = self.objective.noisy(action, noise, t)
        pred = self._net(x_t, t, batch["proprio"], batch["domain_id"], encoded)
        per_term = self.objective.loss_terms(pred, self.objective.target(action, noise), self.action_space)
        terms = {k: v.mean() for k, v in per_term.items()}
        loss = sum(terms.values())
        per_sample = sum(per_term.values())
        return LossOutput(loss=loss, terms=terms, per_sample=per_sample, pred=pred, t=t, noise=noise)  # type: ignore[arg-type]

    # -------------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Tensor],
        *,
        steps: int | None = None,
        noise: Tensor | None = None,
        inpaint: Inpainting | None = None,
    ) -> Tensor:
        """Action chunk [B, T, A_out] (post-processed: gripper sigmoid for x0 models, `auto` trimmed), on the eager
        reference path. `inpaint`: actions the chunk must continue (`xvla.model.flow`, "Inpainting").
        `xvla.model.fast.sampling.fast_generator(model)` has the same contract and noise injection with static
        shapes, a CUDA graph and 16-bit weights on GPU."""
        self._check_batch(batch, training=False)
        encoded = self._encode_batch(batch)
        return self.sample(
            encoded, batch["proprio"], batch["domain_id"], steps=steps, noise=noise, inpaint=inpaint
        )

    def sample(
        self,
        encoded: EncodedObservation,
        proprio: Tensor,
        domain_id: Tensor,
        *,
        steps: int | None = None,
        noise: Tensor | None = None,
        inpaint: Inpainting | None = None,
    ) -> Tensor:
        """Denoising loop on precomputed features (host-sync free). Returns the post-processed chunk."""
        steps = steps or self.config.num_steps
        b = proprio.shape[0]
        if noise is None:
            noise = torch.randn(
                b,
                self.config.num_actions,
                self.action_space.dim,
                device=proprio.device,
                dtype=encoded.vlm_features.dtype,
            )
        _check_draw("noise", noise, (b, self.config.num_actions, self.action_space.dim))
        guide = None
        if inpaint is not None:
            inpaint.check(b, self.config.num_actions, self.action_space.input_dim)
            guide = self.objective.guidance(inpaint, self.action_space, noise.dtype)

        # Precompute what does not change across steps: context tokens, prompts, mask, preprocessed proprio.
        ctx = self.transformer.context(
            domain_id,
            encoded.vlm_features,
            encoded.aux_features,
            self.config.num_actions,
            encoded.vlm_mask,
            encoded.aux_mask,
        )
        proprio_in = self.proprio_input(proprio)

        def net(x_t: Tensor, t: Tensor) -> Tensor:
            return self.transformer.run(ctx, self.action_input(x_t), proprio_in, t)

        return self.objective.finish(self.objective.sample(net, noise, steps, guide), self.action_space)

    # ------------------------------------------------------------------------------------------ domains/groups
    def grow_domains(self, n_new: int, init_from: int | None = None) -> list[int]:
        """Add `n_new` domains (prompts and per-domain layers), copies of domain `init_from` or freshly initialised;
        existing domains' outputs stay bit-identical. The per-domain tables are new Parameters: build the optimiser
        (and `parameter_groups()`) after growing."""
        if n_new < 1:
            raise ValueError(f"grow_domains: n_new must be >= 1, got {n_new}")
        if init_from is not None and not 0 <= init_from < self.num_domains:
            raise ValueError(f"grow_domains: init_from must be in [0, {self.num_domains}), got {init_from}")
        old = self.num_domains
        self.transformer.grow_domains(n_new, init_from)
        self.config = self.config.replace(head=dataclasses.replace(self.config.head, num_domains=old + n_new))
        return list(range(old, old + n_new))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint groups covering every parameter: vlm, transformer (core), soft_prompts, action_heads."""
        tr = self.transformer
        soft = list(tr.soft_prompt_hub.parameters()) if tr.soft_prompt_hub is not None else []  # its weight
        heads = list(tr.action_encoder.parameters()) + list(tr.action_decoder.parameters())
        special = {id(p) for p in soft + heads}
        core = [p for p in tr.parameters() if id(p) not in special]
        return {
            "vlm": list(self.vlm.parameters()),
            "transformer": core,
            "soft_prompts": soft,
            "action_heads": heads,
        }

    # ------------------------------------------------------------------------------------------------ checkpoints
    # The documented entry points; the code is in checkpoint.py, which builds XVLA, so it is imported on call
    # and the module dependency goes one way (checkpoint -> xvla).
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, **kwargs: Any) -> XVLA:
        """Load ours, the authors' or LeRobot's layout (auto-detected) from a folder or a hub id."""
        from xvla.model.checkpoint import load_pretrained

        return load_pretrained(path_or_hub_id, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json + model.safetensors atomically (temp folder, then rename)."""
        from xvla.model.checkpoint import save_pretrained

        save_pretrained(self, path)
