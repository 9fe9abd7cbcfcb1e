"""SeFiApplyIdentity on an SDXL-architecture checkpoint (clip_l 768 + clip_g 1280 tokens)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow  # loads the SDXL checkpoint (~5 GB)


def _sdxl_identity(pack, seed, stages=3):
    Identity = pack.core("identity").Identity
    g = torch.Generator().manual_seed(seed)
    return Identity("sdxl", {"clip_l": torch.randn(stages, 2, 1, 768, generator=g) * 0.02,
                             "clip_g": torch.randn(stages, 2, 1, 1280, generator=g) * 0.02}, "sks", "person")


def test_sdxl_identity_routes_per_stage_and_samples(host, sdxl, pack):
    model, clip, _ = sdxl
    assert type(model.model.model_config).__name__ == "SDXL"
    identity = _sdxl_identity(pack, 0)
    patched, cond = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=identity,
                             text="a photo of sks person", strength=1.0, start_percent=0.0, end_percent=1.0)
    assert cond[0][0].shape == (1, 77, 2048) and cond[0][1]["pooled_output"].shape == (1, 1280)
    patch = patched.model_options["transformer_options"]["patches"]["attn2_patch"][-1]
    sampling = model.get_model_object("model_sampling")
    contexts = {}
    for sigma in (10.0, 0.05):
        stage = min(int(float(sampling.timestep(torch.tensor([sigma]))) * 3 // 1000), 2)
        ctx = patch(None, cond[0][0], cond[0][0], {"cond_or_uncond": [0], "sigmas": torch.tensor([sigma])})[1]
        contexts[stage] = ctx
        # the K context of this stage equals the prompt encoded with that stage's K tokens in BOTH encoders
        Identity = pack.core("identity").Identity
        k_only = Identity.constant("sdxl", {e: identity.tokens[e][stage, 0] for e in identity.encoders}, stages=1,
                                   trigger="sks", initializer="person")
        want = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=k_only, text="a photo of sks person",
                        strength=1.0, start_percent=0.0, end_percent=1.0)[1][0][0]
        torch.testing.assert_close(ctx, want, rtol=0, atol=0)
    assert len(contexts) == 2 and not torch.equal(*contexts.values())
    neg = host.run("CLIPTextEncode", clip=clip, text="")[0]
    latent = host.run("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    out = host.run("KSampler", model=patched, seed=1, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal",
                   positive=cond, negative=neg, latent_image=latent, denoise=1.0)[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_sd1_identity_on_sdxl_clip_is_refused(host, sdxl, pack):
    model, clip, _ = sdxl
    Identity = pack.core("identity").Identity
    sd1 = Identity.constant("sd1", {"clip_l": torch.zeros(1, 768)}, stages=5, trigger="sks", initializer="person")
    with pytest.raises(ValueError, match="SD1.*SDXL"):
        host.run("SeFiApplyIdentity", model=model, clip=clip, identity=sd1, text="a photo of sks person",
                 strength=1.0, start_percent=0.0, end_percent=1.0)


def test_pooled_y_is_built_by_one_rule_in_training_and_at_inference(host, sdxl, pack, face_photo):
    """SDXL's `y` (pooled CLIP-G + size embedding): the trainer's for its template equals the one the sampler builds
    from SeFi Apply Identity's conditioning for that template's prompt (before: trainer from "... of person",
    apply node from the prompt with the lossy fallback vector)."""
    th = pack.glue("training")
    model, clip, vae = sdxl
    identity = _sdxl_identity(pack, 3)
    res, template = 64, "a close-up photo of the face of {}"
    settings = pack.core("training").TrainSettings(steps=1, resolution=res, flip=False, templates=[template])
    with torch.inference_mode(), th.training_context(model, clip):
        step = th.SefiStep(model, clip, vae, th.fit_image(face_photo("obama_1.jpg", 96), res), None, settings, "sks",
                           1, initializer="person")
    cond = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=identity, text=template.format("sks"),
                    strength=1.0, start_percent=0.0, end_percent=1.0)[1]
    inference_y = th.adm_input(model, cond[0][1]["pooled_output"], res)
    torch.testing.assert_close(step.adm[0], inference_y, rtol=0, atol=0)
