"""Deterministic flip / scale augmentation of training images and their face masks.

The method trains on a single image per identity (method.md §1.5), so mild geometric
augmentation is the only source of variety besides noise and timestep. All randomness comes
from the ``torch.Generator`` passed in — the training loop seeds one per step from
``(seed, step)`` — so a resumed run sees exactly the same augmentations.

Images are ``[B, C, H, W]`` (pixels or latents); masks are ``[B, H, W]`` or ``[B, 1, H, W]``
soft masks. The same transform is applied to an image and its mask. Random numbers are drawn
on the CPU generator and in a fixed order, independent of the tensors' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_flip", "random_scale", "augment"]


def _check(images: Tensor, masks: Tensor | None) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if masks is not None:
        if masks.dim() not in (3, 4) or (masks.dim() == 4 and masks.shape[1] != 1):
            raise ValueError(f"masks must be [B, H, W] or [B, 1, H, W], got {tuple(masks.shape)}")
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")


def random_flip(
    images: Tensor, masks: Tensor | None, rng: torch.Generator, p: float = 0.5
) -> tuple[Tensor, Tensor | None]:
    """Mirror each sample left-right with probability ``p`` (faces are near-symmetric)."""
    _check(images, masks)
    flip = (torch.rand(images.shape[0], generator=rng) < p).to(images.device)
    out = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if masks is None:
        return out, None
    fm = flip.view(-1, *([1] * (masks.dim() - 1)))
    return out, torch.where(fm, masks.flip(-1), masks)


def random_scale(
    images: Tensor,
    masks: Tensor | None,
    rng: torch.Generator,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> tuple[Tensor, Tensor | None]:
    """Zoom each sample by a factor drawn uniformly from ``scale_range``, at a random offset.

    ``s > 1`` crops a random ``1/s`` window and enlarges it; ``s < 1`` shrinks the image onto
    a same-size canvas at a random position, filling the border by edge replication (black
    borders would teach the identity a frame). Offsets are drawn so the image never slides
    out of view. Masks are transformed identically, with zeros outside (no face there).
    Bilinear resampling, ``align_corners=False``.
    """
    _check(images, masks)
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    b = images.shape[0]
    u = torch.rand(b, 3, generator=rng, dtype=torch.float64)
    s = lo + (hi - lo) * u[:, 0]
    room = (1.0 / s - 1.0).abs()  # max |shift| in normalised coords that keeps the frame covered
    tx = (2 * u[:, 1] - 1) * room
    ty = (2 * u[:, 2] - 1) * room
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    work = images.float()
    grid = F.affine_grid(theta.to(work), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.to(images.dtype)
    if masks is None:
        return out, None
    m4 = (masks[:, None] if masks.dim() == 3 else masks).float()
    mo = F.grid_sample(m4, grid.to(m4.device), mode="bilinear", padding_mode="zeros", align_corners=False)
    mo = mo.to(masks.dtype)
    return out, (mo[:, 0] if masks.dim() == 3 else mo)


def augment(
    images: Tensor,
    masks: Tensor | None,
    rng: torch.Generator,
    *,
    flip: bool = True,
    scale_range: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Apply the enabled augmentations in a fixed order (flip, then scale).

    The random draws of each enabled transform happen in that order on ``rng``; disabled
    transforms draw nothing.
    """
    if flip:
        images, masks = random_flip(images, masks, rng)
    if scale_range is not None and tuple(scale_range) != (1.0, 1.0):
        images, masks = random_scale(images, masks, rng, scale_range)
    return images, masks
