"""How much each loss term steers the trainable parameters: its share of the gradient norm.

A loss value says little about a regulariser's effect — the attention term can be 1e-7 of the total and still
move the tokens, or be sizeable and move nothing. What decides is the gradient each term sends to the trainable
parameters. ``share_i = ||grad_theta term_i|| / sum_j ||grad_theta term_j||`` (each term already weighted,
e.g. lambda·L_attn) is logged at the training node's log steps and drawn on its loss curve, so a run on a real
checkpoint shows whether the attention term matters at the chosen lambda.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["backward_with_shares", "gradient_norms", "term_gradients"]


def term_gradients(terms: Mapping[str, Tensor], params: Sequence[Tensor],
                   keep_graph: bool = True) -> dict[str, list[Tensor | None]]:
    """Each term's gradient with respect to ``params`` (one backward per term; ``keep_graph=False`` frees the graph
    with the last one)."""
    grads: dict[str, list[Tensor | None]] = {}
    live = [name for name, term in terms.items() if term.requires_grad]
    for name, term in terms.items():
        if name not in live:
            grads[name] = [None] * len(params)
            continue
        last = name == live[-1]
        grads[name] = list(torch.autograd.grad(term, list(params), retain_graph=keep_graph or not last,
                                               allow_unused=True))
    return grads


def _norm(grads: Sequence[Tensor | None]) -> float:
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0  # one device sync per term


def gradient_norms(terms: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """L2 norm of each term's gradient over all ``params`` (the graph is kept)."""
    return {name: _norm(g) for name, g in term_gradients(terms, params).items()}


def _shares(norms: Mapping[str, float]) -> dict[str, float]:
    total = sum(norms.values())
    if not math.isfinite(total):
        return {f"grad_share_{k}": math.nan for k in norms}
    return {f"grad_share_{k}": (v / total if total > 0 else 0.0) for k, v in norms.items()}


def backward_with_shares(terms: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """What ``sum(terms).backward()`` does — each parameter's ``.grad`` gets the total gradient — plus the shares
    ``{"grad_share_<term>": share}``, in [0, 1] and summing to 1 (all 0 when no term has a gradient; NaN when a norm
    is not finite: the loop's own checks decide about divergence).

    The total is the sum of the terms' gradients (the gradient is linear), so the per-term backwards replace the
    loop's own one instead of coming on top of it: no graph is walked a third time (a compiled U-Net's backward
    is not built for that), and a logging step costs one backward per term, not one more."""
    grads = term_gradients(terms, params, keep_graph=False)
    for i, p in enumerate(params):
        parts = [g[i] for g in grads.values() if g[i] is not None]
        if parts:
            total = torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
            p.grad = total.detach() if p.grad is None else p.grad + total.detach()
    return _shares({name: _norm(g) for name, g in grads.items()})
