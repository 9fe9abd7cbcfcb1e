"""Diffusion timestep -> identity stage (method.md 1.3).

An identity holds one K/V token pair per stage; stage i serves the DDPM timesteps t with
floor(t * S / 1000) == i, so stage 0 covers the last, low-noise steps and stage S-1 the first, high-noise
ones (ProSpect's convention). Converting a sampler's sigma to t is the host model's job, not ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, overload

import torch

__all__ = [
    "MAX_STAGES", "NUM_TIMESTEPS", "StageRange", "check_stages", "stage_combinations", "stage_of_timestep",
    "stage_ranges",
]

NUM_TIMESTEPS = 1000
"""DDPM training timesteps; t lies in [0, NUM_TIMESTEPS)."""

MAX_STAGES = 10
"""Largest stage count an identity may have: the paper's K-V ablation goes up to 10 (ProSpect's default)."""


class StageRange(NamedTuple):
    """The integer DDPM timesteps `first..last` (inclusive) that use `stage`."""

    stage: int
    first: int
    last: int


def check_stages(stages: int) -> int:
    """Return `stages` if it is an int in 1..MAX_STAGES, else raise ValueError saying so."""
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= MAX_STAGES:
        raise ValueError(f"stages must be an integer from 1 to {MAX_STAGES}, got {stages!r}")
    return stages


@overload
def stage_of_timestep(t: float, stages: int) -> int: ...
@overload
def stage_of_timestep(t: torch.Tensor, stages: int) -> torch.Tensor: ...
def stage_of_timestep(t: float | torch.Tensor, stages: int) -> int | torch.Tensor:
    """floor(t * stages / 1000) clamped to [0, stages - 1], for a number or elementwise for a tensor (-> int64).

    Clamping keeps out-of-range inputs (t = 1000 from some schedules, tiny negative t from rounding) usable.
    Tensors are evaluated in float32 at least, because float16 cannot hold t * stages exactly.
    """
    check_stages(stages)
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point and t.dtype != torch.float64:
            t = t.float()
        return torch.div(t * stages, NUM_TIMESTEPS, rounding_mode="floor").clamp(0, stages - 1).long()
    if not math.isfinite(t):
        raise ValueError(f"timestep must be a finite number, got {t!r}")
    return min(max(math.floor(t * stages / NUM_TIMESTEPS), 0), stages - 1)


def stage_ranges(stages: int) -> tuple[StageRange, ...]:
    """The integer timesteps each stage covers, for docs and UI, e.g. 5 stages -> 0-199, 200-399, ... 800-999."""
    check_stages(stages)
    bounds = [math.ceil(i * NUM_TIMESTEPS / stages) for i in range(stages + 1)]
    return tuple(StageRange(i, bounds[i], bounds[i + 1] - 1) for i in range(stages))


def stage_combinations(stage_counts: Sequence[int]) -> list[tuple[int, ...]]:
    """Every distinct tuple of per-identity stages over t in [0, 1000), in timestep order.

    Identities with different stage counts switch at different timesteps; each distinct tuple needs its
    own encoding, and there are at most sum(S_i) of them.
    """
    combos: list[tuple[int, ...]] = []
    for t in range(NUM_TIMESTEPS):
        combo = tuple(stage_of_timestep(t, s) for s in stage_counts)
        if not combos or combos[-1] != combo:
            combos.append(combo)
    return combos
