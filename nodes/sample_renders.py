"""Sample renders of an identity while it trains: the user's own prompts, drawn with the current identity through
the same K/V splice as SeFi Apply Identity and the host's own sampler (fixed seed, few steps, the training
resolution), so a sample shows what the identity would give in a graph at that step."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import host
from .identity import SeFiApplyIdentity
from ..sefi_core.identity import Identity

SAMPLE_STEPS = 12
"""Few enough to cost a few training steps, enough for euler to give a readable face."""
SAMPLE_CFG = 5.0
SAMPLER_NAME = "euler"
SCHEDULER = "normal"
NEGATIVE_PROMPT = ""


@dataclass(frozen=True)
class SampleSpec:
    """What every sample render of a run shares: the prompts (each with the trigger) and the sampler settings."""
    prompts: tuple[str, ...]
    seed: int
    resolution: int
    steps: int = SAMPLE_STEPS
    cfg: float = SAMPLE_CFG
    sampler_name: str = SAMPLER_NAME
    scheduler: str = SCHEDULER


def sample_prompts(text: str, trigger: str) -> tuple[str, ...]:
    """The non-empty lines of `sample_prompt`, each of which must name the trigger as a word (a sample without the
    identity would show nothing about it)."""
    prompts = tuple(line.strip() for line in str(text).splitlines() if line.strip())
    word = re.compile(rf"(?<![\w]){re.escape(trigger)}(?![\w])")
    missing = [p for p in prompts if not word.search(p)]
    if missing:
        raise ValueError(f"sample_prompt: {missing[0]!r} does not contain the trigger word {trigger!r}; write it "
                         f"where the person goes, e.g. 'a photo of {trigger} person, smiling' (one prompt a line)")
    return prompts


def empty_latent(resolution: int) -> Tensor:
    """What the host's EmptyLatentImage gives for a square picture of `resolution` pixels."""
    return torch.zeros(1, 4, resolution // 8, resolution // 8)


def render_samples(model, clip, vae, identity: Identity, spec: SampleSpec,
                   on_step: Callable[[], None] | None = None) -> Tensor:
    """IMAGE [len(prompts), res, res, 3]: each prompt through SeFi Apply Identity (strength 1, the whole schedule)
    and the host's sampler with an empty negative prompt, decoded by `vae`. `on_step` runs after every sampler step
    (the trainer checks Cancel there)."""
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(NEGATIVE_PROMPT), return_pooled=True)
        negative = [[cond, {"pooled_output": pooled}]]
        pictures = []
        for prompt in spec.prompts:
            patched, positive = SeFiApplyIdentity().apply(model, clip, identity, prompt)
            latent = host.sample(patched, spec.seed, spec.steps, spec.cfg, spec.sampler_name, spec.scheduler,
                                 positive, negative, empty_latent(spec.resolution), on_step)
            pictures.append(vae.decode(latent).float().cpu()[..., :3])
    return torch.cat(pictures)


def sample_grid(rows: Sequence[Tensor]) -> Tensor:
    """IMAGE [1, rows·H, prompts·W, 3]: one row per sampling point (in step order), one column per prompt."""
    if not rows:
        raise ValueError("no sample renders to put in a grid")
    return torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)[None]
