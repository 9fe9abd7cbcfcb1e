"""The live preview a training node shows while it runs: the loss curve (with the attention term's gradient share)
beside the latest sample render, with the step reached.

A picture, not a widget: the host already draws a running node's progress preview (what samplers use for latent
previews), so the same channel shows training on every ComfyUI frontend without any JavaScript of ours.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .plot import render_loss_curve

__all__ = ["CURVE_SIZE", "preview_due", "render_watch_picture", "to_uint8"]

CURVE_SIZE = (512, 256)
"""(width, height) of the loss-curve panel; the sample panel is scaled to the same height."""


def preview_due(step: int, total: int, every: int) -> bool:
    """Whether 1-based `step` refreshes the preview: the first step, every `every`-th and the last (0 = never)."""
    return every > 0 and (step == 1 or step % every == 0 or step == total)


def to_uint8(image) -> np.ndarray:
    """An IMAGE-like array (float 0..1 [H, W, 3] or uint8) as uint8 [H, W, 3]."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB picture [H, W, 3], got shape {a.shape}")
    return a


def _fit_height(picture: np.ndarray, height: int) -> np.ndarray:
    h, w = picture.shape[:2]
    width = max(1, round(w * height / h))
    # Small renders (64 px training) are scaled up: nearest keeps them sharp instead of smearing them.
    resample = Image.Resampling.NEAREST if height >= h else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(picture).resize((width, height), resample), dtype=np.uint8)


def render_watch_picture(history: Sequence[float], shares: Sequence[tuple[int, float]], step: int, total: int,
                         sample: np.ndarray | None = None, sample_step: int | None = None,
                         note: str | None = None) -> np.ndarray:
    """uint8 [256, 512 (+ sample width), 3]: the loss curve titled with the step reached, and `sample` (the latest
    sample render or grid, float 0..1 or uint8 [H, W, 3]) to its right, labelled with the step it was rendered at.
    `note` (e.g. that a sample render failed) ends the title."""
    width, height = CURVE_SIZE
    title = f"step {step}/{total}" + (f"  |  sample: step {sample_step}" if sample is not None and sample_step
                                      else "") + (f"  |  {note}" if note else "")
    curve = render_loss_curve(history, width, height, title=title, shares=shares)
    if sample is None:
        return curve
    return np.concatenate([curve, _fit_height(to_uint8(sample), height)], axis=1)
