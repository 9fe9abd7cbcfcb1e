"""The attention-map picture of a trained identity: each training photo through the trainer's own step (same
splice, same loss sites and columns as the attention loss) at one fixed timestep and noise, its identity and
reference maps drawn by sefi_core.attention_picture."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .sefi_step import SefiStep
from ...sefi_core.attention_picture import face_maps, render_attention_picture

PROBE_TIMESTEP_FRACTION = 0.5
"""Mid-schedule: the face's layout is set there, and the maps are neither noise (t~1000) nor detail (t~0)."""


def probe_maps(step_fn: SefiStep, tokens: dict[str, Tensor], seed: int) -> list[tuple[Tensor, Tensor]]:
    """(identity map, reference map) on the latent grid for every training photo, at timestep index
    len(sigmas)·PROBE_TIMESTEP_FRACTION with noise drawn from `seed`."""
    t = int(len(step_fn.sigmas) * PROBE_TIMESTEP_FRACTION)
    noise = torch.randn(step_fn.latents.shape[1:], generator=torch.Generator().manual_seed(int(seed)))[None]
    positions = step_fn.identity_positions()
    maps = []
    for image in range(step_fn.latents.shape[0]):
        records = step_fn.attention_records(tokens, image, t, noise)
        maps.append(face_maps([r[3] for r in records], [r[4] for r in records], positions, step_fn.latent_hw,
                              step_fn.latent_hw))
    return maps


def attention_picture(step_fn: SefiStep, tokens: dict[str, Tensor], photos: Tensor, seed: int) -> Tensor:
    """IMAGE [1, H, W, 3]: a row per photo (photo | identity map | reference map)."""
    maps = probe_maps(step_fn, tokens, seed)
    picture = render_attention_picture(photos, [m[0] for m in maps], [m[1] for m in maps])
    return torch.from_numpy(picture.astype(np.float32) / 255.0)[None]
