"""Loss-curve picture for the training node's IMAGE output.

Diffusion losses are dominated by timestep noise (a step at t~999 and one at t~10 differ by
orders of magnitude), so the raw curve alone says little. The plot draws the raw values
faintly and an exponential moving average on top, and sets the y range from the bulk of the
data (1st–99th percentile) so a single spike does not flatten everything else. Where the run
logged gradient shares (sefi_core.grad_share), the attention term's share of the gradient norm is
drawn in green against a 0–100 % scale on the right: the loss values alone do not say whether the
attention loss is doing anything.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["ema", "render_loss_curve", "term_shares"]

_BG = (255, 255, 255)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_RAW = (160, 190, 230)
_SMOOTH = (200, 40, 40)
_TEXT = (20, 20, 20)
_SHARE = (30, 150, 60)


def ema(values: Sequence[float], decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (so the first points are not pulled to 0)."""
    out: list[float] = []
    acc = 0.0
    weight = 0.0
    for v in values:
        acc = decay * acc + (1 - decay) * float(v)
        weight = decay * weight + (1 - decay)
        out.append(acc / weight)
    return out


def term_shares(parts_history: Sequence[dict], term: str = "attention") -> list[tuple[int, float]]:
    """(1-based step, share) for every logged step that has ``grad_share_<term>`` in its parts."""
    key = f"grad_share_{term}"
    return [(i + 1, float(p[key])) for i, p in enumerate(parts_history) if key in p and np.isfinite(p[key])]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def render_loss_curve(
    history: Sequence[float],
    width: int = 512,
    height: int = 256,
    *,
    title: str = "training loss",
    smoothing: float | None = None,
    shares: Sequence[tuple[int, float]] = (),
) -> np.ndarray:
    """Draw ``history`` (one loss per step) as an RGB ``uint8`` array ``[height, width, 3]``.

    Axes with min/mid/max y ticks and first/last step x ticks, raw curve (light blue) and EMA
    (dark red), a legend with the last smoothed value. ``smoothing`` is the EMA decay; by
    default it grows with the run length (``1 - 20/len``, within [0.8, 0.99]) so a 600-step
    curve averages over ~20 steps. Non-finite values are skipped; an empty history gives an
    empty frame saying so. ``shares``: (step, attention gradient share in [0, 1]) points, drawn
    in green on the right-hand 0–100 % scale with the last value in the legend.
    """
    if width < 64 or height < 48:
        raise ValueError(f"the loss plot needs at least 64x48 pixels, got {width}x{height}")
    img = Image.new("RGB", (int(width), int(height)), _BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 8, 18, height - 20
    draw.text((left, 3), title, fill=_TEXT, font=font)

    steps = np.arange(1, len(history) + 1, dtype=np.float64)
    raw = np.asarray(list(history), dtype=np.float64)
    keep = np.isfinite(raw)
    steps, raw = steps[keep], raw[keep]
    if raw.size == 0:
        draw.rectangle([left, top, right, bottom], outline=_AXIS)
        draw.text((left + 8, (top + bottom) // 2 - 5), "no loss values yet", fill=_TEXT, font=font)
        return np.asarray(img, dtype=np.uint8)

    if smoothing is None:
        smoothing = min(0.99, max(0.8, 1.0 - 20.0 / raw.size))
    smooth = np.asarray(ema(raw.tolist(), smoothing))
    lo = float(min(np.percentile(raw, 1), smooth.min()))
    hi = float(max(np.percentile(raw, 99), smooth.max()))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) + 1e-3), hi + 0.5 * (abs(hi) + 1e-3)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    x0, x1 = float(steps[0]), float(max(steps[-1], steps[0] + 1))

    def xy(sx: np.ndarray, sy: np.ndarray) -> list[tuple[float, float]]:
        px = left + (sx - x0) / (x1 - x0) * (right - left)
        py = bottom - (np.clip(sy, lo, hi) - lo) / (hi - lo) * (bottom - top)
        return list(zip(px.tolist(), py.tolist()))

    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((2, y - 5), _fmt(lo + frac * (hi - lo)), fill=_TEXT, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS)
    draw.text((left, bottom + 4), str(int(x0)), fill=_TEXT, font=font)
    last = str(int(steps[-1]))
    draw.text((right - 6 * len(last), bottom + 4), last, fill=_TEXT, font=font)
    draw.text(((left + right) // 2 - 12, bottom + 4), "step", fill=_TEXT, font=font)

    if raw.size == 1:
        (px, py), = xy(steps, raw)
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=_SMOOTH)
    else:
        draw.line(xy(steps, raw), fill=_RAW, width=1)
        draw.line(xy(steps, smooth), fill=_SMOOTH, width=2)
    if len(shares):
        pts = [(left + (s - x0) / (x1 - x0) * (right - left), bottom - min(max(v, 0.0), 1.0) * (bottom - top))
               for s, v in shares]
        if len(pts) > 1:
            draw.line(pts, fill=_SHARE, width=1)
        for px, py in pts:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=_SHARE)
        draw.text((right - 30, top), "100%", fill=_SHARE, font=font)
        draw.text((left + 6, bottom - 12), f"attention grad share {100 * shares[-1][1]:.1f}%", fill=_SHARE,
                  font=font)
    legend = f"EMA {smoothing:.3g}: {_fmt(float(smooth[-1]))}"
    x_legend = max(left + 6 * len(title) + 12, right - 6 * len(legend))
    draw.text((x_legend - 30, 3), "raw", fill=_RAW, font=font)
    draw.text((x_legend, 3), legend, fill=_SMOOTH, font=font)
    return np.asarray(img, dtype=np.uint8)
