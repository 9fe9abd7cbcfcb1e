"""Route per-stage K/V contexts to our positive chunks of ComfyUI's cond/uncond batch (comfyui-host.md A4).

Inside an attn2 patch, `context` stacks len(cond_or_uncond) equal batch chunks (0 = positive, 1 = negative,
in any order), each padded to a common token length by repetition. A positive chunk is ours when it is
exactly the conditioning our node returned (its `base`), possibly repeated; we give it the current stage's
K-encoded prompt as keys and V-encoded prompt as values. Everything else passes through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Binding", "ContextRouter", "match_chunks", "route_contexts"]


@dataclass(frozen=True, eq=False)
class Binding:
    """One identity prompt at one stage: `base` [1, L0, C] recognises its chunks; `keys`/`values` [1, Lk, C]
    replace them (keys feed to_k, values feed to_v). `block_len`: the host's text-chunk length (77 for CLIP),
    the grid on which a concatenated conditioning may hold the base; 0 = the base's own length."""

    base: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    block_len: int = 0
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


def _base_runs(chunk: torch.Tensor, base: torch.Tensor, block: int, atol: float) -> tuple[int, ...]:
    """Token offsets where `base` [1, L0, C] stands in every row of `chunk` [rows, L, C], on the grid of `block`
    tokens (the host's text-chunk length), found left to right without overlap.

    A chunk that is our conditioning repeated to the LCM length holds it at every multiple of L0; one that
    ConditioningConcat glued to other prompts holds it somewhere on the chunk grid — also a multi-chunk prompt
    (154 tokens) after a 77-token one. A length off the grid matches nowhere."""
    rows, length, width = chunk.shape
    base_len = base.shape[1]
    if width != base.shape[2] or length < base_len or length % block or base_len % block:
        return ()
    nb, nbase = length // block, base_len // block
    tiled = chunk.reshape(rows, nb, 1, block, width)
    ref = base.reshape(1, 1, nbase, block, width)
    close = (tiled == ref) if atol == 0 else ((tiled - ref).abs() <= atol)
    same = close.all(dim=4).all(dim=3).all(dim=0).tolist()  # [nb][nbase]: chunk block i == base block j
    runs, i = [], 0
    while i + nbase <= nb:
        if all(same[i + j][j] for j in range(nbase)):
            runs.append(i * block)
            i += nbase
        else:
            i += 1
    return tuple(runs)


ChunkMatch = tuple[int, tuple[int, ...], bool]
"""(binding index, token offsets of that binding's base in the chunk, whether those runs fill the whole chunk)."""


def _match(
    context: torch.Tensor, cond_or_uncond: Sequence[int], bindings: Sequence[Binding], atol: float
) -> tuple[tuple[ChunkMatch | None, ...], tuple[int, ...]]:
    """Per chunk the match (or None), plus the bindings found glued to other tokens that cannot be spliced
    (their keys are longer than their base, so they cannot take its place inside the chunk)."""
    per = _split(context, cond_or_uncond)
    matches: list[ChunkMatch | None] = []
    unspliced: list[int] = []
    for i, code in enumerate(cond_or_uncond):
        found = None
        if code == 0:
            chunk = context[i * per : (i + 1) * per]
            for b, binding in enumerate(bindings):
                base = binding.cast(context.dtype, context.device)[0]
                runs = _base_runs(chunk, base, binding.block_len or base.shape[1], atol)
                if not runs:
                    continue
                whole = len(runs) * base.shape[1] == chunk.shape[1]
                if whole or binding.keys.shape[1] == binding.base.shape[1]:
                    found = (b, runs, whole)
                    break
                unspliced.append(b)
        matches.append(found)
    return tuple(matches), tuple(unspliced)


def match_chunks(
    context: torch.Tensor, cond_or_uncond: Sequence[int], bindings: Sequence[Binding], atol: float = 0.0
) -> tuple[int | None, ...]:
    """For each batch chunk, the index of the first binding whose base it holds (positive chunks only), else None.

    A chunk holds a base when it is that base repeated, or contains it as whole runs on the chunk grid
    (ConditioningConcat); the latter only counts when the binding's keys have the base's length, so they can
    take its place. Each comparison reads the chunk back to the host (a device sync); ContextRouter avoids
    repeating it.
    """
    return tuple(None if m is None else m[0] for m in _match(context, cond_or_uncond, bindings, atol)[0])


def _check_value(context: torch.Tensor, value: torch.Tensor) -> None:
    if value.shape[:2] != context.shape[:2]:
        raise ValueError(f"value {list(value.shape)} must have the batch and length of context {list(context.shape)}")


def _swap_runs(part: torch.Tensor, runs: tuple[int, ...], replacement: torch.Tensor) -> torch.Tensor:
    """`part` [rows, L, C] with the L0 tokens at each offset in `runs` replaced by `replacement` [1, L0, C]."""
    out = part.clone()
    span = replacement.shape[1]
    for start in runs:
        out[:, start : start + span] = replacement.to(part.dtype)
    return out


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
            b, runs, whole = match
            _, keys, _ = bindings[b].cast(context.dtype, context.device)
            _, _, values = bindings[b].cast(value.dtype, value.device)
            if whole:
                ctx_part, val_part = keys.expand(per, -1, -1), values.expand(per, -1, -1)
            else:
                ctx_part = _swap_runs(ctx_part, runs, keys)
                val_part = _swap_runs(val_part, runs, values)
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
    return _apply(context, value, _match(context, cond_or_uncond, bindings, atol)[0], bindings)


class ContextRouter:
    """route_contexts for one set of bindings, remembering the last match decision.

    ComfyUI hands the same context tensor to every attention site of a step, so matching (which syncs with
    the device) is done once per step instead of at 16-70 sites, and when the value tensor is the same object
    too (the usual case) the routed pair itself is reused. The memo holds references to those tensors, so
    their memory cannot be reused by another tensor while remembered; it assumes no one edits a context
    tensor in place (inference tensors carry no version counter to check).

    `on_unspliced` is called whenever a chunk holds one of our bases glued to other tokens that cannot be swapped
    (see match_chunks): that conditioning then only has the identity's single-vector fallback, and the user
    should hear why.
    """

    def __init__(self, bindings: Sequence[Binding], atol: float = 0.0,
                 on_unspliced: Callable[[], None] | None = None) -> None:
        self.bindings = tuple(bindings)
        self.atol = atol
        self.on_unspliced = on_unspliced
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
            matches, unspliced = _match(context, codes, self.bindings, self.atol)
            self._last = (context, codes, matches)
            if unspliced and self.on_unspliced is not None:
                self.on_unspliced()
        ctx, val = _apply(context, value, matches, self.bindings)
        self._routed = (context, value, ctx, val)
        return ctx, val
