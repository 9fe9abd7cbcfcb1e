"""Flip / scale augmentation: deterministic given the generator, image and mask stay aligned."""

from __future__ import annotations

import pytest
import torch

from sefi_core.augment import augment, random_flip, random_scale


def _batch(b: int = 8, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, size, size, generator=g)
    masks = torch.zeros(b, size, size)
    masks[:, 8:20, 4:14] = 1  # off-centre so flips and shifts are visible
    images[:, 0] = masks  # channel 0 mirrors the mask: alignment is checkable
    return images, masks


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_generator_seed_same_augmentation() -> None:
    images, masks = _batch()
    a = augment(images, masks, _rng(3), flip=True, scale_range=(0.8, 1.2))
    b = augment(images, masks, _rng(3), flip=True, scale_range=(0.8, 1.2))
    c = augment(images, masks, _rng(4), flip=True, scale_range=(0.8, 1.2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_flip_probability_extremes_and_mask_follow() -> None:
    images, masks = _batch()
    out, m = random_flip(images, masks, _rng(0), p=1.0)
    assert torch.equal(out, images.flip(-1)) and torch.equal(m, masks.flip(-1))
    out, m = random_flip(images, masks, _rng(0), p=0.0)
    assert torch.equal(out, images) and torch.equal(m, masks)
    out, m = random_flip(images, masks[:, None], _rng(1))
    assert m.shape == (8, 1, 32, 32)
    flipped = [not torch.equal(out[i], images[i]) for i in range(8)]
    assert 0 < sum(flipped) < 8
    assert torch.equal(out[:, 0:1], m)  # each mask flipped with its own image


def test_unit_scale_is_identity() -> None:
    images, masks = _batch()
    out, m = random_scale(images, masks, _rng(0), (1.0, 1.0))
    torch.testing.assert_close(out, images)
    torch.testing.assert_close(m, masks)


def test_zoom_in_keeps_image_and_mask_aligned() -> None:
    images, masks = _batch()
    out, m = random_scale(images, masks, _rng(5), (1.5, 1.5))
    torch.testing.assert_close(out[:, 0], m, atol=1e-6, rtol=0)  # no padding when zooming in
    # the face grows by 1.5^2 wherever it stays in frame, so its area cannot shrink much
    assert m.sum() > masks.sum()


def test_zoom_out_shrinks_the_mask_area_and_pads_with_no_face() -> None:
    images = torch.rand(2, 3, 32, 32)
    masks = torch.ones(2, 32, 32)
    out, m = random_scale(images, masks, _rng(0), (0.5, 0.5))
    assert m.mean().item() == pytest.approx(0.25, abs=0.03)
    assert out.shape == images.shape and out.dtype == images.dtype


def test_disabled_augmentations_draw_nothing_and_change_nothing() -> None:
    images, masks = _batch()
    rng = _rng(9)
    state = rng.get_state()
    out, m = augment(images, masks, rng, flip=False, scale_range=None)
    assert torch.equal(out, images) and torch.equal(m, masks)
    assert torch.equal(rng.get_state(), state)


def test_shape_errors() -> None:
    images, masks = _batch()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_flip(images[0], None, _rng(0))
    with pytest.raises(ValueError, match="do not match"):
        random_flip(images, masks[:, :16], _rng(0))
    with pytest.raises(ValueError, match="scale_range"):
        random_scale(images, masks, _rng(0), (1.2, 0.8))
