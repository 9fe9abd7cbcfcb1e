"""Rendering prompts through the host's nodes, with or without a trained identity: the one render function of the
demo (world/demo.py, world/third/demo.py) and the claims benchmark (bench/world_claims/measure.py).

One seed rule for every picture: `sample_seed(seed, person, index)` = 100 000 · seed + 100 · person + index, so the
same (seed, person, prompt) gets the same sampling noise whichever variant — or no identity at all, the control —
made the conditioning; variants and the control differ only in what they condition on.
"""
from __future__ import annotations

import numpy as np

SAMPLER = dict(sampler_name="euler", scheduler="normal", steps=20, cfg=5.0)


def sample_seed(seed: int, person: int, index: int) -> int:
    return 100_000 * seed + 100 * person + index


def render(host, model, clip, vae, texts: list[str], seeds: list[int], identity=None, size: int = 64,
           sampler: dict = SAMPLER, negative=None) -> list[np.ndarray]:
    """Each text at its seed: through SeFi Apply Identity when `identity` is given (its trigger in the text), else
    through plain CLIPTextEncode (the no-identity control); then KSampler and VAEDecode. [size, size, 3] pictures
    in 0..1."""
    if len(texts) != len(seeds):
        raise ValueError(f"one seed per text: got {len(texts)} texts and {len(seeds)} seeds")
    if negative is None:
        negative = host.run("CLIPTextEncode", clip=clip, text="")[0]
    latent = host.run("EmptyLatentImage", width=size, height=size, batch_size=1)[0]
    pictures = []
    for text, seed in zip(texts, seeds):
        if identity is None:
            patched, positive = model, host.run("CLIPTextEncode", clip=clip, text=text)[0]
        else:
            patched, positive = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=identity, text=text,
                                         strength=1.0, start_percent=0.0, end_percent=1.0)
        samples = host.run("KSampler", model=patched, seed=seed, positive=positive, negative=negative,
                           latent_image=latent, denoise=1.0, **sampler)[0]
        pictures.append(host.run("VAEDecode", vae=vae, samples=samples)[0][0].clamp(0, 1).numpy())
    return pictures
