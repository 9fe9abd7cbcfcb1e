"""The speed options of SeFi Train Identity, each checked on the CPU against the eager path with the real step
function (tiny SD1.5, 64 px): `compile_unet` (regional torch.compile of the U-Net's blocks, alone and under gradient
checkpointing) and the loop's accelerator path (fused AdamW, steps read back together). The GPU figures they are
for come from bench/ (bench/README.md); here only the numbers' equality is asserted."""
from __future__ import annotations

import logging

import pytest
import torch

from .test_train_node import RES, _settings, _train, attention_step_and_start


@pytest.fixture(scope="module")
def photo(face_photo):
    return face_photo("obama_1.jpg", 160)


def _blocks(unet) -> int:
    return sum(1 for m in unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResBlock"))


class CompiledRuns:
    """What dynamo did meanwhile: frames it failed to convert (a silent fallback to eager), graph breaks, and how
    many times compiled code ran (the "Torch-Compiled Region" each compiled frame records in a profile). Counting
    wrapped forwards alone also passes when dynamo falls back to eager."""

    def __enter__(self):
        from torch._dynamo.utils import counters
        self.counters = counters
        self.before = self._now()
        self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.profile.__enter__()
        return self

    def _now(self) -> tuple[int, int]:
        frames = self.counters["frames"]
        return frames["total"] - frames["ok"], sum(self.counters["graph_break"].values())

    def __exit__(self, *exc):
        self.profile.__exit__(*exc)
        failed, breaks = (a - b for a, b in zip(self._now(), self.before))
        self.failed_frames, self.graph_breaks = failed, breaks
        self.regions = sum(e.count for e in self.profile.key_averages() if e.key.startswith("Torch-Compiled Region"))
        return False


@pytest.mark.slow  # torch.compile
def test_compiled_blocks_give_the_eager_loss_and_gradients(host, sd15, pack, photo):
    """One step with the attention loss on: the compiled U-Net gives the eager loss, attention term and token
    gradients within float32 rounding, also when a gradient-share step backpropagates each term through the same
    compiled graph (Inductor's in-place buffer reuse made the second one 6 % off) and with gradient checkpointing
    around it (the recomputation runs the compiled blocks); every block's forward is put back afterwards."""
    th = pack.glue("training")
    model, clip, vae = sd15
    unet = model.model.diffusion_model
    with torch.inference_mode(), th.training_context(model, clip):
        step, start = attention_step_and_start(pack, sd15, photo)

        def one_step(per_term: bool = False):
            tok = start.clone().requires_grad_(True)
            loss, parts, terms = step({"clip_l": tok}, torch.Generator().manual_seed(5), 0)
            if per_term:  # a gradient-share step: one backward per term through the same graph
                share.backward_with_shares(terms, [tok])
            else:
                loss.backward()
            return loss.detach(), tok.grad.clone(), float(parts["attention"])

        def diffusion_gradient_twice():
            tok = start.clone().requires_grad_(True)
            _, _, terms = step({"clip_l": tok}, torch.Generator().manual_seed(5), 0)
            first = torch.autograd.grad(terms["diffusion"], tok, retain_graph=True)[0]
            return first, torch.autograd.grad(terms["diffusion"], tok)[0]

        share = pack.core("grad_share")
        before = {id(m): m.__dict__.get("forward") for m in unet.modules()}
        eager = one_step()
        eager_twice = diffusion_gradient_twice()
        with step.unet.compiled(True) as count:
            assert count == _blocks(unet) > 0
            with CompiledRuns() as runs:
                compiled = one_step()
            assert runs.failed_frames == runs.graph_breaks == 0 and runs.regions >= count, vars(runs)
            twice = diffusion_gradient_twice()
            per_term = one_step(per_term=True)
            with step.unet.checkpointing(True):
                checkpointed = one_step()
        after = {id(m): m.__dict__.get("forward") for m in unet.modules()}
    assert eager[2] > 0 and eager[1].abs().sum() > 0
    for other in (compiled, per_term, checkpointed):
        torch.testing.assert_close(other[0], eager[0], rtol=1e-5, atol=1e-7)
        assert other[2] == pytest.approx(eager[2], rel=1e-4)
        torch.testing.assert_close(other[1], eager[1], rtol=1e-3, atol=1e-7)
    for got in twice:  # the second backward through the same compiled graph as well
        torch.testing.assert_close(got, eager_twice[0], rtol=1e-3, atol=1e-7)
    assert all(after[k] is before[k] for k in before)


@pytest.mark.slow  # torch.compile
def test_compile_unet_through_the_node(host, sd15, pack, photo, caplog):
    """Two steps through the node, both gradient-share steps: losses, logged gradient norms (before clipping: Adam's
    first step alone would hide a wrong gradient's scale) and shares as in the eager run."""
    caplog.set_level(logging.INFO)
    logged = {}
    for compile_unet in (False, True):
        seen = logged[compile_unet] = []
        hook = lambda step, total, loss, parts, seen=seen: seen.append((loss, dict(parts)))  # noqa: E731
        identity = _train(host, sd15, photo, name=f"compiled_{compile_unet}", steps=2, flip_augmentation=False,
                          initializer="man", attention_weight=30.0, compile_unet=compile_unet, observer=hook)[0]
        assert identity.training["compile_unet"] is compile_unet
    assert "compiling" in caplog.text and "U-Net blocks (mode default)" in caplog.text
    for (loss_e, parts_e), (loss_c, parts_c) in zip(logged[False], logged[True], strict=True):
        assert loss_c == pytest.approx(loss_e, rel=1e-4)
        assert parts_e["grad_share_attention"] > 1e-3  # both terms really steer the tokens here
        for key in ("grad_norm", "grad_share_attention", "grad_share_diffusion"):
            assert parts_c[key] == pytest.approx(parts_e[key], rel=1e-3), key
    model = sd15[0]
    assert all("forward" not in mod.__dict__ for mod in model.model.modules())


@pytest.mark.slow  # torch.compile
def test_every_training_in_one_process_still_compiles(host, sd15, pack, photo):
    """Three trainings in one process (a server's life): each must run compiled blocks. Compiled entries pile up
    on the blocks' shared code objects across runs, and past dynamo's recompile limits it would quietly run the
    rest eagerly."""
    unet = sd15[0].model.diffusion_model
    for run in range(3):
        with CompiledRuns() as runs:
            _train(host, sd15, photo, name=f"compiled_again_{run}", steps=2, compile_unet=True)
        assert runs.failed_frames == runs.graph_breaks == 0, (run, vars(runs))
        assert runs.regions >= 2 * _blocks(unet), (run, runs.regions)  # every block, in each of the two steps


def test_compile_unet_says_what_to_install(host, sd15, pack, photo, monkeypatch):
    th = pack.glue("training")
    unet_step = pack.glue("training.unet_step")
    monkeypatch.setattr(unet_step.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler .*set compile_unet to false"):
        th.check_compile_available(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="compile_unet"):  # refused before any training starts
        _train(host, sd15, photo, name="no_compiler", steps=1, compile_unet=True)
    import torch.utils._triton as triton_probe
    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton .*triton-windows"):
        th.check_compile_available(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="not on mps"):
        th.check_compile_available(torch.device("mps"))
    assert th.compile_mode(torch.device("cuda")) == "reduce-overhead" and th.compile_mode(torch.device("cpu")) == \
        "default"


def test_accelerator_loop_path_with_the_real_step(host, sd15, pack, photo):
    """The loop's accelerator path forced on the CPU with SeFi's own step function: reading 3 steps back at once
    changes no bit against the same fused AdamW read every step, and the fused AdamW matches the CPU default's
    single-tensor AdamW within rounding."""
    th = pack.glue("training")
    tr = pack.core("training")
    gen = pack.core("generator")
    model, clip, vae = sd15
    settings = _settings(pack, steps=5, lr=5e-3, attention_weight=1.0, grad_share_every=2)
    runs = {}
    with torch.inference_mode(), th.training_context(model, clip):
        step = th.SefiStep(model, clip, vae, th.fit_image(photo, RES), None, settings, "sks", 1)
        init = step.text.initializer_embeddings("man")
        for label, mode in (("cpu default", {}), ("fused", dict(fused=True, sync_every=1)),
                            ("fused, read every 3", dict(fused=True, sync_every=3))):
            g = gen.build_generator("direct", init, stages=2, vectors_per_token=1, kv_split=True, seed=3)
            seen = []
            result = tr.run_training(g, step, settings, on_progress=lambda s, n, loss, parts: seen.append(s),
                                     **mode)
            assert seen == [1, 2, 3, 4, 5], label
            runs[label] = result.state
    a, b, c = runs["cpu default"], runs["fused"], runs["fused, read every 3"]
    assert c.loss_history == b.loss_history and c.parts_history == b.parts_history
    assert all(torch.equal(c.generator[k], b.generator[k]) for k in b.generator)
    assert "grad_share_attention" in c.parts_history[1]
    assert b.loss_history == pytest.approx(a.loss_history, rel=1e-5)
    for k in a.generator:
        torch.testing.assert_close(b.generator[k], a.generator[k], rtol=1e-4, atol=1e-6)


def test_a_batch_is_its_samples_each_with_its_own_stage(host, sd15, pack, photo):
    """batch_size > 1 (the sweep's "several timesteps per step"): each sample is noised at its own timestep and
    conditioned on its own stage's K/V tokens, and the batch's diffusion and attention losses are the means of the
    samples' own losses — so B samples per step spend the sample budget exactly as B steps of one would."""
    th = pack.glue("training")
    stages_of = pack.core("stages").stage_of_timestep
    model, clip, vae = sd15
    settings = _settings(pack, batch_size=4, attention_weight=1.0)
    with torch.inference_mode(), th.training_context(model, clip):
        step = th.SefiStep(model, clip, vae, th.fit_image(photo, RES), None, settings, "sks", 1)
        init = step.text.initializer_embedding("man")
        g = torch.Generator().manual_seed(4)
        tokens = {"clip_l": init.view(1, 1, 1, 768) + 0.05 * torch.randn(5, 2, 1, 768, generator=g)}
        j, x0, m, t, noise = step._draw(torch.Generator().manual_seed(9), 4)
        stages = stages_of(t * (1000.0 / len(step.sigmas)), 5).long()
        assert len(set(stages.tolist())) > 1, "the draw should span several stages"
        seen = []
        encode = step.text.encode_prompt
        step.text.encode_prompt = lambda prompt, vec: seen.append(vec["clip_l"]) or encode(prompt, vec)
        try:
            with torch.no_grad():
                diff, records, _ = step._forward(tokens, j, x0, m, t, noise, True, step.columns)
                att = step._attention_loss(records, m)
                alone = [step._forward(tokens, j, x0[i:i + 1], m, t[i:i + 1], noise[i:i + 1], True, step.columns)
                         for i in range(4)]
                alone_att = [step._attention_loss(r, m) for _, r, _ in alone]
        finally:
            step.text.encode_prompt = encode
    k_rows, v_rows = seen[0][:4], seen[0][4:]
    for i, s in enumerate(stages.tolist()):
        assert torch.equal(k_rows[i], tokens["clip_l"][s, 0]) and torch.equal(v_rows[i], tokens["clip_l"][s, 1])
    torch.testing.assert_close(diff, torch.stack([d for d, _, _ in alone]).mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(att, torch.stack(alone_att).mean(), rtol=1e-4, atol=1e-9)
