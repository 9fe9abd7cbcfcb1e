"""Route per-stage K/V contexts to our positive chunks of ComfyUI's cond/uncond batch (comfyui-host.md A4).

Inside an attn2 patch, `context` stacks len(cond_or_uncond) equal batch chunks (0 = positive, 1 = negative,
in any order), each padded to a common token length by repetition. A positive chunk is ours when it is
exactly the conditioning our node returned (its `base`), possibly repeated; we give it the current stage's
K-encoded prompt as keys and V-encoded prompt as values. Everything else passes through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Binding", "ContextRouter", "match_chunks", "route_contexts"]


@dataclass(frozen=True, eq=False)
class Binding:
    """One identity prompt at one stage: `base` [1, L0, C] recognises its chunks; `keys`/`values` [1, Lk, C]
    replace them (keys feed to_k, values feed to_v)."""

    base: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    _casts: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        for name in ("base", "keys", "values"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 1 or t.shape[1] < 1:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"Binding.{name} must be a tensor [1, L, C], got {shape}")
        if self.keys.shape != self.values.shape:
            raise ValueError(
                f"keys {list(self.keys.shape)} and values {list(self.values.shape)} must have the same shape: "
                "encode the K and V prompts from the same text"
            )
        if self.keys.shape[2] != self.base.shape[2]:
            raise ValueError(f"keys width {self.keys.shape[2]} differs from base width {self.base.shape[2]}")

    def cast(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base, keys, values) on `device` in `dtype`, converted once and then reused at every site and step."""
        key = (dtype, device)
        cached = self._casts.get(key)
        if cached is None:
            cached = tuple(t.detach().to(device=device, dtype=dtype) for t in (self.base, self.keys, self.values))
            self._casts[key] = cached
        return cached  # type: ignore[return-value]


def _split(context: torch.Tensor, codes: Sequence[int]) -> int:
    """Rows per chunk; raises if the batch cannot be the host's equal chunks."""
    if not codes or context.ndim != 3 or context.shape[0] % len(codes):
        raise ValueError(
            f"context {list(context.shape)} cannot be split into {len(codes)} equal batch chunks "
            f"(cond_or_uncond={list(codes)})"
        )
    return context.shape[0] // len(codes)


def _base_blocks(chunk: torch.Tensor, base: torch.Tensor, atol: float) -> tuple[bool, ...]:
    """For each L0-token block of `chunk` [rows, L, C], whether it is `base` [1, L0, C] in every row.

    A chunk that is our conditioning repeated to the LCM length matches in every block; one that ConditioningConcat
    glued to other tokens matches in some. A length that is not a multiple of L0 matches nowhere."""
    rows, length, width = chunk.shape
    base_len = base.shape[1]
    if width != base.shape[2] or length % base_len:
        return ()
    tiled = chunk.reshape(rows, length // base_len, base_len, width)
    ref = base.reshape(1, 1, base_len, width)
    if atol == 0:
        same = (tiled == ref).all(dim=3).all(dim=2).all(dim=0)
    else:
        same = ((tiled - ref).abs() <= atol).all(dim=3).all(dim=2).all(dim=0)
    return tuple(same.tolist())


ChunkMatch = tuple[int, tuple[bool, ...]]
"""(binding index, which L0-blocks of the chunk hold that binding's base)."""


def _match(
    context: torch.Tensor, cond_or_uncond: Sequence[int], bindings: Sequence[Binding], atol: float
) -> tuple[ChunkMatch | None, ...]:
    per = _split(context, cond_or_uncond)
    matches: list[ChunkMatch | None] = []
    for i, code in enumerate(cond_or_uncond):
        found = None
        if code == 0:
            chunk = context[i * per : (i + 1) * per]
            for b, binding in enumerate(bindings):
                blocks = _base_blocks(chunk, binding.cast(context.dtype, context.device)[0], atol)
                if any(blocks) and (all(blocks) or binding.keys.shape[1] == binding.base.shape[1]):
                    found = (b, blocks)
                    break
        matches.append(found)
    return tuple(matches)


def match_chunks(
    context: torch.Tensor, cond_or_uncond: Sequence[int], bindings: Sequence[Binding], atol: float = 0.0
) -> tuple[int | None, ...]:
    """For each batch chunk, the index of the first binding whose base it holds (positive chunks only), else None.

    A chunk holds a base when it is that base repeated, or contains it as whole aligned blocks (ConditioningConcat);
    the latter only counts when the binding's keys have the base's length, so they can take its place.
    Each comparison reads the chunk back to the host (a device sync); ContextRouter avoids repeating it.
    """
    return tuple(None if m is None else m[0] for m in _match(context, cond_or_uncond, bindings, atol))


def _check_value(context: torch.Tensor, value: torch.Tensor) -> None:
    if value.shape[:2] != context.shape[:2]:
        raise ValueError(f"value {list(value.shape)} must have the batch and length of context {list(context.shape)}")


def _swap_blocks(part: torch.Tensor, blocks: tuple[bool, ...], replacement: torch.Tensor) -> torch.Tensor:
    """`part` [rows, L, C] with each flagged L0-block replaced by `replacement` [1, L0, C]."""
    rows, length, width = part.shape
    tiled = part.reshape(rows, len(blocks), length // len(blocks), width).clone()
    flags = torch.tensor(blocks, device=part.device)
    tiled[:, flags] = replacement.to(part.dtype).reshape(1, 1, -1, width)
    return tiled.reshape(rows, length, width)


def _apply(
    context: torch.Tensor,
    value: torch.Tensor,
    matches: Sequence[ChunkMatch | None],
    bindings: Sequence[Binding],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap matched chunks (or their matched blocks) for their bindings' keys/values, repeat all chunks to the
    LCM length, concatenate. With no match, return the inputs themselves: the common case costs nothing."""
    if all(m is None for m in matches):
        return context, value
    per = context.shape[0] // len(matches)
    ctx_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    for i, match in enumerate(matches):
        ctx_part, val_part = context[i * per : (i + 1) * per], value[i * per : (i + 1) * per]
        if match is not None:
            b, blocks = match
            _, keys, _ = bindings[b].cast(context.dtype, context.device)
            _, _, values = bindings[b].cast(value.dtype, value.device)
            if all(blocks):
                ctx_part, val_part = keys.expand(per, -1, -1), values.expand(per, -1, -1)
            else:
                ctx_part = _swap_blocks(ctx_part, blocks, keys)
                val_part = _swap_blocks(val_part, blocks, values)
        ctx_parts.append(ctx_part)
        val_parts.append(val_part)
    # Repeat, never zero-pad: repeated tokens leave softmax attention unchanged, zero keys do not.
    length = math.lcm(*(p.shape[1] for p in ctx_parts))
    ctx = torch.cat([p.repeat(1, length // p.shape[1], 1) if p.shape[1] != length else p for p in ctx_parts])
    val = torch.cat([p.repeat(1, length // p.shape[1], 1) if p.shape[1] != length else p for p in val_parts])
    return ctx, val


def route_contexts(
    context: torch.Tensor,
    value: torch.Tensor,
    cond_or_uncond: Sequence[int],
    bindings: Sequence[Binding],
    atol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, value) with our positive chunks replaced by their bindings' keys and values.

    `context`/`value` are [B, L, C] made of len(cond_or_uncond) equal chunks. Chunks that match no binding
    keep their own context and value slices. When nothing matches, the very same tensor objects come back.
    """
    _check_value(context, value)
    return _apply(context, value, _match(context, cond_or_uncond, bindings, atol), bindings)


class ContextRouter:
    """route_contexts for one set of bindings, remembering the last match decision.

    ComfyUI hands the same context tensor to every attention site of a step, so matching (which syncs with
    the device) is done once per step instead of at 16-70 sites, and when the value tensor is the same object
    too (the usual case) the routed pair itself is reused. The memo holds references to those tensors, so
    their memory cannot be reused by another tensor while remembered; it assumes no one edits a context
    tensor in place (inference tensors carry no version counter to check).
    """

    def __init__(self, bindings: Sequence[Binding], atol: float = 0.0) -> None:
        self.bindings = tuple(bindings)
        self.atol = atol
        self._last: tuple[torch.Tensor, tuple[int, ...], tuple[ChunkMatch | None, ...]] | None = None
        self._routed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(
        self, context: torch.Tensor, value: torch.Tensor, cond_or_uncond: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as route_contexts(context, value, cond_or_uncond, self.bindings, self.atol)."""
        _check_value(context, value)
        codes = tuple(cond_or_uncond)
        last = self._last
        if last is not None and last[0] is context and last[1] == codes:
            routed = self._routed
            if routed is not None and routed[0] is context and routed[1] is value:
                return routed[2], routed[3]
            matches = last[2]
        else:
            matches = _match(context, codes, self.bindings, self.atol)
            self._last = (context, codes, matches)
        ctx, val = _apply(context, value, matches, self.bindings)
        self._routed = (context, value, ctx, val)
        return ctx, val
