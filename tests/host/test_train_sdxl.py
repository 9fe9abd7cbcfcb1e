"""SeFiTrainIdentity on the tiny SDXL checkpoint: clip_l + clip_g tokens trained together, the 2048-d context,
the pooled/size `y` input. Kept small (64 px, 3 steps); the SDXL model is unloaded at the end of the module."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # loads the SDXL checkpoint (~5 GB)

TEMPLATE = "a photo of the face of {}"


@pytest.fixture(scope="module")
def photo(face_photo):
    """obama_1.jpg as a ComfyUI IMAGE [1, H, W, 3] (the node itself resizes and centre-crops)."""
    return face_photo("obama_1.jpg", 96)


def test_sdxl_manual_encode_matches_host(host, sdxl, pack):
    """Both encoders' vectors spliced: the hand-run [clip_l | clip_g] context equals the host's encode, both
    vectors get gradients, and the K/V rows batched through one forward equal separate encodes."""
    th, pe = pack.glue("training"), pack.glue("prompt_encoding")
    model, clip, _ = sdxl
    g = torch.Generator().manual_seed(0)
    vec = {"clip_l": torch.randn(1, 1, 768, generator=g) * 0.02, "clip_g": torch.randn(1, 1, 1280, generator=g) * 0.02}
    with torch.inference_mode():
        with th.training_context(model, clip):
            enc = th.TextEncoder(clip)
            assert enc.family == "sdxl" and enc.encoders == ("clip_l", "clip_g") and enc.width == 2048
            p = enc.prompt(TEMPLATE, "sks", 1)
            leaves = {k: t.clone().requires_grad_(True) for k, t in vec.items()}
            ours = enc.encode_prompt(p, leaves)
            ours.pow(2).mean().backward()
            grads = {k: t.grad.clone() for k, t in leaves.items()}
            with torch.no_grad():
                other = {k: t.flip(-1) for k, t in vec.items()}
                both = enc.encode_prompt(p, {k: torch.cat([vec[k], other[k]]) for k in vec})
                apart = torch.cat([enc.encode_prompt(p, vec), enc.encode_prompt(p, other)])
        plan = pe.plan_prompt(clip, TEMPLATE.format("sks"), [th.TriggerWord("sks", 1)], 1.0)
        theirs, pooled = pe.encode_with_vectors(clip, plan, [{k: t[0] for k, t in vec.items()}])
    assert p.by_encoder["clip_g"][1] == p.slots
    assert ours.shape == theirs.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
    torch.testing.assert_close(ours.detach(), theirs.float(), atol=1e-3, rtol=1e-3)
    for k, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, k
    torch.testing.assert_close(both, apart, atol=1e-4, rtol=1e-4)


def _fingerprints(module):
    out = {}
    for k, v in list(module.named_parameters()) + list(module.named_buffers()):
        t = v.detach().contiguous().cpu().reshape(-1)
        out[k] = (v, hashlib.blake2b(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"",
                                     digest_size=16).hexdigest())
    return out


def test_sdxl_training_saves_identity_and_applies(host, sdxl, pack, photo):
    model, clip, vae = sdxl
    load_identity = pack.core("identity").load_identity
    train = pack.glue("train")
    mods = [model.model, clip.cond_stage_model]
    with torch.inference_mode():
        before = [_fingerprints(m) for m in mods]
    identity, curve, fname = host.run(
        "SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, name="xl", trigger="sks",
        initializer="person", steps=3, learning_rate=0.0, stages=2, vectors_per_token=1,
        parametrisation="direct tokens", kv_split=True, attention_loss="reference", attention_weight=0.003,
        loss_sites="quarter", masked_diffusion_loss=False, prompt_templates=TEMPLATE, flip_augmentation=False,
        scale_augmentation=False, seed=0, resolution=64, batch_size=1, checkpoint_every=0, resume_from="",
        overwrite=True)[:3]
    assert identity.family == "sdxl" and fname == "xl.safetensors"
    assert identity.tokens["clip_l"].shape == (2, 2, 1, 768) and identity.tokens["clip_g"].shape == (2, 2, 1, 1280)
    assert identity.training["steps_done"] == 3 and np.isfinite(identity.training["final_loss"])
    loaded = load_identity(train.identity_dir() / fname)
    assert loaded.family == "sdxl" and set(loaded.encoders) == {"clip_l", "clip_g"}
    patched, cond = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=loaded,
                             text="a photo of sks person", strength=1.0, start_percent=0.0, end_percent=1.0)
    assert cond[0][0].shape == (1, 77, 2048) and cond[0][1]["pooled_output"].shape == (1, 1280)
    for m, snap in zip(mods, before):
        now = _fingerprints(m)
        assert now.keys() == snap.keys()
        for k, (obj, digest) in snap.items():
            assert now[k][0] is obj, f"{k} was replaced"
            assert now[k][1] == digest, f"{k} changed"
    assert all("forward" not in mod.__dict__ for mod in model.model.modules())
