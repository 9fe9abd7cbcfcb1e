"""Training you can watch (issue 24), in the real host with the tiny SD1.5 checkpoint: sample renders, the live
preview through the host's progress hook, step snapshots and the attention-map picture."""
from __future__ import annotations

import pytest
import torch

RES = 64


def _identity(pack, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return pack.core("identity").Identity("sd1", {"clip_l": torch.randn(2, 2, 1, 768, generator=g) * 0.02},
                                          "sks", "person")


def _ksampler_run(host, sd15, identity, prompt: str, seed: int, steps: int):
    """The graph a user would build: SeFi Apply Identity + CLIPTextEncode("") + EmptyLatentImage + KSampler + VAEDecode."""
    sr = host.pack_module.nodes.sample_renders
    model, clip, vae = sd15
    patched, positive = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=identity, text=prompt,
                                 strength=1.0, start_percent=0.0, end_percent=1.0)
    negative = host.run("CLIPTextEncode", clip=clip, text=sr.NEGATIVE_PROMPT)[0]
    latent = host.run("EmptyLatentImage", width=RES, height=RES, batch_size=1)[0]
    samples = host.run("KSampler", model=patched, seed=seed, steps=steps, cfg=sr.SAMPLE_CFG,
                       sampler_name=sr.SAMPLER_NAME, scheduler=sr.SCHEDULER, positive=positive, negative=negative,
                       latent_image=latent, denoise=1.0)[0]
    return host.run("VAEDecode", vae=vae, samples=samples)[0]


def test_sample_renders_equal_apply_identity_plus_ksampler_also_while_training(host, sd15, pack):
    sr, th = pack.glue("sample_renders"), pack.glue("training")
    model, clip, vae = sd15
    identity = _identity(pack)
    prompts = sr.sample_prompts("a photo of sks person\n\n  sks smiling  \n", "sks")
    assert prompts == ("a photo of sks person", "sks smiling")
    spec = sr.SampleSpec(prompts, seed=11, resolution=RES, steps=3)
    steps_seen = []
    with torch.inference_mode():
        ours = sr.render_samples(model, clip, vae, identity, spec, on_step=lambda: steps_seen.append(1))
    assert ours.shape == (2, RES, RES, 3) and len(steps_seen) == 2 * 3
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(ours[i], _ksampler_run(host, sd15, identity, prompt, 11, 3)[0].float())
    with th.training_context(model, clip):  # where the trainer renders them: the frozen models' stand-ins
        during = sr.render_samples(model, clip, vae, identity, spec)
    torch.testing.assert_close(during, ours, atol=2e-5, rtol=1e-4)
    grid = sr.sample_grid([ours, during])
    assert grid.shape == (1, 2 * RES, 2 * RES, 3)
    assert torch.equal(grid[0, RES:, RES:], during[1])
    with pytest.raises(ValueError, match="does not contain the trigger word 'sks'.*one prompt a line"):
        sr.sample_prompts("a photo of sks\na photo of a person", "sks")
