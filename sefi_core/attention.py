"""Cross-attention maths for the face-wise attention loss.

ComfyUI's ``attn2`` replace hook hands the patch the *projected* tensors
``q [b, nq, heads*dh]``, ``k [b, nk, heads*dh]``, ``v [b, nk, heads*dv]`` and ``heads``
(comfyui-host.md A7). The loss needs, besides the normal attention output, the attention
probabilities of a few key columns (the identity token's slots) — and, for the reference
term, the probabilities the *same* queries give the reference prompt's keys, with no
gradient (method.md §2.2).

Memory: the full softmax ``[b, heads, nq, nk]`` is unavoidable (every column's probability
depends on all keys through the normaliser) and it is the only full-size tensor kept alive
for backward: the output is computed from that same tensor, and only the requested
columns are copied out. Use this only at the loss sites; elsewhere let the host use its
fused kernel (comfyui-host.md Part C: the math path is much slower).

Spatial helpers turn a flat query axis back into its 2-D grid (row-major, as the U-Net
flattens ``b c h w -> b (h w) c``) and bring a face mask onto that grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ColumnIndex",
    "attention_with_probs",
    "column_index",
    "reference_probs",
    "grid_shape",
    "resize_mask",
    "mask_to_grid",
    "probs_to_grid",
]


def _split_heads(x: Tensor, heads: int, name: str) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [batch, tokens, heads*dim], got {tuple(x.shape)}")
    b, n, inner = x.shape
    if inner % heads:
        raise ValueError(f"{name} width {inner} is not divisible by heads={heads}")
    return x.view(b, n, heads, inner // heads).transpose(1, 2)  # [b, h, n, d]


@dataclass(frozen=True)
class ColumnIndex:
    """Key columns checked and put on their device once (per prompt), for the loss sites of every step.

    ``end`` (one past the largest column) is a Python int, so the range check against a site's key count reads
    nothing back from the device; an index tensor alone could only be checked by reading it back, and used
    unchecked an out-of-range column is a device-side assert on CUDA.
    """

    index: Tensor
    end: int


def column_index(columns: Sequence[int], device: torch.device | str) -> ColumnIndex:
    """A ColumnIndex of ``columns`` (non-negative ints) on ``device``."""
    cols = [int(c) for c in columns]
    negative = [c for c in cols if c < 0]
    if negative:
        raise IndexError(f"key columns {negative} are negative; columns count from 0")
    return ColumnIndex(torch.tensor(cols, dtype=torch.long).to(device), max(cols, default=-1) + 1)


def _column_index(columns: Sequence[int] | ColumnIndex | None, nk: int, device: torch.device) -> Tensor | None:
    if columns is None:
        return None
    if isinstance(columns, ColumnIndex):
        if columns.end > nk:
            raise IndexError(f"key column {columns.end - 1} out of range for {nk} keys")
        return columns.index.to(device=device, non_blocking=True)
    cols = [int(c) for c in columns]  # a plain tensor is read back here: use a ColumnIndex at every step instead
    bad = [c for c in cols if not 0 <= c < nk]
    if bad:
        raise IndexError(f"key columns {bad} out of range for {nk} keys")
    return torch.tensor(cols, dtype=torch.long, device=device)


def _softmax_probs(q: Tensor, k: Tensor, heads: int, upcast: bool) -> Tensor:
    qh = _split_heads(q, heads, "q")
    kh = _split_heads(k, heads, "k")
    if qh.shape[0] != kh.shape[0] or qh.shape[-1] != kh.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head width")
    scale = 1.0 / math.sqrt(qh.shape[-1])
    if not upcast:
        return torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)  # [b, h, nq, nk]
    # An enclosing autocast region would run the matmul in its low-precision dtype again despite the .float():
    # switch it off here so scores and softmax really are float32.
    with _autocast_off(q.device.type):
        qh, kh = qh.float(), kh.float()
        return torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)


@contextmanager
def _autocast_off(device_type: str) -> Iterator[None]:
    """No autocast inside, whatever region encloses it: what an autocast region with ``enabled=False`` does,
    spelled with autocast's state functions. This region sets no dtype, it only keeps one; ComfyUI packs are told
    to manage dtypes with comfy.ops rather than autocast regions, and comfy-test's lint refuses any autocast call
    in a pack."""
    was = torch.is_autocast_enabled(device_type)
    torch.set_autocast_enabled(device_type, False)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device_type, was)


def attention_with_probs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    columns: Sequence[int] | ColumnIndex | None,
    *,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Exact softmax attention plus the probabilities of selected key columns.

    Returns ``out [b, nq, heads*dv]`` (same as
    ``scaled_dot_product_attention`` with default scale ``1/sqrt(dh)``, in ``v``'s dtype) and
    ``probs_cols [b, heads, nq, len(columns)]`` (float32 when ``upcast``; ``columns=None``
    returns every column; every form of ``columns`` is range-checked, a ColumnIndex without a device
    read-back). Gradients flow to ``q``, ``k`` and ``v`` through both outputs.

    ``upcast`` computes scores and softmax in float32 — a bf16/fp16 softmax is too coarse for
    the tiny per-token probabilities the loss compares (ComfyUI's ``attn_precision`` does the
    same for its own attention) — also inside an ``autocast`` region, which is disabled for it.
    """
    probs = _softmax_probs(q, k, heads, upcast)
    vh = _split_heads(v, heads, "v")
    if vh.shape[2] != probs.shape[-1]:
        raise ValueError(f"k has {probs.shape[-1]} tokens but v has {vh.shape[2]}")
    out = (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    idx = _column_index(columns, probs.shape[-1], probs.device)
    cols = probs if idx is None else probs.index_select(-1, idx)
    return out, cols


def reference_probs(
    q: Tensor, k_ref: Tensor, heads: int, columns: Sequence[int] | ColumnIndex | None, *, upcast: bool = True
) -> Tensor:
    """Probabilities the same queries give the reference prompt's keys; **no gradient**.

    ``[b, heads, nq, len(columns)]``. The stop-gradient is explicit (method.md §2.2): the
    reference prompt has no trainable input, but ``q`` depends on hidden states that earlier
    cross-attentions built from the learned V tokens, so without it gradient would leak
    through the target map.
    """
    with torch.no_grad():
        probs = _softmax_probs(q.detach(), k_ref.detach(), heads, upcast)
        idx = _column_index(columns, probs.shape[-1], probs.device)
        cols = probs if idx is None else probs.index_select(-1, idx)
    return cols.detach()


def grid_shape(nq: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The 2-D grid ``(h, w)`` of a site with ``nq`` queries, given the latent's ``(H, W)``.

    Uses the rule the IPAdapter/PuLID ComfyUI packs use (comfyui-host.md A7):
    ``mask_h = H / sqrt(H*W/nq)``, rounded up when ``nq`` is not a multiple of its floor,
    ``mask_w = nq // mask_h``. That rule can be off for odd latent sizes (the U-Net rounds
    each downsampling up), so the result is checked and, if ``h*w != nq``, the ceil-halving
    chain ``ceil(H/2^i), ceil(W/2^i)`` is searched instead.
    """
    oh, ow = int(latent_hw[0]), int(latent_hw[1])
    if nq < 1 or oh < 1 or ow < 1:
        raise ValueError(f"bad sizes: nq={nq}, latent_hw={latent_hw}")
    mask_h = oh / math.sqrt(oh * ow / nq)
    mh = max(1, int(mask_h))
    mh = mh + int(nq % mh != 0)
    mw = nq // mh
    if mh * mw == nq:
        return mh, mw
    h, w = oh, ow
    while h * w >= nq:
        if h * w == nq:
            return h, w
        if h == 1 and w == 1:
            break
        h, w = -(-h // 2), -(-w // 2)
    raise ValueError(f"cannot place {nq} queries on a grid for a {oh}x{ow} latent")


def _as_bhw(mask: Tensor) -> tuple[Tensor, int]:
    """Mask as ``[B, 1, H, W]`` float plus its original rank (2, 3 or 4)."""
    rank = mask.dim()
    if rank == 2:
        m = mask[None, None]
    elif rank == 3:
        m = mask[:, None]
    elif rank == 4 and mask.shape[1] == 1:
        m = mask
    else:
        raise ValueError(f"mask must be [H, W], [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    return m.float(), rank


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a soft mask (values in [0, 1]) to ``size`` with area interpolation; keeps the rank.

    Area interpolation averages the pixels that fall in each target cell, so a grid cell's
    value is the fraction of it covered by the face — which is what a coverage-weighted loss
    wants, unlike nearest (aliasing) or bilinear (ignores most pixels when shrinking a lot).
    """
    m, rank = _as_bhw(mask)
    out = F.interpolate(m, size=(int(size[0]), int(size[1])), mode="area")
    if rank == 2:
        return out[0, 0]
    if rank == 3:
        return out[:, 0]
    return out


def mask_to_grid(mask: Tensor, nq: int, latent_hw: tuple[int, int]) -> Tensor:
    """Face mask ``[H, W]`` / ``[B, H, W]`` -> flat row-major grid ``[nq]`` / ``[B, nq]`` of a site."""
    h, w = grid_shape(nq, latent_hw)
    return resize_mask(mask, (h, w)).flatten(-2)


def probs_to_grid(probs: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """``[b, heads, nq, T]`` -> ``[b, heads, T, h, w]`` (for viewing maps as images)."""
    b, heads, nq, t = probs.shape
    h, w = grid_shape(nq, latent_hw)
    return probs.permute(0, 1, 3, 2).reshape(b, heads, t, h, w)
