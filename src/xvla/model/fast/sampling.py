"""Fast sampling for XVLA: a static-shape sampler (16-bit weights, CUDA graph, optional torch.compile).
Measurements and design notes: docs/performance.md.

`FastGenerator` has the contract of `XVLA.generate`:

- the observation is encoded once per chunk with static shapes (`static_encode`): every view goes through DaViT
  and missing views are zeroed by multiplication (the eager path gathers existing views with a boolean index, a
  host sync);
- what does not change across steps is computed once: head context (projected features + prompts), the
  per-domain action-encoder weights split into their x_t / proprio / time parts, the time-embedding term of every
  step of the objective's fixed t-grid, gripper keep vectors; a step is then `x_t @ W_x + base[k]` -> blocks ->
  decoder, and the objective (`xvla.model.flow`) turns its output into the next state;
- no host syncs between input copy and output (Python floats for the grid, no `.item()`, no tensor branches);
- 16-bit weights (fp16 by default on CUDA) in a cast copy of the model (the eager model is left untouched), with
  the residual stream, norms and softmax kept in fp32 under autocast;
- on CUDA the whole chunk (encoder + all steps) is captured in one CUDA graph per (batch bucket, views, text
  length, steps) and replayed; batches are padded to power-of-two buckets so a server's dynamic batch sizes need
  few graphs; optionally (`compile=True`, everywhere) `torch.compile` of the encoder and of one step;
- the noise is drawn exactly as `XVLA.generate` draws it (same shape, fp32 when the eager model is fp32), so
  both paths agree on the same inputs up to the cast precision;
- inpainting (`inpaint=`, real-time chunking) is the objective's same `guide` after every step; a chunk with and
  one without it are different graphs (the guide tensors are extra static inputs).

Any failure to compile or capture logs a warning and falls back to the static eager code (`FastGenerator.mode`
says which path runs).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xvla.model.fast.dynamo import raise_recompile_limit
from xvla.model.florence import EncodedObservation, key_masks
from xvla.model.flow import Inpainting
from xvla.model.transformer import timestep_embedding
from xvla.model.xvla import XVLA, _check_draw

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
INPUT_KEYS = (
    "pixel_values",
    "image_mask",
    "input_ids",
    "attention_mask",
    "proprio",
    "domain_id",
    "noise",
    "guide_target",  # inpainting (`xvla.model.flow.Inpainting`), in the sampler's space; None without
    "guide_weight",
)


@dataclass(frozen=True)
class FastOptions:
    """How `FastGenerator` runs. `None` fields pick the device default.

    dtype: low-precision weights ("auto": float16 on CUDA, float32 elsewhere; see docs/performance.md for why
        float16 rather than bfloat16 is the CUDA default: same speed, 8x finer rounding).
    fp32_residual: with a 16-bit dtype, keep the residual stream, norms, softmax and the sampler's state in fp32
        (matmuls/convs in 16 bit under autocast, weights pre-cast so autocast casts nothing); False: everything in
        the 16-bit dtype (cheapest, about 2x the error).
    cuda_graph: capture the whole chunk in a CUDA graph (default: on CUDA).
    compile: torch.compile the encoder and one denoising step (minutes of compile on the first call of a shape; the
        CUDA graph already removes the launch overhead, so this only fuses elementwise kernels).
    compile_mode: torch.compile mode (None = default; e.g. "max-autotune-no-cudagraphs" on CUDA).
    max_graphs: captured graphs kept (least recently used dropped).
    validate: run the model's batch checks (a few host syncs before the graph, none inside).
    """

    dtype: DtypeName = "auto"
    fp32_residual: bool = True
    cuda_graph: bool | None = None
    compile: bool = False
    compile_mode: str | None = None
    max_graphs: int = 8
    validate: bool = True

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"FastOptions.dtype: expected 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        if self.max_graphs < 1:
            raise ValueError(f"FastOptions.max_graphs must be >= 1, got {self.max_graphs}")


def _bucket(n: int) -> int:
    """Next power of two >= n."""
    return 1 << (n - 1).bit_length()


def _pad_rows(inputs: dict[str, Tensor | None], pad: int) -> dict[str, Tensor | None]:
    """Append `pad` copies of the first sample to every input (samples are independent; extra rows are dropped)."""
    if not pad:
        return inputs
    return {
        k: None if v is None else torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for k, v in inputs.items()
    }


class _Graph:
    """One captured chunk: static input buffers, the graph, the static output."""

    def __init__(self, fn: Any, inputs: dict[str, Tensor | None], warmup: int = 2) -> None:
        self.inputs = {k: None if v is None else v.clone() for k, v in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture stream (cuBLAS workspaces, lazy inits)
            for _ in range(warmup):
                fn(**self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may touch CUDA while this one captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output: Tensor = fn(**self.inputs)

    def __call__(self, inputs: dict[str, Tensor | None]) -> Tensor:
        for k, v in inputs.items():
            if v is not None:
                self.inputs[k].copy_(v)  # type: ignore[union-attr]
        self.graph.replay()
        return self.output.clone()


def static_encode(
    model: XVLA,
    pixel_values: Tensor,
    image_mask: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    dtype: torch.dtype,
) -> EncodedObservation:
    """`FlorenceEncoder.forward` with static shapes: pixel_values [B, V, 3, H, W] (images cast to `dtype`), all V
    views through DaViT, then missing views and views beyond V (up to config.num_views) zeroed by a multiply,
    their tokens kept (released behaviour)."""
    vlm, cfg = model.vlm, model.config
    b, v = pixel_values.shape[:2]
    feats = vlm.encode_images(pixel_values.flatten(0, 1).to(dtype)).view(b, v, cfg.tokens_per_view, -1)
    image_mask = F.pad(image_mask.bool(), (0, cfg.num_views - v), value=False)  # [B, num_views]
    feats = F.pad(feats, (0, 0, 0, 0, 0, cfg.num_views - v)) * image_mask[..., None, None].to(feats.dtype)
    text = vlm.text_encoder.embed_tokens(input_ids).to(feats.dtype)
    vlm_mask, aux_mask = key_masks(cfg, image_mask, input_ids, attention_mask)
    inputs = torch.cat([feats[:, 0], text], dim=1)
    out = vlm.text_encoder(inputs_embeds=inputs, attention_mask=vlm_mask).last_hidden_state
    return EncodedObservation(out, feats[:, 1:].flatten(1, 2), vlm_mask, aux_mask)


class FastGenerator:
    """Fast sampling for an `XVLA`: `gen(batch, steps=None, noise=None) -> [B, T, A_out]` like `model.generate`.

    The weights are read (or cast and copied) at construction: call `refresh()` after changing the model's
    weights. Captured graphs and compiled functions are keyed by static shapes; the first call of a new shape pays
    the capture/compile (reported in `stats`)."""

    def __init__(
        self, model: XVLA, options: FastOptions = FastOptions(), *, weak_model: bool = False
    ) -> None:
        # weak_model: hold the model weakly (the per-model cache of `fast_generator` must not keep it alive)
        self._model: Any = weakref.ref(model) if weak_model else (lambda: model)
        self._copy: XVLA | None = None
        self.options = options
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        name = options.dtype if options.dtype != "auto" else ("float16" if on_cuda else "float32")
        self.dtype = DTYPES[name]  # weights of matmuls/convs
        mixed = options.fp32_residual and self.dtype != torch.float32
        self.act_dtype = torch.float32 if mixed else self.dtype  # activations between matmuls
        self.use_graph = on_cuda if options.cuda_graph is None else options.cuda_graph
        if self.use_graph and not on_cuda:
            raise ValueError(f"FastOptions.cuda_graph=True needs the model on CUDA, it is on {self.device}")
        self.use_compile = options.compile
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self.stats: dict[str, float] = {"compile_s": 0.0, "capture_s": 0.0, "captures": 0}
        self.refresh()

    # ------------------------------------------------------------------------------------------------ set-up
    def refresh(self) -> None:
        """(Re)build the network copy from the model's current weights and forget graphs/compiled code."""
        model_dtype = next(self.model.parameters()).dtype
        # Same dtype: run the model itself, in whatever train/eval mode it is (as `generate` does).
        self._copy = None
        if model_dtype != self.dtype:
            self._copy = copy.deepcopy(self.model).eval()
            if self.act_dtype == self.dtype:
                self._copy.to(self.dtype)
            else:  # mixed: pre-cast what autocast would cast (matmul/conv weights, embedding tables), keep the rest
                for m in self._copy.modules():
                    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                        m.to(self.dtype)
        self._graphs.clear()
        self._grids: dict[int, tuple[list[float], Tensor]] = {}
        self._keep_x = self.net.action_input(
            torch.ones(self.net.action_space.dim, device=self.device, dtype=self.act_dtype)
        )
        self._keep_p = self.net.proprio_input(
            torch.ones(self.net.config.proprio_dim, device=self.device, dtype=self.act_dtype)
        )
        self._encode_fn = self._encode
        self._step_fn = self._step
        self._compiled_once = False
        if self.use_compile:
            raise_recompile_limit()
            self._encode_fn = torch.compile(self._encode, mode=self.options.compile_mode, dynamic=False)
            self._step_fn = torch.compile(self._step, mode=self.options.compile_mode, dynamic=False)

    @property
    def model(self) -> XVLA:
        model = self._model()
        if model is None:
            raise ReferenceError("FastGenerator: its model no longer exists")
        return model

    @property
    def net(self) -> XVLA:
        """What runs: the model, or its 16-bit copy."""
        return self._copy if self._copy is not None else self.model

    @property
    def mode(self) -> str:
        """The path that runs, e.g. 'static+bfloat16+compile+cuda_graph'."""
        parts = [
            "static",
            str(self.dtype).removeprefix("torch.") + ("-fp32res" if self.act_dtype != self.dtype else ""),
        ]
        return "+".join(
            parts + (["compile"] if self.use_compile else []) + (["cuda_graph"] if self.use_graph else [])
        )

    # --------------------------------------------------------------------------------------------- network
    def _encode(
        self, pixel_values: Tensor, image_mask: Tensor, input_ids: Tensor, attention_mask: Tensor | None
    ) -> EncodedObservation:
        return static_encode(self.net, pixel_values, image_mask, input_ids, attention_mask, self.act_dtype)

    def _step(
        self, x_in: Tensor, w_x: Tensor, base: Tensor, ctx: Tensor, mask: Tensor | None, domain_id: Tensor
    ) -> Tensor:
        """One network call: x_in [B, T, A] (gripper already masked), base [B, T, H] -> prediction [B, T, A]."""
        tr = self.net.transformer
        n_act = x_in.shape[1]
        x = torch.cat([torch.matmul(x_in, w_x) + base, ctx], dim=1)
        for block in tr.blocks:
            x = block(x, mask)
        return tr.action_decoder(tr.norm(x[:, :n_act]), domain_id)

    def _chunk(
        self,
        pixel_values: Tensor,
        image_mask: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        proprio: Tensor,
        domain_id: Tensor,
        noise: Tensor,
        guide_target: Tensor | None,
        guide_weight: Tensor | None,
        *,
        steps: int,
    ) -> Tensor:
        """Encode once, then `steps` network calls; the objective's raw state [B, T, A] (not finished)."""
        mixed = self.act_dtype != self.dtype
        with torch.autocast(self.device.type, dtype=self.dtype) if mixed else contextlib.nullcontext():
            cfg, tr = self.net.config, self.net.transformer
            n_act, a_dim, p_dim = cfg.num_actions, self.net.action_space.dim, cfg.proprio_dim
            enc = self._encode_fn(pixel_values, image_mask, input_ids, attention_mask)
            ctx = tr.context(domain_id, enc.vlm_features, enc.aux_features, n_act, enc.vlm_mask, enc.aux_mask)
            b = domain_id.shape[0]
            enc_w = tr.action_encoder.fc(domain_id).view(b, -1, tr.cfg.hidden_size)  # [B, A+P+Dt, H]
            w_x, w_p, w_t = enc_w.split([a_dim, p_dim, tr.cfg.dim_time], dim=1)
            bias = tr.action_encoder.bias(domain_id)[:, None] + tr.pos_emb[:, :n_act]  # [B, T, H]
            base = bias + torch.matmul((proprio.to(self.act_dtype) * self._keep_p)[:, None], w_p)  # [B, T, H]
            objective = self.net.objective
            grid, time_emb = self._time_grid(steps)
            t_term = torch.matmul(time_emb, w_t)  # [B, S, H] (time_emb [S, Dt], w_t [B, Dt, H])
            noise = noise.to(self.act_dtype)
            state = objective.start(noise)
            for k, tk in enumerate(grid):
                x_in = objective.net_input(state, noise, tk) * self._keep_x
                pred = self._step_fn(x_in, w_x, base + t_term[:, k : k + 1], ctx.tokens, ctx.mask, domain_id)
                if guide_target is not None and guide_weight is not None:
                    pred = objective.guide(state, pred, tk, (guide_target, guide_weight))
                state = objective.step(state, pred, steps)
            return state

    def _time_grid(self, steps: int) -> tuple[list[float], Tensor]:
        """The sampler's t values (host floats) and their time embeddings [S, Dt] on the device, made once per
        step count (before any capture: a host-to-device copy cannot be captured)."""
        if steps not in self._grids:
            grid = self.net.objective.grid(steps)
            t = torch.tensor(grid, dtype=torch.float32, device=self.device)
            self._grids[steps] = (
                grid,
                timestep_embedding(t, self.net.transformer.time_freqs).to(self.act_dtype),
            )
        return self._grids[steps]

    # ----------------------------------------------------------------------------------------------- public
    @torch.inference_mode()
    def __call__(
        self,
        batch: dict[str, Tensor],
        *,
        steps: int | None = None,
        noise: Tensor | None = None,
        inpaint: Inpainting | None = None,
    ) -> Tensor:
        """Post-processed chunk [B, T, A_out], as `XVLA.generate` returns (in the eager model's dtype)."""
        if self.options.validate:
            self.model._check_batch(batch, training=False)
        steps = steps or self.model.config.num_steps
        b = batch["proprio"].shape[0]
        out_dtype = next(self.model.parameters()).dtype
        shape = (b, self.model.config.num_actions, self.model.action_space.dim)
        if noise is None:  # the draw XVLA.generate makes (encoding consumes no random numbers in eval)
            noise = torch.randn(shape, device=self.device, dtype=out_dtype)
        _check_draw("noise", noise, shape)
        extra: dict[str, Tensor | None] = {"noise": noise, "guide_target": None, "guide_weight": None}
        if inpaint is not None:
            inpaint.check(b, shape[1], self.model.action_space.input_dim)
            target, weight = self.net.objective.guidance(inpaint, self.net.action_space, self.act_dtype)
            extra.update(guide_target=target, guide_weight=weight)
        inputs = {k: (extra[k] if k in extra else batch.get(k)) for k in INPUT_KEYS}
        inputs = {k: None if v is None else v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        raw = self._graph_chunk(inputs, steps) if self.use_graph else None
        if raw is None:
            raw = self._timed_first(inputs, steps)
        return self.net.objective.finish(raw.to(out_dtype), self.net.action_space)

    def _timed_first(self, inputs: dict[str, Tensor | None], steps: int) -> Tensor:
        """Run the un-captured path; a failing compile falls back to the static eager code."""
        try:
            start = time.perf_counter()
            first = self.use_compile and not self._compiled_once
            out = self._chunk(**inputs, steps=steps)  # type: ignore[arg-type]
            if first:
                self._compiled_once = True
                self.stats["compile_s"] += time.perf_counter() - start
            return out
        except Exception as err:  # noqa: BLE001 - any compiler error: run eager instead
            if not self.use_compile:
                raise
            log.warning(
                "torch.compile failed (%s: %s); running the static eager path", type(err).__name__, err
            )
            self.use_compile = False
            self._encode_fn, self._step_fn = self._encode, self._step
            return self._chunk(**inputs, steps=steps)  # type: ignore[arg-type]

    def _graph_chunk(self, inputs: dict[str, Tensor | None], steps: int) -> Tensor | None:
        """Replay (capturing on first use) the graph of this shape; None when capture is impossible."""
        b = inputs["proprio"].shape[0]  # type: ignore[union-attr]
        pad = _bucket(b) - b
        self._time_grid(steps)
        inputs = _pad_rows(inputs, pad)
        key = (steps,) + tuple(None if v is None else (tuple(v.shape), v.dtype) for v in inputs.values())
        graph = self._graphs.get(key)
        if graph is None:
            try:
                self._timed_first(inputs, steps)  # compiles (if on) outside the capture
                start = time.perf_counter()
                graph = _Graph(lambda **kw: self._chunk(**kw, steps=steps), inputs)
                torch.cuda.synchronize(self.device)
                self.stats["capture_s"] += time.perf_counter() - start
                self.stats["captures"] += 1
            except Exception as err:  # noqa: BLE001 - capture is an optimisation: fall back to the plain path
                log.warning(
                    "CUDA graph capture failed (%s: %s); running without graphs", type(err).__name__, err
                )
                self.use_graph = False
                self._graphs.clear()
                return None
            self._graphs[key] = graph
            while len(self._graphs) > self.options.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph(inputs)[:b]


_GENERATORS: weakref.WeakKeyDictionary[XVLA, dict[FastOptions, FastGenerator]] = weakref.WeakKeyDictionary()


def fast_generator(model: XVLA, options: FastOptions = FastOptions()) -> FastGenerator:
    """The `FastGenerator` of `model` for `options`, built once and cached (what `Policy` uses)."""
    per_model = _GENERATORS.setdefault(model, {})
    if options not in per_model:
        per_model[options] = FastGenerator(model, options, weak_model=True)
    return per_model[options]
