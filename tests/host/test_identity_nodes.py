"""SeFiLoadIdentity / SeFiApplyIdentity inside the real host with the tiny SD1.5 checkpoint."""
from __future__ import annotations

import copy
import os

import pytest
import torch

STAGES = 5


def _identity(pack, seed: int, *, trigger="sks", stages=STAGES, n=1, constant=False, family="sd1"):
    Identity = pack.core("identity").Identity
    g = torch.Generator().manual_seed(seed)
    widths = {"clip_l": 768, "clip_g": 1280} if family == "sdxl" else {"clip_l": 768}
    if constant:
        return Identity.constant(family, {e: torch.randn(n, w, generator=g) * 0.02 for e, w in widths.items()},
                                 stages=stages, trigger=trigger, initializer="person")
    return Identity(family, {e: torch.randn(stages, 2, n, w, generator=g) * 0.02 for e, w in widths.items()},
                    trigger, "person")


def _apply(host, model, clip, identity, text="a photo of sks person", **kw):
    args = dict(strength=1.0, start_percent=0.0, end_percent=1.0)
    args.update(kw)
    return host.run("SeFiApplyIdentity", model=model, clip=clip, identity=identity, text=text, **args)


def _our_patch(model):
    return model.model_options["transformer_options"]["patches"]["attn2_patch"][-1]


def _sample(host, model, positive, negative, steps=3, cfg=5.0, seed=7):
    latent = host.run("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    return host.run("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                    scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                    denoise=1.0)[0]["samples"]


_ENCODINGS: dict = {}


def _stage_encoding(host, model, clip, identity, stage, kv, pack, text="a photo of sks person"):
    """The prompt encoded with one stage's K (kv=0) or V (kv=1) tokens: a constant identity's conditioning."""
    key = (id(identity), stage, kv, text)
    if key not in _ENCODINGS:
        _ENCODINGS[key] = (identity, _encode_stage(host, model, clip, identity, stage, kv, pack, text))
    return _ENCODINGS[key][1]


def _encode_stage(host, model, clip, identity, stage, kv, pack, text):
    Identity = pack.core("identity").Identity
    vec = {e: identity.tokens[e][stage, kv] for e in identity.encoders}
    const = Identity.constant(identity.family, vec, stages=1, trigger=identity.trigger, initializer="person")
    return _apply(host, model, clip, const, text)[1][0][0]


def test_equivalence_with_stock_embedding_syntax(host, sd15, pack):
    """All stages equal and K == V: the sampled latent equals CLIPTextEncode with that vector spliced in,
    here through stock `embedding:name` reading the identity file's clip_l fallback."""
    model, clip, _ = sd15
    identity = _identity(pack, 1, constant=True)
    emb_dir = host.folder_paths.get_folder_paths("embeddings")[0]
    os.makedirs(emb_dir, exist_ok=True)
    pack.core("identity").save_identity(identity, os.path.join(emb_dir, "sefi_equiv.safetensors"))
    stock = host.run("CLIPTextEncode", clip=clip, text="a photo of embedding:sefi_equiv person")[0]
    plain = host.run("CLIPTextEncode", clip=clip, text="a photo of sks person")[0]
    neg = host.run("CLIPTextEncode", clip=clip, text="blurry")[0]
    patched, cond = _apply(host, model, clip, identity)
    torch.testing.assert_close(cond[0][0], stock[0][0])
    assert not torch.equal(stock[0][0], plain[0][0]), "the embedding file was not picked up by the host"
    ours = _sample(host, patched, cond, neg)
    reference = _sample(host, model, stock, neg)
    # fp tolerance: the fallback is a mean over stages, equal to the stage vector only up to rounding
    scale = reference.abs().max().item()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def routed_identity(pack):
    return _identity(pack, 2)


@pytest.mark.parametrize("order", [[1, 0], [0, 1], [0], [0, 0, 1]])
def test_per_stage_routing_for_every_batch_order(host, sd15, pack, order, routed_identity):
    model, clip, _ = sd15
    identity = routed_identity
    patched, cond = _apply(host, model, clip, identity)
    base = cond[0][0]
    neg = host.run("CLIPTextEncode", clip=clip, text="blurry")[0][0][0]
    # a second positive prompt longer than one chunk: lengths differ, the host repeats to the LCM (154)
    other = host.run("CLIPTextEncode", clip=clip, text=", ".join(["a red house by the sea"] * 14))[0][0][0]
    assert other.shape[1] == 154
    patch = _our_patch(patched)
    sampling = model.get_model_object("model_sampling")
    rows = 2
    for sigma in (14.0, 5.0, 2.0, 0.9, 0.3, 0.05):
        t = float(sampling.timestep(torch.tensor([sigma])))
        stage = min(int(t * STAGES // 1000), STAGES - 1)
        expect_k = _stage_encoding(host, model, clip, identity, stage, 0, pack)
        expect_v = _stage_encoding(host, model, clip, identity, stage, 1, pack)
        chunks, positives = [], 0
        for code in order:
            if code == 1:
                chunks.append(neg)
            else:
                chunks.append(base if positives == 0 else other)
                positives += 1
        length = max(c.shape[1] for c in chunks)
        context = torch.cat([c.repeat(rows, length // c.shape[1], 1) for c in chunks])
        eo = {"cond_or_uncond": list(order), "sigmas": torch.full((len(order) * rows,), sigma)}
        _, ctx, val = patch(None, context, context, eo)
        for i, c in enumerate(chunks):
            got_k, got_v = ctx[i * rows:(i + 1) * rows], val[i * rows:(i + 1) * rows]
            if c is base:
                want_k, want_v = expect_k, expect_v
            else:
                want_k = want_v = c
            reps = got_k.shape[1] // want_k.shape[1]
            torch.testing.assert_close(got_k, want_k.repeat(rows, reps, 1), rtol=0, atol=0)
            torch.testing.assert_close(got_v, want_v.repeat(rows, reps, 1), rtol=0, atol=0)
        assert not torch.equal(expect_k, expect_v)


def test_sampling_feeds_each_call_its_stage(host, sd15, pack):
    """Spy on the attn2 inputs during a real KSampler run (cfg > 1, the host's own batch order)."""
    model, clip, _ = sd15
    identity = _identity(pack, 3)
    patched, cond = _apply(host, model, clip, identity)
    neg = host.run("CLIPTextEncode", clip=clip, text="blurry")[0]
    calls = []

    def spy(n, context, value, extra_options):
        calls.append((list(extra_options["cond_or_uncond"]), extra_options["sigmas"].clone(), context.clone(),
                      value.clone(), extra_options["block"]))
        return n, context, value

    spied = patched.clone()
    spied.set_model_attn2_patch(spy)
    _sample(host, spied, cond, neg, steps=6)
    sampling = model.get_model_object("model_sampling")
    expected = {}
    stages_seen, sites = set(), set()
    for order, sigmas, context, value, block in calls:
        sites.add(block)
        t = float(sampling.timestep(sigmas[:1]))
        stage = min(int(t * STAGES // 1000), STAGES - 1)
        stages_seen.add(stage)
        if stage not in expected:
            expected[stage] = (_stage_encoding(host, model, clip, identity, stage, 0, pack),
                               _stage_encoding(host, model, clip, identity, stage, 1, pack))
        per = context.shape[0] // len(order)
        for i, code in enumerate(order):
            want_k, want_v = expected[stage] if code == 0 else (neg[0][0], neg[0][0])
            torch.testing.assert_close(context[i * per:(i + 1) * per], want_k.expand(per, -1, -1), rtol=0, atol=0)
            torch.testing.assert_close(value[i * per:(i + 1) * per], want_v.expand(per, -1, -1), rtol=0, atol=0)
    assert len(stages_seen) >= 3, stages_seen
    assert len(sites) == 4  # the tiny SD1.5 checkpoint: input 1, middle 0, output 0 and 1


def test_input_model_is_not_mutated_and_conditioning_is_plain(host, sd15, pack):
    model, clip, _ = sd15
    before = copy.deepcopy(model.model_options)
    patched, cond = _apply(host, model, clip, _identity(pack, 4))
    assert model.model_options == before
    assert patched is not model and patched.model is model.model
    assert len(cond) == 1 and cond[0][0].shape == (1, 77, 768) and set(cond[0][1]) == {"pooled_output"}


def test_window_outside_start_end_uses_the_initializer_prompt(host, sd15, pack):
    model, clip, _ = sd15
    identity = _identity(pack, 5)
    patched, cond = _apply(host, model, clip, identity, start_percent=0.5, end_percent=1.0)
    off = host.run("CLIPTextEncode", clip=clip, text="a photo of person")[0][0][0]
    patch = _our_patch(patched)
    sampling = model.get_model_object("model_sampling")
    early = float(sampling.percent_to_sigma(0.1))
    late = float(sampling.percent_to_sigma(0.9))
    eo = lambda s: {"cond_or_uncond": [0], "sigmas": torch.tensor([s])}  # noqa: E731
    _, ctx, val = patch(None, cond[0][0], cond[0][0], eo(early))
    torch.testing.assert_close(ctx, off, rtol=0, atol=0)
    torch.testing.assert_close(val, off, rtol=0, atol=0)
    _, ctx, _ = patch(None, cond[0][0], cond[0][0], eo(late))
    assert not torch.equal(ctx, off)


@pytest.mark.parametrize(("text", "off"), [
    ("a photo of sks person", "a photo of person"),          # the class word after the trigger is kept once
    ("sks Person, smiling", "Person, smiling"),
    ("sks and zwx person", "person and person"),             # only a following identical word merges
    ("sks persons at sks", "person persons at person"),
    ("(sks:1.2) person", "(person:1.2) person"),             # a weighted trigger keeps its own weight
])
def test_off_window_prompt_replaces_trigger_and_following_class_word(pack, text, off):
    identities = [_identity(pack, 1), _identity(pack, 2, trigger="zwx")] if "zwx" in text else [_identity(pack, 1)]
    assert pack.glue("prompt_encoding").initializer_text(text, identities) == off


def test_strength_is_the_hosts_token_weight_on_the_identity_positions(host, sd15, pack):
    """strength w acts like '(sks:w)': at w = 0 the identity position holds the empty prompt's output there,
    whatever the identity (later tokens still see it through CLIP's causal attention, as with any weight)."""
    model, clip, _ = sd15
    a, b = _identity(pack, 6), _identity(pack, 7)
    pos = 4  # <start> a photo of [sks] person
    cond_a = _apply(host, model, clip, a, strength=0.0)[1][0][0]
    cond_b = _apply(host, model, clip, b, strength=0.0)[1][0][0]
    torch.testing.assert_close(cond_a[:, :pos + 1], cond_b[:, :pos + 1])
    full_a = _apply(host, model, clip, a)[1][0][0]
    full_b = _apply(host, model, clip, b)[1][0][0]
    assert not torch.allclose(full_a[:, pos], full_b[:, pos])
    half = _apply(host, model, clip, a, strength=0.5)[1][0][0]
    torch.testing.assert_close(half[:, pos], (full_a[:, pos] + cond_a[:, pos]) / 2, rtol=1e-3, atol=1e-3)


def test_two_identities_in_one_prompt(host, sd15, pack):
    model, clip, _ = sd15
    a = _identity(pack, 8, trigger="sks")
    b = _identity(pack, 9, trigger="zwx", stages=3, n=2)
    b2 = _identity(pack, 10, trigger="zwx", stages=3, n=2)
    text = "sks and zwx shaking hands"
    m1, cond = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=a, text=text, strength=1.0,
                        start_percent=0.0, end_percent=1.0, identity_2=b)
    m2, _ = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=a, text=text, strength=1.0,
                     start_percent=0.0, end_percent=1.0, identity_2=b2)
    p1, p2 = _our_patch(m1), _our_patch(m2)
    assert len(p1.routers) == 7  # stage switches of S=5 and S=3 interleave into 7 combinations
    eo = {"cond_or_uncond": [0], "sigmas": torch.tensor([3.0])}
    k1 = p1(None, cond[0][0], cond[0][0], eo)[1]
    k2 = p2(None, cond[0][0], cond[0][0], eo)[1]
    assert not torch.equal(k1, cond[0][0]) and not torch.equal(k1, k2)
    with pytest.raises(ValueError, match="zwx"):
        host.run("SeFiApplyIdentity", model=model, clip=clip, identity=a, text="only sks here", strength=1.0,
                 start_percent=0.0, end_percent=1.0, identity_2=b)


def test_a_shared_trigger_says_to_retrain_and_a_double_connection_says_so(host, sd15, pack, tmp_path):
    """The trigger lives inside the identity file: renaming a file never helps, retraining one does. One identity
    connected twice (the same object, or two loads of one file) is a wiring slip, not a trigger clash."""
    model, clip, _ = sd15
    ident = pack.core("identity")
    a, other = _identity(pack, 8, trigger="zwx"), _identity(pack, 9, trigger="zwx")
    with pytest.raises(ValueError) as info:
        _apply(host, model, clip, a, text="sks and zwx", identity_3=other)
    msg = str(info.value)
    assert "identity and identity_3 are two identities with the same trigger word 'zwx'" in msg
    assert "train one of them again with another trigger" in msg and "rename" not in msg.replace("renaming", "")
    path = ident.save_identity(a, tmp_path / "a.safetensors")
    for twice in (a, ident.load_identity(path)):
        with pytest.raises(ValueError) as info:
            _apply(host, model, clip, a, text="zwx", identity_4=twice)
        msg = str(info.value)
        assert "identity and identity_4 are the same identity ('zwx'): it is connected twice" in msg
        assert "train" not in msg


def test_family_mismatch_is_a_clear_error(host, sd15, pack):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="SDXL.*SD1"):
        _apply(host, model, clip, _identity(pack, 11, family="sdxl"))


def test_blown_up_tokens_are_refused_against_the_clips_own_scale(host, sd15, pack):
    """A diverged run's finite ~1e30 tokens, in an identity that records no embedding scale (an older file): the
    CLIP's own table is the yardstick, so the sampler never gets to make a black picture of them."""
    model, clip, _ = sd15
    good = _identity(pack, 12)
    blown = pack.core("identity").Identity("sd1", {"clip_l": good.tokens["clip_l"] * 1e30}, "zwx", "person")
    with pytest.raises(ValueError, match=r"identity_2 'zwx': its tokens have blown up: clip_l vectors are up to "
                                         r"\S+ long, \S+ times the mean length of the text encoder's word embeddings "
                                         r"\(0\.55\d*;.*lower learning_rate"):
        _apply(host, model, clip, good, text="sks and zwx", identity_2=blown)
    _apply(host, model, clip, good, text="sks")


def test_composes_with_an_attn2_replace_pack_and_a_controlnet(host, sd15, pack, tiny_controlnet):
    """An IPAdapter-style replace patch (written here) and a ControlNet on the returned conditioning."""
    model, clip, _ = sd15
    identity = _identity(pack, 12)
    patched, cond = _apply(host, model, clip, identity)
    neg = host.run("CLIPTextEncode", clip=clip, text="blurry")[0]
    g = torch.Generator().manual_seed(0)
    seen_k = []

    def ip_replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        b, nq, inner = q.shape
        qh, kh, vh = (x.reshape(x.shape[0], -1, heads, inner // heads).transpose(1, 2) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, nq, inner)
        seen_k.append((extra_options["block"], k.detach().clone(), list(extra_options["cond_or_uncond"])))
        return out + 0.5 * out.std() * torch.ones_like(out)  # the "image prompt" term

    sites = set()

    def site_spy(n, context, value, extra_options):
        sites.add((extra_options["block"][0], extra_options["block"][1], extra_options["block_index"]))
        return n, context, value

    probe = patched.clone()
    probe.set_model_attn2_patch(site_spy)
    _sample(host, probe, cond, neg, steps=1)
    with_ip = patched.clone()
    for name, number, index in sites:
        with_ip.set_model_attn2_replace(ip_replace, name, number, index)
    base_latent = _sample(host, patched, cond, neg)
    ip_latent = _sample(host, with_ip, cond, neg)
    assert {s[0] for s in seen_k} == {(n, i) for n, i, _ in sites}
    assert not torch.allclose(base_latent, ip_latent), "the replace patch had no effect"
    # the replace saw keys projected from *our* routed context, not the plain conditioning
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2
    site_calls = [(k, order) for (blk, k, order) in seen_k if blk == ("input", 1)]
    k, order = site_calls[0]
    plain_k = block.to_k(cond[0][0].to(k.dtype))
    pos = order.index(0) * (k.shape[0] // len(order))
    assert not torch.allclose(k[pos:pos + 1], plain_k)

    cn = host.run("ControlNetLoader", control_net_name=tiny_controlnet.name)[0] if tiny_controlnet.name in \
        host.folder_paths.get_filename_list("controlnet") else None
    if cn is None:
        os.makedirs(host.folder_paths.get_folder_paths("controlnet")[0], exist_ok=True)
        os.symlink(tiny_controlnet, os.path.join(host.folder_paths.get_folder_paths("controlnet")[0],
                                                 tiny_controlnet.name))
        cn = host.run("ControlNetLoader", control_net_name=tiny_controlnet.name)[0]
    hint = torch.rand(1, 64, 64, 3, generator=g)
    pos_c, neg_c = host.run("ControlNetApplyAdvanced", positive=cond, negative=neg, control_net=cn, image=hint,
                            strength=1.0, start_percent=0.0, end_percent=1.0)
    assert torch.equal(pos_c[0][0], cond[0][0]) and "control" in pos_c[0][1]
    cn_latent = _sample(host, patched, pos_c, neg_c)
    plain_cn_latent = _sample(host, model, pos_c, neg_c)
    assert not torch.allclose(cn_latent, base_latent), "the ControlNet had no effect"
    assert not torch.allclose(cn_latent, plain_cn_latent), "the identity had no effect under the ControlNet"
    assert torch.isfinite(cn_latent).all()


def test_load_identity_node_lists_loads_and_tracks_changes(host, pack, tmp_path):
    identity = _identity(pack, 13, n=2)
    folder = host.folder_paths.get_folder_paths("sefi_identities")[0]
    path = os.path.join(folder, "alice.safetensors")
    pack.core("identity").save_identity(identity, path)
    cls = host.nodes["SeFiLoadIdentity"]
    assert "alice.safetensors" in cls.INPUT_TYPES()["required"]["identity_name"][0]
    loaded = host.run("SeFiLoadIdentity", identity_name="alice.safetensors")[0]
    assert torch.equal(loaded.tokens["clip_l"], identity.tokens["clip_l"]) and loaded.trigger == "sks"
    before = cls.IS_CHANGED("alice.safetensors")
    pack.core("identity").save_identity(_identity(pack, 14), path)
    os.utime(path, ns=(1, 1))
    assert cls.IS_CHANGED("alice.safetensors") != before
    with pytest.raises(FileNotFoundError, match="sefi_identities"):
        host.run("SeFiLoadIdentity", identity_name="nobody.safetensors")


def test_chained_nodes_each_route_only_their_own_conditioning(host, sd15, pack, routed_identity):
    """Two SeFiApplyIdentity nodes in a chain (MODEL of the first into the second), their conditionings
    combined: each patch swaps only its own chunk, in either batch position."""
    model, clip, _ = sd15
    first = routed_identity
    second = _identity(pack, 15, trigger="zwx")
    m1, cond_a = _apply(host, model, clip, first, text="a photo of sks person")
    m2, cond_b = _apply(host, m1, clip, second, text="zwx person in a park")
    combined = host.run("ConditioningCombine", conditioning_1=cond_a, conditioning_2=cond_b)[0]
    assert len(combined) == 2
    patches = m2.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert len(patches) == 2 and "attn2_patch" not in model.model_options["transformer_options"].get("patches", {})
    neg = host.run("CLIPTextEncode", clip=clip, text="blurry")[0][0][0]
    sigma = 0.3
    sampling = model.get_model_object("model_sampling")
    stage = min(int(float(sampling.timestep(torch.tensor([sigma]))) * STAGES // 1000), STAGES - 1)
    want_a = _stage_encoding(host, model, clip, first, stage, 0, pack)
    want_b = _stage_encoding(host, model, clip, second, stage, 0, pack, text="zwx person in a park")
    for order, chunks, wants in (([0, 0, 1], [cond_a[0][0], cond_b[0][0], neg], [want_a, want_b, neg]),
                                 ([1, 0, 0], [neg, cond_b[0][0], cond_a[0][0]], [neg, want_b, want_a])):
        context = torch.cat(chunks)
        eo = {"cond_or_uncond": order, "sigmas": torch.full((3,), sigma)}
        value = context
        for patch in patches:  # the host runs the list in order, each patch seeing the previous one's output
            _, context, value = patch(None, context, value, eo)
        for i, want in enumerate(wants):
            torch.testing.assert_close(context[i:i + 1], want, rtol=0, atol=0)


def test_conditioning_concat_keeps_the_identity_in_its_block(host, sd15, pack, routed_identity):
    model, clip, _ = sd15
    patched, cond = _apply(host, model, clip, routed_identity)
    other = host.run("CLIPTextEncode", clip=clip, text="cinematic lighting, film grain")[0]
    joined = host.run("ConditioningConcat", conditioning_to=cond, conditioning_from=other)[0]
    assert joined[0][0].shape == (1, 154, 768)
    sigma = 2.0
    sampling = model.get_model_object("model_sampling")
    stage = min(int(float(sampling.timestep(torch.tensor([sigma]))) * STAGES // 1000), STAGES - 1)
    context = joined[0][0]
    _, ctx, val = _our_patch(patched)(None, context, context, {"cond_or_uncond": [0], "sigmas": torch.tensor([sigma])})
    torch.testing.assert_close(ctx[:, :77], _stage_encoding(host, model, clip, routed_identity, stage, 0, pack),
                               rtol=0, atol=0)
    torch.testing.assert_close(val[:, :77], _stage_encoding(host, model, clip, routed_identity, stage, 1, pack),
                               rtol=0, atol=0)
    torch.testing.assert_close(ctx[:, 77:], other[0][0], rtol=0, atol=0)
