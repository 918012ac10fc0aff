"""`ObservationTransform`: raw sample -> model-batch entries; the one code path for training and serving.

Images: resize to ``config.image_size`` square (bicubic with antialiasing, no aspect preservation), in training
``ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0)`` with torchvision's semantics (random order
of the three adjustments, factors uniform in [0.8, 1.2]) and, when ``Augment.shift_px`` > 0, a random shift
(pad by replicating the border, crop back at a random offset of up to that many pixels, as DrQ and Diffusion
Policy do for small-data visuomotor learning), then ImageNet mean/std. Views beyond the sample's are filled
to ``config.num_views`` as its source's ``missing_views`` says (`xvla.data.sources.MISSING_VIEWS`): absent
(zeros, image_mask False; "zeros" and "mask") or copies of the primary view (present, "repeat_primary"). Text is tokenised and padded/truncated to ``config.max_text_len``.
Proprio and actions are zero-padded to the model's widths (single-arm data fills the left arm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xvla.data.sources import MISSING_VIEWS
from xvla.model.action_spaces import build_action_space

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER = (0.2, 0.2, 0.2)  # brightness, contrast, saturation
TOKEN_CACHE_SIZE = 1024  # instructions whose token ids an ObservationTransform keeps
BATCH_KEYS = ("pixel_values", "image_mask", "input_ids", "attention_mask", "domain_id", "proprio", "action")


@dataclass(frozen=True)
class Augment:
    """Training-time image augmentation (serving never augments)."""

    color_jitter: bool = True
    shift_px: int = 0  # random shift of up to this many pixels (at the model's image size); 0 = off

    def __post_init__(self) -> None:
        if not isinstance(self.shift_px, int) or self.shift_px < 0:
            raise ValueError(f"Augment.shift_px: expected an integer >= 0, got {self.shift_px!r}")


def random_shift(img: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """[3, H, W] -> [3, H, W]: replicate-pad by `pad`, crop at a uniform integer offset in [0, 2 * pad]."""
    h, w = img.shape[1:]
    padded = F.pad(img[None], (pad, pad, pad, pad), mode="replicate")[0]
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    return padded[:, dy : dy + h, dx : dx + w]


def _grayscale(img: Tensor) -> Tensor:
    """[3, H, W] in [0, 1] -> [1, H, W] (ITU-R 601-2 luma, as torchvision)."""
    r, g, b = img.unbind(0)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


def color_jitter(
    img: Tensor, generator: torch.Generator | None = None, strength: tuple[float, ...] = JITTER
) -> Tensor:
    """torchvision ``ColorJitter(b, c, s, 0)`` on one image [3, H, W] in [0, 1]; returns [3, H, W]."""
    order = torch.randperm(3, generator=generator).tolist()
    factors = [float(torch.empty(1).uniform_(1 - s, 1 + s, generator=generator)) for s in strength]
    for i in order:
        f = factors[i]
        if i == 0:
            other = torch.zeros_like(img)
        elif i == 1:
            other = _grayscale(img).mean()
        else:
            other = _grayscale(img)
        img = (f * img + (1 - f) * other).clamp(0.0, 1.0)
    return img


class ObservationTransform:
    """``ObservationTransform(config, tokenizer, train)(raw) -> dict[str, Tensor]`` (unbatched batch entries).

    ``config`` provides image_size, num_views, max_text_len, proprio_dim, num_actions and action_space
    (an `XVLAConfig`); ``tokenizer`` is a Hugging Face tokenizer (``xvla.model.tokenizer.load_tokenizer``);
    ``augment`` applies only when ``train``."""

    def __init__(self, config: Any, tokenizer: Any, train: bool, augment: Augment = Augment()) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.train = train
        self.augment = augment
        space = build_action_space(config.action_space, config.real_action_dim, config.max_action_dim)
        self.action_dim = space.dim  # targets are zero-padded to the width the network emits
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._tokens: dict[str, tuple[Tensor, Tensor]] = {}  # instruction -> (input_ids, attention_mask)

    def tokens(self, instruction: str) -> tuple[Tensor, Tensor]:
        """(input_ids [L], attention_mask [L]), padded/truncated to ``max_text_len``; memoised, since a dataset
        has a handful of instructions and the tokenizer call was an eighth of a sample's cost. At most
        ``TOKEN_CACHE_SIZE`` are kept: a server's clients may send any number of different instructions."""
        if instruction not in self._tokens:
            if len(self._tokens) >= TOKEN_CACHE_SIZE:
                self._tokens.clear()
            text = self.tokenizer(
                instruction,
                padding="max_length",
                truncation=True,
                max_length=self.config.max_text_len,
                return_tensors="pt",
            )
            self._tokens[instruction] = (text["input_ids"][0].long(), text["attention_mask"][0].long())
        ids, mask = self._tokens[instruction]
        return ids.clone(), mask.clone()

    def image(self, image: np.ndarray, generator: torch.Generator | None = None) -> Tensor:
        """uint8 [H, W, 3] RGB -> normalised float [3, S, S]."""
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"images: expected uint8 [H, W, 3] RGB arrays, got {arr.dtype} {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255.0)
        size = self.config.image_size
        if x.shape[1:] != (size, size):
            x = F.interpolate(
                x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True
            )[0]
            x = x.clamp(0.0, 1.0)  # bicubic overshoots
        if self.train and self.augment.color_jitter:
            x = color_jitter(x, generator)
        if self.train and self.augment.shift_px:
            x = random_shift(x, self.augment.shift_px, generator)
        return (x - self._mean) / self._std

    def __call__(self, raw: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``raw``: ``images`` (uint8 [H, W, 3] each, primary first), ``instruction``, ``proprio`` [P'],
        ``domain_id``, optional ``action`` [T, A'] and ``missing_views`` (the source's, default "zeros")."""
        cfg = self.config
        images = raw["images"]
        if not 1 <= len(images) <= cfg.num_views:
            raise ValueError(
                f"images: expected 1 to {cfg.num_views} views (primary first), got {len(images)}"
            )
        pixel_values = torch.zeros(cfg.num_views, 3, cfg.image_size, cfg.image_size)
        image_mask = torch.zeros(cfg.num_views, dtype=torch.bool)
        for v, img in enumerate(images):
            pixel_values[v] = self.image(img, generator)
            image_mask[v] = True
        missing_views = raw.get("missing_views", "zeros")
        if missing_views not in MISSING_VIEWS:
            raise ValueError(f"missing_views: expected one of {MISSING_VIEWS}, got {missing_views!r}")
        if missing_views == "repeat_primary":
            pixel_values[len(images) :] = pixel_values[0]
            image_mask[:] = True
        input_ids, attention_mask = self.tokens(raw["instruction"])
        out = {
            "pixel_values": pixel_values,
            "image_mask": image_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "domain_id": torch.tensor(int(raw["domain_id"]), dtype=torch.long),
            "proprio": _pad("proprio", raw["proprio"], cfg.proprio_dim),
        }
        if raw.get("action") is not None:
            action = _pad("action", raw["action"], self.action_dim)
            if action.ndim != 2 or action.shape[0] != cfg.num_actions:
                raise ValueError(
                    f"action: expected [{cfg.num_actions}, <= {self.action_dim}], got {tuple(action.shape)}"
                )
            out["action"] = action
        return out


def _pad(name: str, value: Any, width: int) -> Tensor:
    """[..., D] -> float32 [..., width], zero-padded on the right (D <= width)."""
    x = torch.as_tensor(np.asarray(value, dtype=np.float32))
    if x.ndim == 0 or x.shape[-1] > width:
        raise ValueError(f"{name}: expected a last dimension <= {width}, got shape {tuple(x.shape)}")
    return F.pad(x, (0, width - x.shape[-1]))


def collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack transformed samples into a model batch (``action`` only when every sample has one)."""
    if not samples:
        raise ValueError("collate: expected at least one sample")
    keys = [k for k in BATCH_KEYS if k in samples[0]]
    for i, s in enumerate(samples):
        if [k for k in BATCH_KEYS if k in s] != keys:
            raise ValueError(f"collate: sample {i} has keys {sorted(s)}, sample 0 has {sorted(samples[0])}")
    return {k: torch.stack([s[k] for s in samples]) for k in keys}
