"""Are trained token vectors at the scale of their text encoder's word embeddings?

A diverged run can leave tokens that are finite but enormous (~1e30): every check for NaN/Inf passes, the
identity loads, and sampling "succeeds" with an all-black picture (the text encoder overflows on them). The
yardstick is the text encoder's own embedding table — the mean length of its word vectors (~0.39 for CLIP-L, whose
components have a standard deviation of ~0.014) — never a constant, since models differ in scale. A trained token
may grow well past the words it started from; one a thousand times longer than an average word is not a learned
identity but the trace of a diverged run.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["MAX_SCALE_RATIO", "TokenScaleError", "check_token_scale", "check_embedding_norms", "embedding_norm",
           "token_scale_problem"]

MAX_SCALE_RATIO = 1000.0
"""How many times longer than the mean word embedding a token may be."""

ADVICE = ("training diverged (the learning rate is too high for this model, or fp16 overflowed); train again with a "
          "lower learning_rate (or precision fp32), or resume from a checkpoint written before it diverged")


class TokenScaleError(ValueError):
    """Tokens far beyond their text encoder's embedding scale: the message says which and what to do."""


def embedding_norm(weight: Tensor) -> float:
    """The mean L2 length of the rows of a text encoder's token-embedding table [vocab, C]."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"a token-embedding table is a [vocab, C] tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    with torch.no_grad():
        norm = float(torch.linalg.vector_norm(weight.detach().float(), dim=1).mean())
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"the text encoder's token embeddings have mean length {norm}; its weights are damaged")
    return norm


def check_embedding_norms(norms: Mapping[str, float]) -> dict[str, float]:
    """{encoder: positive finite float}, as an identity records them; raises ValueError otherwise."""
    if not isinstance(norms, Mapping):
        raise ValueError(f"embedding norms must be a mapping of encoder to length, got {type(norms).__name__}")
    out = {}
    for encoder, value in norms.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"the embedding norm of {encoder!r} must be a positive number, got {value!r}")
        out[str(encoder)] = float(value)
    return out


def token_scale_problem(tokens: Mapping[str, Tensor], norms: Mapping[str, float]) -> str | None:
    """None when every vector of every encoder in both mappings is within MAX_SCALE_RATIO of its encoder's mean
    embedding length; else what is wrong, per encoder, in words."""
    problems = []
    for encoder, t in tokens.items():
        if encoder not in norms:
            continue
        with torch.no_grad():
            # float64 on the CPU: 1e30² overflows float32, and MPS has no float64
            longest = float(torch.linalg.vector_norm(t.detach().to("cpu", torch.float64), dim=-1).max())
        ratio = longest / norms[encoder]
        if not ratio <= MAX_SCALE_RATIO:  # also true for NaN
            problems.append(f"{encoder} vectors are up to {longest:.3g} long, {ratio:.3g} times the mean length of "
                            f"the text encoder's word embeddings ({norms[encoder]:.3g}; at most "
                            f"{MAX_SCALE_RATIO:g} times is accepted)")
    return "; ".join(problems) or None


def check_token_scale(tokens: Mapping[str, Tensor], norms: Mapping[str, float], what: str) -> None:
    """Raise TokenScaleError naming `what` (e.g. "identity 'sks'") when token_scale_problem finds one."""
    problem = token_scale_problem(tokens, norms)
    if problem:
        raise TokenScaleError(f"{what}: its tokens have blown up: {problem}. {ADVICE[0].upper()}{ADVICE[1:]}")
