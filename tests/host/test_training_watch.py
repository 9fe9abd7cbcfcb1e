"""Training you can watch (issue 24), in the real host with the tiny SD1.5 checkpoint: sample renders, the live
preview through the host's progress hook, step snapshots and the attention-map picture."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

RES = 64


@contextlib.contextmanager
def progress_messages(hostmod):
    """Every (value, max, preview) the host's progress channel receives while the block runs, through the hook each
    host's server uses: upstream's global progress-bar hook (main.py installs it), PyPI's execution-context server
    (its progress message, then the preview image as UNENCODED_PREVIEW_IMAGE)."""
    seen: list[list] = []
    utils = hostmod.comfy.utils
    if hasattr(utils, "set_progress_bar_global_hook"):
        old = utils.PROGRESS_BAR_HOOK
        utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: seen.append([value, total, preview]))
        try:
            yield seen
        finally:
            utils.set_progress_bar_global_hook(old)
        return
    from comfy.component_model.queue_types import BinaryEventTypes
    from comfy.distributed.server_stub import ServerStub
    from comfy.execution_context import ExecutionContext, new_execution_context

    class Recorder(ServerStub):
        def send_sync(self, event, data, sid=None):
            if event == "progress":
                seen.append([data["value"], data["max"], None])
            elif event == BinaryEventTypes.UNENCODED_PREVIEW_IMAGE:
                seen[-1][2] = data

    with new_execution_context(ExecutionContext(Recorder())):
        yield seen


def _previews(seen):
    return [(value, preview[0], preview[1].size) for value, _, preview in seen if preview is not None]


def _identity(pack, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return pack.core("identity").Identity("sd1", {"clip_l": torch.randn(2, 2, 1, 768, generator=g) * 0.02},
                                          "sks", "person")


def _ksampler_run(host, sd15, identity, prompt: str, seed: int, steps: int):
    """The graph a user would build: SeFi Apply Identity, CLIPTextEncode(""), EmptyLatentImage, KSampler, VAEDecode."""
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


def test_attention_picture_maps_are_the_maps_the_loss_used_at_that_step(host, sd15, pack, face_photo):
    """A real training step's loss sites and columns, captured as the loss read them, against the probe the
    attention-map picture is drawn from, for the same photo, timestep and noise."""
    th, tr, ap = pack.glue("training"), pack.core("training"), pack.core("attention_picture")
    L = pack.core("losses")
    model, clip, vae = sd15
    settings = tr.TrainSettings(steps=1, resolution=RES, templates=["a photo of the face of {}"], loss_sites="all")
    g = torch.Generator().manual_seed(2)
    captured = []
    with th.training_context(model, clip):
        pixels = th.fit_image(face_photo("obama_1.jpg", 160), RES)
        step = th.SefiStep(model, clip, vae, pixels, None, settings, "sks", 1)
        tokens = {"clip_l": (torch.randn(2, 2, 1, 768, generator=g) * 0.02).requires_grad_()}
        forward = step.unet.forward

        def spy(*a, **k):
            out = forward(*a, **k)
            captured.append(out[1])
            return out
        step.unet.forward = spy
        _, parts, _ = step(tokens, torch.Generator().manual_seed(9), 0)
        step.unet.forward = forward
        j, _, _, t, noise = step._draw(torch.Generator().manual_seed(9), 1)  # the step's own draws again
        probed = step.attention_records(tokens, 0, int(t), noise, j)
        picture = th.attention_picture(step, {k: v.detach() for k, v in tokens.items()}, pixels, seed=0)
    (used,) = captured
    assert len(used) == len(probed) >= 1
    for a, b in zip(used, probed):
        assert a[:3] == b[:3]
        torch.testing.assert_close(a[3].detach(), b[3])
        torch.testing.assert_close(a[4], b[4])
    loss_from_probe = L.reference_attention_loss([r[3] for r in probed], [r[4] for r in probed],
                                                 reduction=settings.attention_reduction)
    assert float(loss_from_probe) == pytest.approx(float(parts["attention"]), rel=1e-5)
    positions = step.identity_positions()
    assert len(positions) == 1 and step.loss_columns[0][0][positions[0]] == step.prompts[0].slots[0]
    idm, refm = ap.face_maps([r[3].detach() for r in used], [r[4] for r in used], positions, step.latent_hw,
                             step.latent_hw)
    assert idm.shape == (RES // 8, RES // 8) and float(idm.sum()) > 0 and float(refm.sum()) > 0
    assert picture.shape == (1, 192 + 14, 3 * 192, 3) and 0 <= float(picture.min()) <= float(picture.max()) <= 1


def test_watch_sends_previews_through_the_hosts_progress_hook_and_writes_snapshots(host, pack, tmp_path):
    tw, hostmod, sn = pack.glue("training_watch"), pack.glue("host"), pack.glue("snapshots")
    identity = _identity(pack)
    samples = torch.rand(2, RES, RES, 3)
    asked = []

    def current(step):
        asked.append(step)
        return identity

    def run(steps, start=0, **settings):
        with progress_messages(hostmod) as seen:  # upstream's bar takes the hook in force when it is made
            watch = tw.TrainingWatch(tw.WatchSettings(**settings), hostmod.progress_bar(steps), "w",
                                     sn.RunSnapshots(tmp_path, tmp_path / "staged", "w", "run1"), current,
                                     lambda ident: samples, history=[1.0] * start)
            for step in range(start + 1, steps + 1):
                watch.on_step(step, steps, 1.0 / step, {"grad_share_attention": 0.1} if step % 5 == 0 else {})
        return watch, seen

    watch, seen = run(12, preview_every=5)
    assert [v for v, _, _ in seen] == list(range(1, 13)) and all(t == 12 for _, t, _ in seen)
    assert _previews(seen) == [(1, "JPEG", (512, 256)), (5, "JPEG", (512, 256)), (10, "JPEG", (512, 256)),
                               (12, "JPEG", (512, 256))]
    assert watch.previews == 4 and asked == [] and not list(tmp_path.iterdir())

    watch, seen = run(8, preview_every=0, sample_prompts=("sks",), sample_every=4, save_every=3)
    # a preview at each sampling point (the new sample beside the curve), none otherwise (preview_every=0)
    assert _previews(seen) == [(4, "JPEG", (512 + 2 * 256, 256)), (8, "JPEG", (512 + 2 * 256, 256))]
    assert [v for v, _, _ in seen] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert asked == [3, 4, 6, 8] and [watch.needs_parameters_at(s) for s in range(1, 9)] == [
        False, False, True, True, False, True, False, True]
    grid = watch.samples(RES)
    assert grid.shape == (1, 2 * RES, 2 * RES, 3) and torch.equal(grid[0, RES:, :RES], samples[0])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["w@3.safetensors", "w@6.safetensors"]  # no temp file left behind
    loaded = pack.core("identity").load_identity(tmp_path / "w@6.safetensors")
    assert torch.equal(loaded.tokens["clip_l"], identity.tokens["clip_l"])
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    os.utime(tmp_path / "w@6.safetensors", ns=(1, 1))
    asked.clear()
    run(9, start=5, preview_every=0, save_every=3)  # a resumed run trains step 6 again: its snapshot is rewritten
    assert asked == [6, 9] and (tmp_path / "w@6.safetensors").stat().st_mtime_ns != 1
    assert (tmp_path / "w@3.safetensors").stat().st_mtime_ns == stamps["w@3.safetensors"]
    assert (tmp_path / "w@9.safetensors").is_file()
    assert watch.samples(RES).shape == (1, 2 * RES, 2 * RES, 3)
    assert tw.TrainingWatch(tw.WatchSettings(), None, "x", None, current, None).samples(RES).shape == (
        1, RES, RES, 3)


# ----------------------------------------------------------------------------------------- the trainer node

NODE_ARGS = dict(name="watch", trigger="sks", initializer="person", steps=4, learning_rate=0.0, resolution=RES)
FAST = dict(stages=2, parametrisation="direct tokens", checkpoint_every=0, overwrite=True, seed=3)


def _node(host, sd15, photo, options=None, **kw):
    model, clip, vae = sd15
    args = {**NODE_ARGS, **kw}
    if options is not None:
        args["options"] = options
    return host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, **args)


def test_trainer_node_watch_outputs_and_defaults(host, sd15, pack, face_photo):
    """Options from a SeFi Training Options node train as the same values given directly, and watching (previews,
    samples, snapshots) changes no token; the preview reaches the host's progress hook at the right steps and size; the
    node's samples equal render_samples of the snapshot of that step; snapshots are written at the right steps."""
    hostmod, sr, opts = pack.glue("host"), pack.glue("sample_renders"), pack.glue("train_options")
    photo = face_photo("obama_1.jpg", 160)
    folder = pack.glue("train").identity_dir()
    defaults = host.run("SeFiTrainingOptions", **{**opts.OPTION_DEFAULTS, **FAST})[0]
    plain = _node(host, sd15, photo, preview_every=0, **FAST)
    with progress_messages(hostmod) as seen:
        watched = _node(host, sd15, photo, options=defaults, preview_every=3, sample_prompt="a photo of sks person",
                        sample_every=2, save_every=2)
    assert torch.equal(watched[0].tokens["clip_l"], plain[0].tokens["clip_l"])
    per_run = ("peak_memory_bytes", "run_id")
    assert {k: v for k, v in watched[0].training.items() if k not in per_run} == {
        k: v for k, v in plain[0].training.items() if k not in per_run}
    assert watched[0].training["run_id"] != plain[0].training["run_id"]
    # the bar reaches a sampling step before its samples render, then the preview shows them
    assert [v for v, _, _ in seen] == [1, 2, 2, 3, 4, 4]
    wide = (512 + 256, 256)  # one sample prompt beside the curve
    assert _previews(seen) == [(1, "JPEG", (512, 256)), (2, "JPEG", wide), (3, "JPEG", wide), (4, "JPEG", wide)]
    assert sorted(p.name for p in folder.glob("watch@*")) == ["watch@2.safetensors", "watch@4.safetensors"]
    snapshot = pack.core("identity").load_identity(folder / "watch@4.safetensors")
    assert torch.equal(snapshot.tokens["clip_l"], watched[0].tokens["clip_l"])
    assert snapshot.training["steps_done"] == 4 and snapshot.training["run_id"] == watched[0].training["run_id"]
    identity, curve, file_name, samples, maps = watched
    assert samples.shape == (1, 2 * RES, RES, 3) and curve.shape[0] == maps.shape[0] == 1
    model, clip, vae = sd15
    spec = sr.SampleSpec(("a photo of sks person",), seed=3, resolution=RES)
    with torch.inference_mode():
        again = sr.render_samples(model, clip, vae, snapshot, spec)
    torch.testing.assert_close(samples[0, RES:], again[0], atol=2e-5, rtol=1e-4)
    assert maps.shape == (1, 192 + 14, 3 * 192, 3)
    (folder / "watch.safetensors").unlink()  # a fresh run of that name would now mix its snapshots with these
    with pytest.raises(FileExistsError, match="snapshots of an earlier run named 'watch'.*overwrite to true"):
        _node(host, sd15, photo, **{**FAST, "overwrite": False})


def test_cancel_during_a_sample_render_saves_the_checkpoint_and_resume_keeps_the_snapshots(host, sd15, pack,
                                                                                            face_photo, caplog,
                                                                                            monkeypatch):
    """Cancel pressed while the samples of step 2 render: the checkpoint holds step 2, the snapshot of step 2 (written
    just before) stays, and the resumed run neither rewrites it nor misses the one of step 4."""
    train, hostmod, tr = pack.glue("train"), pack.glue("host"), pack.core("train_state")
    # its own name: test_train_node's cancel test leaves a finished "cut" in the session's identity folder
    photo = face_photo("obama_1.jpg", 160)
    folder = train.identity_dir()
    sampled = []
    real_sample = hostmod.sample

    def sample_then_cancel(*args, **kwargs):
        sampled.append(1)
        hostmod.interrupt_current_processing(True)  # the user presses Cancel while the sampler runs
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(hostmod, "sample", sample_then_cancel)
    watch = dict(sample_prompt="sks", sample_every=2, save_every=2, preview_every=0)
    with caplog.at_level("INFO", logger="sefi"), pytest.raises(hostmod.InterruptProcessingException):
        _node(host, sd15, photo, name="cut_in_sampling", **FAST, **watch)
    assert sampled == [1]
    assert "interrupted at step 2/4" in caplog.text and "samples of step 2 rendered" not in caplog.text
    assert tr.load_train_state(train.checkpoint_dir() / "cut_in_sampling.sefi-train").step == 2
    first = folder / "cut_in_sampling@2.safetensors"
    assert first.is_file() and not (folder / "cut_in_sampling.safetensors").exists()
    os.utime(first, ns=(1, 1))
    monkeypatch.setattr(hostmod, "sample", real_sample)
    resumed = _node(host, sd15, photo, name="cut_in_sampling", resume_from="cut_in_sampling",
                    **{**FAST, "overwrite": False}, **watch)
    assert first.stat().st_mtime_ns == 1 and (folder / "cut_in_sampling@4.safetensors").is_file()
    assert resumed[3].shape == (1, RES, RES, 3)  # one sampling point in this run: step 4


def test_the_options_node_carries_the_trainers_former_widgets_with_their_defaults(host, pack):
    """One table: SeFi Training Options' inputs are the only place an option's default is written for the node and
    the trainer (the trainer takes options by name, no keyword of its own repeats a default), and the options that
    are training settings take their defaults from TrainSettings, the settings the loop reads."""
    import dataclasses
    import inspect
    train, opts, tr, gen = pack.glue("train"), pack.glue("train_options"), pack.core("training"), pack.core("generator")
    trainer = host.nodes["SeFiTrainIdentity"]
    assert trainer.INPUT_TYPES()["optional"]["options"][0] == opts.TRAINING_OPTIONS
    assert host.nodes["SeFiTrainingOptions"].RETURN_TYPES == (opts.TRAINING_OPTIONS,)
    keywords = set(inspect.signature(train.SeFiTrainIdentity._train).parameters)
    assert not keywords & set(opts.OPTION_DEFAULTS) and "options" in keywords
    assert dict(opts.training_options(None)) == dict(opts.OPTION_DEFAULTS)
    settings = tr.TrainSettings()
    fields = {f.name for f in dataclasses.fields(settings)} & set(opts.SETTING_OF_OPTION.values())
    assert opts.settings_values(opts.OPTION_DEFAULTS) == {name: getattr(settings, name) for name in fields}
    assert opts.OPTION_DEFAULTS["prompt_templates"] == "\n".join(settings.templates)
    structure = inspect.signature(gen.build_generator).parameters
    assert all(opts.OPTION_DEFAULTS[k] == structure[k].default for k in ("stages", "vectors_per_token", "kv_split"))
    node_widgets = set(trainer.INPUT_TYPES()["required"]) | set(trainer.INPUT_TYPES()["optional"])
    assert not node_widgets & set(opts.OPTION_DEFAULTS)
    with pytest.raises(ValueError, match="unknown training option"):
        opts.training_options({"stage": 3})
