"""The attention-map picture a training run ends with: over each training photo, the identity token's
cross-attention map at the loss sites beside the reference word's map ("person" in the same prompt, same queries).

The face-wise loss pulls the first towards the second (docs/method.md §2.2), so the picture shows at a glance
whether the identity stayed on the face: both maps should light up the same region. Each map is the mean over the
heads, the identity's (or reference word's) columns and the loss sites, each site's grid resized to the photo.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .attention import grid_shape

__all__ = ["face_maps", "render_attention_picture", "site_map"]

_HEADER = 14
_LABELS = ("photo", "identity token", "reference word")


def site_map(probs: Tensor, positions: Sequence[int], latent_hw: tuple[int, int]) -> Tensor:
    """One site's map of the first batch row: ``probs [b, heads, nq, T]`` averaged over heads and the columns
    ``positions`` (indices into T) -> float32 ``[h, w]`` on the site's grid."""
    if probs.dim() != 4:
        raise ValueError(f"expected attention probabilities [b, heads, nq, T], got {tuple(probs.shape)}")
    cols = probs[0][..., list(positions)].float()
    h, w = grid_shape(probs.shape[2], latent_hw)
    return cols.mean(dim=(0, 2)).reshape(h, w)


def face_maps(id_probs: Sequence[Tensor], ref_probs: Sequence[Tensor], positions: Sequence[int],
              latent_hw: tuple[int, int], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The identity map and the reference map over a photo of ``size`` (h, w): each loss site's map
    (:func:`site_map`) resized bilinearly to ``size`` and averaged over the sites. ``id_probs[i]`` and
    ``ref_probs[i]`` are site i's probabilities of the training prompt's and the reference prompt's loss columns;
    ``positions`` are the identity slots among those columns (the reference word's in the reference columns)."""
    if not id_probs or len(id_probs) != len(ref_probs):
        raise ValueError(f"need the same number (>= 1) of identity and reference site maps, got {len(id_probs)} "
                         f"and {len(ref_probs)}")

    def mean_map(sites: Sequence[Tensor]) -> Tensor:
        grids = [site_map(p, positions, latent_hw).cpu()[None, None] for p in sites]
        return torch.cat([F.interpolate(g, size=size, mode="bilinear", align_corners=False) for g in grids]).mean(
            dim=(0, 1))

    return mean_map(id_probs), mean_map(ref_probs)


def _heat(photo: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """The photo dimmed, with the map (scaled to its own maximum) laid over it in red-yellow."""
    peak = float(amap.max())
    a = amap / peak if peak > 0 else np.zeros_like(amap)
    colour = np.stack([np.ones_like(a), a, np.zeros_like(a)], -1)  # red at low, yellow at the peak
    alpha = (0.75 * a)[..., None]
    return (photo * 0.45 * (1 - alpha) + colour * alpha * 255.0).clip(0, 255)


def render_attention_picture(photos: Tensor, id_maps: Sequence[Tensor], ref_maps: Sequence[Tensor],
                             cell: int = 192) -> np.ndarray:
    """uint8 [rows·(cell+header), 3·cell, 3]: one row per photo (float [B, H, W, 3] in 0..1), showing the photo,
    the identity map over it and the reference map over it (each map normalised to its own peak: the shapes are
    compared, not their scale)."""
    if photos.shape[0] != len(id_maps) or len(id_maps) != len(ref_maps):
        raise ValueError(f"{photos.shape[0]} photo(s) but {len(id_maps)} identity and {len(ref_maps)} reference maps")
    font = ImageFont.load_default()
    rows = []
    for photo, idm, refm in zip(photos, id_maps, ref_maps):
        pic = np.asarray(Image.fromarray((photo[..., :3].float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8))
                         .resize((cell, cell), Image.Resampling.BICUBIC), dtype=np.float32)

        def over(m: Tensor) -> np.ndarray:
            grid = F.interpolate(m[None, None].float().cpu(), size=(cell, cell), mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
            return _heat(pic, grid)

        row = np.concatenate([pic, over(idm), over(refm)], axis=1).astype(np.uint8)
        header = Image.new("RGB", (row.shape[1], _HEADER), (255, 255, 255))
        draw = ImageDraw.Draw(header)
        for i, label in enumerate(_LABELS):
            draw.text((i * cell + 4, 1), label, fill=(20, 20, 20), font=font)
        rows.append(np.concatenate([np.asarray(header, dtype=np.uint8), row], axis=0))
    return np.concatenate(rows, axis=0)
