"""Dynamic loss scaling for training through a frozen fp16 model.

With the U-Net computing in fp16, the gradient that flows back to the context is tiny (the
diffusion loss is a mean over every latent element, so dL/d(prediction) is ~1e-4 and shrinks
further through each layer) and falls below fp16's smallest subnormal (6e-8): whole gradient
tensors become zero and the tokens stop learning without any error. bf16 and fp32 share fp32's
exponent range and need none of this.

The remedy is the standard one (mixed-precision training, Micikevicius et al. 2018): multiply
the loss by a large factor before backward, divide the trainable gradients (fp32) by it
afterwards, and skip the update when the scaled gradient overflowed, halving the factor. After
``growth_interval`` clean steps the factor doubles again to keep using fp16's range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["DynamicLossScale"]


@dataclass
class DynamicLossScale:
    scale: float = 2.0**16
    growth_interval: int = 200
    """Clean steps before doubling; shorter than torch's GradScaler (2000) because an identity trains for
    a few hundred steps."""
    min_scale: float = 1.0
    """Below this, overflow is not a scaling problem but a real divergence."""
    clean_steps: int = 0

    @classmethod
    def for_precision(cls, precision: str) -> "DynamicLossScale | None":
        """A scaler for fp16 compute; None for bf16/fp32, which cannot underflow this way."""
        return cls() if precision == "fp16" else None

    def scaled(self, loss: Tensor) -> Tensor:
        return loss * self.scale

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every gradient by the scale in place; True when all of them are finite (one device sync)."""
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.div_(self.scale)
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def update(self, finite: bool) -> None:
        """After a step: halve on overflow (that step's update is skipped by the caller), grow after a run of
        clean steps."""
        if not finite:
            self.scale /= 2.0
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    @property
    def exhausted(self) -> bool:
        return self.scale < self.min_scale

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "DynamicLossScale":
        out = cls(**{k: state[k] for k in ("scale", "growth_interval", "min_scale", "clean_steps") if k in state})
        if not (math.isfinite(out.scale) and out.scale > 0):
            raise ValueError(f"bad loss scale in checkpoint: {out.scale!r}")
        return out
