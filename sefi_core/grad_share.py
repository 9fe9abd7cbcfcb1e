"""How much each loss term steers the trainable parameters: its share of the gradient norm.

A loss value says little about a regulariser's effect — the attention term can be 1e-7 of the total and still
move the tokens, or be sizeable and move nothing. What decides is the gradient each term sends to the trainable
parameters. ``share_i = ||∇θ term_i|| / Σ_j ||∇θ term_j||`` (each term already weighted, e.g. λ·L_attn) is
logged at the training node's log steps and drawn on its loss curve, so a run on a real checkpoint shows
whether the attention term matters at the chosen λ.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["gradient_norms", "gradient_shares"]


def gradient_norms(terms: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """L2 norm of each term's gradient over all ``params`` (one extra backward per term, graph kept)."""
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, list(params), retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[name] = math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0  # one device sync per term
    return norms


def gradient_shares(terms: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """``{"grad_share_<term>": share}``, shares in [0, 1] summing to 1 (all 0 when no term has a gradient).
    Non-finite norms give NaN shares rather than an error: the loop's own checks decide about divergence."""
    norms = gradient_norms(terms, params)
    total = sum(norms.values())
    if not math.isfinite(total):
        return {f"grad_share_{k}": math.nan for k in norms}
    return {f"grad_share_{k}": (v / total if total > 0 else 0.0) for k, v in norms.items()}
