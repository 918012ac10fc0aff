"""ObservationTransform + collate: the model-batch contract, resize/normalise values, jitter, text, padding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from xvla.config import get_preset
from xvla.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    ObservationTransform,
    collate,
    color_jitter,
    random_shift,
)
from xvla.model.tokenizer import build_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config() -> Any:
    return get_preset("demo").replace(max_text_len=24)  # 64 px images, 3 views, 24 text tokens


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(texts=["pick up the red cube", "open the drawer"] * 4, vocab_size=300)


def raw(**changes: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    sample = {
        "images": [
            rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        ],
        "instruction": "pick up the red cube",
        "proprio": rng.normal(size=20).astype(np.float32),
        "domain_id": 4,
        "action": rng.normal(size=(30, 20)).astype(np.float32),
        "source": "a",
    }
    sample.update(changes)
    return sample


def test_output_matches_the_model_batch_contract(config: Any, tokenizer: Any) -> None:
    out = ObservationTransform(config, tokenizer, train=False)(raw())
    assert list(out) == [
        "pixel_values",
        "image_mask",
        "input_ids",
        "attention_mask",
        "domain_id",
        "proprio",
        "action",
    ]
    assert out["pixel_values"].shape == (3, 3, 64, 64) and out["pixel_values"].dtype == torch.float32
    assert out["image_mask"].tolist() == [True, True, False]
    assert torch.all(out["pixel_values"][2] == 0)
    assert out["input_ids"].shape == out["attention_mask"].shape == (24,)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long
    assert out["domain_id"].dtype == torch.long and out["domain_id"].item() == 4
    assert out["proprio"].shape == (20,) and out["action"].shape == (30, 20)


def test_missing_views_are_filled_as_the_source_says(config: Any, tokenizer: Any) -> None:
    transform = ObservationTransform(config, tokenizer, train=False)
    default = transform(raw())
    for absent in ("zeros", "mask"):  # absent views; the model's mask_missing_views decides on masking
        out = transform(raw(missing_views=absent))
        assert out["image_mask"].tolist() == [True, True, False] and torch.all(out["pixel_values"][2] == 0)
        torch.testing.assert_close(out["pixel_values"], default["pixel_values"], rtol=0, atol=0)
    one = transform(raw(images=raw()["images"][:1], missing_views="repeat_primary"))
    assert one["image_mask"].tolist() == [True, True, True]
    for v in (1, 2):
        torch.testing.assert_close(one["pixel_values"][v], default["pixel_values"][0], rtol=0, atol=0)
    two = transform(raw(missing_views="repeat_primary"))
    torch.testing.assert_close(two["pixel_values"][:2], default["pixel_values"][:2], rtol=0, atol=0)
    torch.testing.assert_close(two["pixel_values"][2], default["pixel_values"][0], rtol=0, atol=0)


def test_constant_image_is_resized_and_normalised_exactly(config: Any, tokenizer: Any) -> None:
    image = np.empty((30, 50, 3), dtype=np.uint8)
    image[:] = (255, 0, 128)
    out = ObservationTransform(config, tokenizer, train=False)(raw(images=[image]))
    expected = (torch.tensor([255, 0, 128]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    torch.testing.assert_close(out["pixel_values"][0], expected.view(3, 1, 1).expand(3, 64, 64))


def test_resize_keeps_layout_without_aspect_preservation(config: Any, tokenizer: Any) -> None:
    image = np.zeros((32, 128, 3), dtype=np.uint8)
    image[:, 64:, 0] = 255  # right half red: stays the right half after squashing to 64 x 64
    out = ObservationTransform(config, tokenizer, train=False)(raw(images=[image]))
    red = out["pixel_values"][0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.all(red[:, :30] < 0.01) and torch.all(red[:, 34:] > 0.99)


def test_jitter_only_in_training_and_deterministic_with_a_generator(config: Any, tokenizer: Any) -> None:
    train = ObservationTransform(config, tokenizer, train=True)
    evaluate = ObservationTransform(config, tokenizer, train=False)
    a = train(raw(), torch.Generator().manual_seed(1))["pixel_values"]
    b = train(raw(), torch.Generator().manual_seed(1))["pixel_values"]
    c = train(raw(), torch.Generator().manual_seed(2))["pixel_values"]
    plain = evaluate(raw(), torch.Generator().manual_seed(1))["pixel_values"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, plain)
    torch.testing.assert_close(plain, evaluate(raw())["pixel_values"])


def test_random_shift_moves_content_by_at_most_the_pad() -> None:
    img = torch.zeros(3, 16, 16)
    img[:, 7, 9] = 1.0  # one bright pixel
    seen = set()
    for seed in range(40):
        out = random_shift(img, 3, torch.Generator().manual_seed(seed))
        assert out.shape == img.shape
        (y, x) = torch.nonzero(out[0]).tolist()[0]
        assert abs(y - 7) <= 3 and abs(x - 9) <= 3
        seen.add((y, x))
    assert len(seen) > 10  # offsets vary with the generator
    edge = torch.zeros(3, 8, 8)
    edge[:, 0, :] = 1.0  # replicate padding repeats the border instead of inventing black bars
    shifted = random_shift(edge, 2, torch.Generator().manual_seed(0))
    assert set(shifted.unique().tolist()) <= {0.0, 1.0}


def test_augment_options_apply_only_in_training(config: Any, tokenizer: Any) -> None:
    shift = Augment(color_jitter=False, shift_px=4)
    evaluate = ObservationTransform(config, tokenizer, train=False, augment=shift)
    plain = ObservationTransform(config, tokenizer, train=False)(raw())["pixel_values"]
    torch.testing.assert_close(evaluate(raw(), torch.Generator().manual_seed(1))["pixel_values"], plain)
    train = ObservationTransform(config, tokenizer, train=True, augment=shift)
    outs = [train(raw(), torch.Generator().manual_seed(s))["pixel_values"] for s in range(4)]
    assert any(not torch.allclose(o, plain) for o in outs)
    off = ObservationTransform(config, tokenizer, train=True, augment=Augment(color_jitter=False))
    torch.testing.assert_close(off(raw(), torch.Generator().manual_seed(1))["pixel_values"], plain)
    with pytest.raises(ValueError, match="shift_px"):
        Augment(shift_px=-1)


def test_color_jitter_semantics() -> None:
    gray = torch.full((3, 4, 4), 0.5)
    for seed in range(20):  # contrast and saturation leave a uniform gray image alone: only brightness acts
        out = color_jitter(gray, torch.Generator().manual_seed(seed))
        factor = out[0, 0, 0].item() / 0.5
        assert 0.8 <= factor <= 1.2 and torch.allclose(out, torch.full_like(out, out[0, 0, 0].item()))
    rng = torch.Generator().manual_seed(0)
    img = torch.rand(3, 8, 8, generator=rng)
    out = color_jitter(img, torch.Generator().manual_seed(3))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, img)


def test_text_is_padded_and_truncated(config: Any, tokenizer: Any) -> None:
    transform = ObservationTransform(config, tokenizer, train=False)
    short = transform(raw(instruction="open the drawer"))
    n = int(short["attention_mask"].sum())
    assert 2 < n < 24 and torch.all(short["input_ids"][n:] == tokenizer.pad_token_id)
    assert tokenizer.decode(short["input_ids"][:n], skip_special_tokens=True) == "open the drawer"
    long = transform(raw(instruction="open the drawer " * 40))
    assert long["input_ids"].shape == (24,) and bool(long["attention_mask"].all())


def test_token_ids_are_memoised_bounded_and_not_shared(
    config: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xvla.data.transforms as transforms

    monkeypatch.setattr(transforms, "TOKEN_CACHE_SIZE", 3)
    transform = ObservationTransform(config, tokenizer, train=False)
    first = transform(raw(instruction="open the drawer"))
    first["input_ids"][0] = 99  # a consumer writing into its batch must not change later samples
    again = transform(raw(instruction="open the drawer"))
    direct = tokenizer("open the drawer", padding="max_length", max_length=24, return_tensors="pt")
    assert torch.equal(again["input_ids"], direct["input_ids"][0])
    for i in range(10):
        transform(raw(instruction=f"open the drawer {i}"))
        assert len(transform._tokens) <= 3


def test_single_arm_padding_and_missing_action(config: Any, tokenizer: Any) -> None:
    transform = ObservationTransform(config, tokenizer, train=False)
    proprio = np.arange(10, dtype=np.float32)
    out = transform(raw(proprio=proprio, action=np.ones((30, 10), dtype=np.float32)))
    torch.testing.assert_close(out["proprio"], torch.cat([torch.arange(10.0), torch.zeros(10)]))
    assert torch.all(out["action"][:, :10] == 1) and torch.all(out["action"][:, 10:] == 0)
    assert "action" not in transform(raw(action=None))  # serving: no targets


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"images": []}, r"images: expected 1 to 3 views"),
        ({"images": [np.zeros((8, 8, 3), np.uint8)] * 4}, r"images: expected 1 to 3 views"),
        ({"images": [np.zeros((8, 8, 3), np.float32)]}, r"images: expected uint8 \[H, W, 3\] RGB"),
        ({"images": [np.zeros((8, 8), np.uint8)]}, r"images: expected uint8 \[H, W, 3\] RGB"),
        ({"proprio": np.zeros(21)}, r"proprio: expected a last dimension <= 20"),
        ({"action": np.zeros((29, 20))}, r"action: expected \[30, <= 20\]"),
        ({"missing_views": "black"}, r"missing_views: expected one of \('zeros', 'mask', 'repeat_primary'\)"),
    ],
)
def test_bad_input_is_named(config: Any, tokenizer: Any, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ObservationTransform(config, tokenizer, train=False)(raw(**changes))


def test_collate_and_a_model_forward(config: Any, tokenizer: Any) -> None:
    from xvla.model.xvla import XVLA

    transform = ObservationTransform(config, tokenizer, train=True)
    gen = torch.Generator().manual_seed(0)
    batch = collate([transform(raw(domain_id=i), gen) for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 3, 64, 64) and batch["action"].shape == (3, 30, 20)
    assert batch["domain_id"].tolist() == [0, 1, 2]
    torch.manual_seed(0)
    loss = XVLA(config)(batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="collate: sample 1 has keys"):
        collate([transform(raw()), transform(raw(action=None))])
