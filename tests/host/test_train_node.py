"""SeFiTrainIdentity and its host adapter (nodes/training/) in the real host with the tiny SD1.5
checkpoint. Runs at 64 px with few steps so the whole file stays within a few CPU minutes."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

RES = 64
TEMPLATE = "a photo of the face of {}"


@pytest.fixture(scope="module")
def photo(face_photo):
    """obama_1.jpg as a ComfyUI IMAGE [1, H, W, 3] (the node itself resizes and centre-crops)."""
    return face_photo("obama_1.jpg", 160)


@pytest.fixture(scope="module")
def face_mask(photo):
    """A centred ellipse standing in for a SeFiFaceMask crop mask."""
    h, w = photo.shape[1:3]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return (((xx / 0.45) ** 2 + (yy / 0.6) ** 2) <= 1).float()[None]


def _args(**kw):
    args = dict(name="t", trigger="sks", initializer="person", steps=4, learning_rate=0.0, stages=2,
                vectors_per_token=1, parametrisation="direct tokens", kv_split=True, attention_loss="reference",
                attention_weight=0.003, loss_sites="quarter", masked_diffusion_loss=False,
                prompt_templates=TEMPLATE, flip_augmentation=True, scale_augmentation=False, seed=3,
                resolution=RES, batch_size=1, checkpoint_every=0, resume_from="", overwrite=True)
    args.update(kw)
    return args


def _train(host, sd15, photo, **kw):
    model, clip, vae = sd15
    return host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, **_args(**kw))


def _settings(pack, **kw):
    base = dict(steps=1, resolution=RES, flip=False, templates=[TEMPLATE], attention_loss="reference",
                loss_sites="all")
    base.update(kw)
    return pack.core("training").TrainSettings(**base)


def _evaluate(pack, sd15, photo, tokens, mask=None, **kw):
    """Diffusion loss and identity/reference maps of `tokens` for fixed (t, noise) pairs (no augmentation)."""
    th = pack.glue("training")
    model, clip, vae = sd15
    g = torch.Generator().manual_seed(11)
    pairs = [(t, torch.randn(1, 4, RES // 8, RES // 8, generator=g)) for t in (50, 150, 300, 450, 600, 750, 900)]
    with th.training_context(model, clip):
        pixels = th.fit_image(photo, RES)
        m = None if mask is None else th.fit_mask(mask, RES)
        step = th.SefiStep(model, clip, vae, pixels, m, _settings(pack, **kw), "sks", 1)
        return step.evaluate(tokens, pairs)


def test_manual_clip_matches_host_encode_and_has_gradient(host, sd15, pack):
    th, pe = pack.glue("training"), pack.glue("prompt_encoding")
    model, clip, _ = sd15
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(1, 1, 768, generator=g) * 0.02
    with torch.inference_mode():
        with th.training_context(model, clip):
            enc = th.TextEncoder(clip)
            p = enc.prompt(TEMPLATE, "sks", 1)
            v = vec.clone().requires_grad_(True)
            ours = enc.encode(torch.tensor([p.ids]), p.slots, v)
            ours.pow(2).mean().backward()
            grad = v.grad.clone()
        plan = pe.plan_prompt(clip, TEMPLATE.format("sks"), [th.TriggerWord("sks", 1)], 1.0)
        theirs, _ = pe.encode_with_vectors(clip, plan, [{"clip_l": vec[0]}])
    assert [t for t, *_ in plan.tokens["l"][0]] == p.ids
    torch.testing.assert_close(ours.detach(), theirs.float(), atol=1e-3, rtol=1e-3)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_clip_gradient_keeps_no_widened_weight_copies(host, sd15, pack):
    """CLIP is stored in fp16 and computed in fp32: during training its linears widen the weights per call, so what
    autograd keeps for backward are the stored weights themselves (no fp32 copy of CLIP), and the text gradient
    equals the one through a plain fp32 copy of CLIP run by the host's own layers."""
    th = pack.glue("training")
    model, clip, _ = sd15
    text = clip.cond_stage_model
    vec = torch.randn(1, 1, 768, generator=torch.Generator().manual_seed(1)) * 0.02

    def encode_and_grad(saved):
        enc = th.TextEncoder(clip)
        p = enc.prompt(TEMPLATE, "sks", 1)
        v = vec.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = enc.encode(torch.tensor([p.ids]), p.slots, v)
        out.pow(2).mean().backward()
        return v.grad.clone()

    saved: list[torch.Tensor] = []
    with torch.inference_mode():
        with th.training_context(model, clip):
            linears = [m for m in text.modules() if isinstance(m, torch.nn.Linear)]
            assert {m.weight.dtype for m in linears} == {torch.float16}  # as the host stores CLIP
            weight_ptrs = {m.weight.data_ptr() for m in linears}
            shapes = {tuple(m.weight.shape) for m in linears}
            grad = encode_and_grad(saved)
        reference_saved: list[torch.Tensor] = []
        with torch.inference_mode(False), torch.enable_grad(), th.frozen_copies([text], torch.float32):
            reference = encode_and_grad(reference_saved)
    weights_kept = [t for t in saved if t.dim() == 2 and tuple(t.shape) in shapes]
    assert weights_kept and all(t.dtype == torch.float16 and t.data_ptr() in weight_ptrs for t in weights_kept)
    assert any(t.dtype == torch.float32 and t.dim() == 2 and tuple(t.shape) in shapes for t in reference_saved)
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-9)
    assert all("forward" not in m.__dict__ for m in text.modules())


@pytest.fixture(scope="module")
def trained_off(host, sd15, photo):
    return _train(host, sd15, photo, name="off", steps=8, stages=1, learning_rate=0.05, attention_loss="off",
                  flip_augmentation=False)


def test_training_lowers_fixed_noise_loss(host, sd15, pack, photo, trained_off):
    """Direct tokens, one image, lr 0.05 so 8 CPU steps move them: the diffusion loss at fixed (t, noise) pairs
    is lower with the trained tokens than with the initializer tokens."""
    identity, curve, fname = trained_off[:3]
    th = pack.glue("training")
    model, clip, _ = sd15
    with torch.inference_mode(), th.training_context(model, clip):
        init = th.TextEncoder(clip).initializer_embedding("person")
    start = {"clip_l": init.view(1, 1, 1, 768).expand(1, 2, 1, 768).clone()}
    with torch.inference_mode():
        before = _evaluate(pack, sd15, photo, start, attention_loss="off")["loss"]
        after = _evaluate(pack, sd15, photo, dict(identity.tokens), attention_loss="off")["loss"]
    assert after < before, (before, after)
    assert fname == "off.safetensors" and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert identity.training["steps_done"] == 8 and identity.training["peak_memory_bytes"] > 0


def _maps(result):
    ids = torch.cat([torch.cat(s, 2) for s in result["id_maps"]], 2)
    refs = torch.cat([torch.cat(s, 2) for s in result["ref_maps"]], 2)
    return ids, refs


def test_attention_losses_move_the_maps(host, sd15, pack, photo, face_mask, trained_off):
    """attention_weight is raised to 300 (from the paper's 0.003) so that 8 CPU steps show the effect of each
    mode against the same run with the loss off."""
    L = pack.core("losses")
    common = dict(steps=8, stages=1, learning_rate=0.05, flip_augmentation=False, attention_weight=300.0,
                  loss_sites="all")
    ref_id = _train(host, sd15, photo, name="ref", attention_loss="reference", **common)[0]
    mask_id = _train(host, sd15, photo, name="mask", attention_loss="mask", mask=face_mask, **common)[0]
    with torch.inference_mode():
        off_eval = _evaluate(pack, sd15, photo, dict(trained_off[0].tokens), mask=face_mask)
        ref_eval = _evaluate(pack, sd15, photo, dict(ref_id.tokens), mask=face_mask)
        mask_eval = _evaluate(pack, sd15, photo, dict(mask_id.tokens), mask=face_mask)
    d_off = L.attention_map_distance(*_maps(off_eval))
    d_ref = L.attention_map_distance(*_maps(ref_eval))
    assert d_ref < d_off, (d_ref, d_off)

    def inside(ev):
        return np.mean([L.attention_mass_inside(p, m) for ps, ms in zip(ev["id_maps"], ev["mask_grids"])
                        for p, m in zip(ps, ms)])
    assert inside(mask_eval) > inside(off_eval), (inside(mask_eval), inside(off_eval))


def test_cancel_from_another_thread_saves_the_step_reached_and_resumes_exactly(host, sd15, pack, photo, caplog):
    """Cancel the way the UI does it: another thread calls the host's interrupt_current_processing while training
    runs. The host raises it from inside the progress-bar update (PyPI's bar checks the flag; upstream's does through
    the hook its server installs, installed here the same way) or from its stop check; either way the last completed
    step is checkpointed (checkpoint_every=0: nothing else saves it), the log names it, the interrupt propagates,
    and resuming gives the tokens of an uninterrupted run. tests/core/test_training.py checks each raising site."""
    import re
    import threading
    train, hostmod, tr = pack.glue("train"), pack.glue("host"), pack.core("train_state")
    mm = hostmod.model_management
    common = dict(steps=5, parametrisation="self-attention generator", stages=2, checkpoint_every=0)
    full = _train(host, sd15, photo, name="full", **common)[0]
    reached, sent, done = threading.Event(), threading.Event(), threading.Event()

    def observe(step, total, loss, parts):  # only watches: the interrupt comes from the other thread, mostly
        if step == 2:                       # while step 3 computes; waiting at step 3 keeps it within the run
            reached.set()
        if step == 3:
            assert sent.wait(300)

    def press_cancel():
        reached.wait()  # set at step 2, or by the finally below if training never got there
        if not done.is_set():
            hostmod.interrupt_current_processing(True)
        sent.set()

    def server_progress_hook(value, total, preview, **kw):  # what upstream's server installs (main.py)
        mm.throw_exception_if_processing_interrupted()

    # PyPI 0.0.1's ProgressBar.update always checks the flag; upstream's does through the hook its server sets
    utils = hostmod.comfy.utils
    hookable = hasattr(utils, "set_progress_bar_global_hook")
    old_hook = getattr(utils, "PROGRESS_BAR_HOOK", None)
    if hookable:
        utils.set_progress_bar_global_hook(server_progress_hook)
    canceller = threading.Thread(target=press_cancel)
    canceller.start()
    try:
        with caplog.at_level("INFO", logger="sefi"), pytest.raises(hostmod.InterruptProcessingException):
            _train(host, sd15, photo, name="cut", observer=observe, **common)
    finally:
        if hookable:
            utils.set_progress_bar_global_hook(old_hook)
        done.set()
        reached.set()
        canceller.join()
    ckpt = train.checkpoint_dir() / "cut.sefi-train"
    found = re.search(r"interrupted at step (\d+)/5, checkpoint (\S+)", caplog.text)
    assert found, caplog.text
    reached_step = int(found.group(1))
    assert found.group(2) == str(ckpt) and reached_step in (2, 3)
    assert tr.load_train_state(ckpt).step == reached_step
    assert not (train.identity_dir() / "cut.safetensors").exists()
    resumed = _train(host, sd15, photo, name="cut", resume_from="cut", **common)[0]
    assert torch.equal(resumed.tokens["clip_l"], full.tokens["clip_l"])
    assert resumed.training["resumed_at_step"] == reached_step


def _snapshot(module):
    return {k: (v, v.detach().clone()) for k, v in list(module.named_parameters()) + list(module.named_buffers())}


def test_attention_capture_leaves_the_prediction_unchanged(host, sd15, pack, photo):
    """At the loss sites the replace computes attention by hand (to read the probabilities) and the reference keys
    ride along in the context: the U-Net's prediction must equal the uncaptured one, and every recorded map must be
    a probability over the prompt's keys (reference maps: over the reference's keys)."""
    th = pack.glue("training")
    model, clip, vae = sd15
    with th.training_context(model, clip):
        step = th.SefiStep(model, clip, vae, th.fit_image(photo, RES), None,
                           _settings(pack, attention_tokens="all"), "sks", 1)
        init = step.text.initializer_embeddings("person")
        tokens = {"clip_l": init["clip_l"].mean(0)[None, None, None].repeat(2, 2, 1, 1)}
        x0 = step.latents[:1]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        t = torch.tensor([400])
        with torch.no_grad():
            plain, none, _ = step._forward(tokens, 0, x0, None, t, noise, False, step.columns)
            captured, records, _ = step._forward(tokens, 0, x0, None, t, noise, True, step.columns)
    assert none == [] and len(records) == len(step.unet.loss_keys) == len(step.unet.sites)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-6)
    for *_, probs, ref in records:
        assert probs.shape[-1] == ref.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref.sum(-1)))


def test_frozen_weights_untouched(host, sd15, pack, photo):
    model, clip, vae = sd15
    mods = [model.model, clip.cond_stage_model, vae.first_stage_model]
    with torch.inference_mode():
        before = [_snapshot(m) for m in mods]
        options = repr(model.model_options)
        _train(host, sd15, photo, name="frozen", steps=1, attention_loss="reference")
    for m, snap in zip(mods, before):
        now = dict(list(m.named_parameters()) + list(m.named_buffers()))
        assert now.keys() == snap.keys()
        for k, (obj, val) in snap.items():
            assert now[k] is obj, f"{k} was replaced"
            assert torch.equal(now[k], val), f"{k} changed"
    assert repr(model.model_options) == options
    assert all("forward" not in mod.__dict__ for mod in model.model.modules())


def test_frozen_stand_ins_share_memory_unless_cast(host, sd15, pack):
    """Same dtype: the training stand-in is an ordinary tensor over the original's memory (no second copy of the
    weights); a cast makes a copy and, when parking is on, the original moves off its storage until exit."""
    th = pack.glue("training")
    model, _, _ = sd15
    with torch.inference_mode():  # as the executor loads models
        pack.glue("host").load_for_training(model, sd15[1])
    unet = model.model.diffusion_model
    names = [n for n, p in unet.named_parameters() if p.is_floating_point()][:50]
    with torch.inference_mode():
        originals = {n: p for n, p in unet.named_parameters() if n in names}
        values = {n: p.detach().clone() for n, p in originals.items()}
    dtype = originals[names[0]].dtype
    with torch.inference_mode(False):
        with th.frozen_copies([unet], dtype):
            inside = dict(unet.named_parameters())
            for n in names:
                assert inside[n] is not originals[n] and not inside[n].is_inference()
                assert inside[n].data_ptr() == originals[n].data_ptr()
        other = torch.bfloat16 if dtype != torch.bfloat16 else torch.float32
        with th.frozen_copies([unet], other, park_originals=True):
            inside = dict(unet.named_parameters())
            for n in names:
                assert inside[n].dtype == other
                assert originals[n].data_ptr() != inside[n].data_ptr()
            parked_ptrs = {n: originals[n].data_ptr() for n in names}
    after = dict(unet.named_parameters())
    for n in names:
        assert after[n] is originals[n]
        assert after[n].data_ptr() != parked_ptrs[n]
        assert torch.equal(after[n], values[n])


def test_name_overwrite_and_divergence(host, sd15, pack, photo):
    train = pack.glue("train")
    tr = pack.core("training")
    for bad in ("../x", "a/b", "a\\b"):
        with pytest.raises(ValueError, match="plain file name"):
            _train(host, sd15, photo, name=bad)
    _train(host, sd15, photo, name="keep", steps=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        _train(host, sd15, photo, name="keep", steps=1, overwrite=False)
    ckpt = train.checkpoint_dir() / "nan.sefi-train"
    # lr 1e30: step 1's loss is finite but its update already blows the tokens up, so step 1's checkpoint would
    # hold them — it is never written (issue 20: blown-up tokens never become a checkpoint), and the run diverges
    with pytest.raises(tr.TrainingDivergedError, match="diverged"):
        _train(host, sd15, photo, name="nan", steps=3, learning_rate=1e30, checkpoint_every=1)
    assert not ckpt.exists() and not list(train.checkpoint_dir().glob("nan.*"))
    assert not (train.identity_dir() / "nan.safetensors").exists()


def test_saved_identity_samples_through_server(host, sd15, pack, photo, trained_off, server):
    """The trained file, loaded by SeFiLoadIdentity on a real server, drives SeFiApplyIdentity → KSampler → SaveImage."""
    from batch.comfy_client import output_files
    train = pack.glue("train")
    dest = server.models_dir / "sefi_identities"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(train.identity_dir() / "off.safetensors", dest / "trained_off.safetensors")
    ckpt = next((server.models_dir / "checkpoints").iterdir()).name
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "SeFiLoadIdentity", "inputs": {"identity_name": "trained_off.safetensors"}},
        "3": {"class_type": "SeFiApplyIdentity", "inputs": {"model": ["1", 0], "clip": ["1", 1], "identity": ["2", 0],
                                                             "text": "a photo of sks person", "strength": 1.0,
                                                             "start_percent": 0.0, "end_percent": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["3", 1], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sefi_trained"}},
    }
    entry = server.client.run(graph, timeout=300)
    files = output_files(entry, server.output_dir)
    assert files and all(f.is_file() for f in files)


def test_kv_encodes_batched_equal_separate(host, sd15, pack):
    """K and V contexts come from one CLIP forward of batch 2; that equals two separate encodes."""
    th = pack.glue("training")
    model, clip, _ = sd15
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, 1, 768, generator=g) * 0.02 for _ in range(2))
    with torch.inference_mode(), th.training_context(model, clip), torch.no_grad():
        enc = th.TextEncoder(clip)
        p = enc.prompt(TEMPLATE, "sks", 1)
        both = enc.encode_prompt(p, {"clip_l": torch.cat([k, v])})
        apart = torch.cat([enc.encode_prompt(p, {"clip_l": k}), enc.encode_prompt(p, {"clip_l": v})])
    assert both.shape == (2, 77, 768)
    torch.testing.assert_close(both, apart, atol=1e-5, rtol=1e-5)


def attention_step_and_start(pack, sd15, photo):
    """Inside training_context: a SefiStep with the attention loss at weight 1 (every site) and K/V tokens near
    "person" — the one step that the eager / checkpointed / compiled comparisons all run."""
    th = pack.glue("training")
    model, clip, vae = sd15
    step = th.SefiStep(model, clip, vae, th.fit_image(photo, RES), None, _settings(pack, attention_weight=1.0),
                       "sks", 1)
    init = step.text.initializer_embedding("person")
    g = torch.Generator().manual_seed(2)
    return step, init.view(1, 1, 1, 768).expand(2, 2, 1, 768) + 0.01 * torch.randn(2, 2, 1, 768, generator=g)


def test_gradient_checkpointing_same_loss_and_gradients(host, sd15, pack, photo):
    """One step with the attention loss on: checkpointed blocks give the same loss and token gradients, record
    each loss map once, and every module's forward is put back afterwards (also through the node)."""
    th = pack.glue("training")
    model, clip, vae = sd15
    unet = model.model.diffusion_model
    with torch.inference_mode(), th.training_context(model, clip):
        step, start = attention_step_and_start(pack, sd15, photo)

        def one_step():
            tok = start.clone().requires_grad_(True)
            loss, parts, _ = step({"clip_l": tok}, torch.Generator().manual_seed(5), 0)
            loss.backward()
            return loss.detach(), tok.grad.clone(), parts

        before = {id(m): m.__dict__.get("forward") for m in unet.modules()}
        loss0, grad0, parts0 = one_step()
        with step.unet.checkpointing(True) as wrapped:
            assert wrapped > 0
            loss1, grad1, parts1 = one_step()
        after = {id(m): m.__dict__.get("forward") for m in unet.modules()}
    assert parts0["attention"] > 0
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts1["attention"], parts0["attention"], rtol=1e-5, atol=1e-9)
    assert grad0.abs().sum() > 0
    torch.testing.assert_close(grad1, grad0, rtol=1e-4, atol=1e-8)
    assert all(after[k] is before[k] for k in before)
    identity = _train(host, sd15, photo, name="ckpt", steps=1, gradient_checkpointing=True)[0]
    assert identity.training["gradient_checkpointing"] is True
    assert all("forward" not in mod.__dict__ for mod in model.model.modules())


def test_precision_choices(host, sd15, pack, photo):
    """auto and fp32 train in float32 on CPU; bf16 runs a step with a finite loss; tokens stay float32 and the
    model's dtype attributes and weights are restored."""
    model, _, _ = sd15
    unet = model.model.diffusion_model
    dtype_before, cast_before = unet.dtype, model.model.manual_cast_dtype
    weight = next(unet.parameters())
    for precision, want in (("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")):
        identity = _train(host, sd15, photo, name=f"prec_{precision}", steps=2, precision=precision)[0]
        assert identity.training["precision"] == want
        assert np.isfinite(identity.training["final_loss"])
        assert identity.tokens["clip_l"].dtype == torch.float32
    assert unet.dtype == dtype_before and model.model.manual_cast_dtype == cast_before
    assert next(unet.parameters()) is weight
    with pytest.raises(ValueError, match="precision"):
        _train(host, sd15, photo, name="prec_bad", steps=1, precision="int8")


def test_auto_precision_follows_the_loaded_model(sd15, pack, monkeypatch):
    """auto = fp32 on CPU; on an accelerator the model's own compute dtype (manual-cast dtype first), so that the
    weights are used in place; explicit choices win."""
    th = pack.glue("training")
    model = sd15[0]
    assert th.compute_dtype(model, "auto") == torch.float32
    monkeypatch.setattr(model, "load_device", torch.device("cuda", 0))  # only read, never used for CUDA here
    monkeypatch.setattr(model.model, "get_dtype", lambda: torch.float16)
    monkeypatch.setattr(model.model, "manual_cast_dtype", None)
    assert th.compute_dtype(model, "auto") == torch.float16
    monkeypatch.setattr(model.model, "manual_cast_dtype", torch.bfloat16)
    assert th.compute_dtype(model, "auto") == torch.bfloat16
    monkeypatch.setattr(model.model, "get_dtype", lambda: torch.float8_e4m3fn)
    monkeypatch.setattr(model.model, "manual_cast_dtype", None)
    assert th.compute_dtype(model, "auto") == torch.float32
    assert th.compute_dtype(model, "fp16") == torch.float16
