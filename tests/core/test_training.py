"""The host-agnostic training loop on a toy problem: learning, resume, interrupt, divergence, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sefi_core import train_state
from sefi_core.attention import attention_with_probs, reference_probs
from sefi_core.generator import build_generator, rebuild_generator
from sefi_core.losses import attention_map_distance, reference_attention_loss
from sefi_core.plot import ema, render_loss_curve
from sefi_core.train_state import TrainStateFileError, load_train_state, save_train_state
from sefi_core.training import TrainingDivergedError, TrainSettings, run_training

C, HEADS, STAGES = 32, 4, 2
IDENTITY_COL = 3


pytestmark = pytest.mark.usefixtures("one_thread")


class Toy:
    """A stand-in for the glue's step_fn with the same structure as the real one.

    * "reconstruction": the stage's V token through a fixed random linear map must hit a target
      (plus noise drawn from the step's rng);
    * "attention": a fixed query grid attends over fixed prompt keys with the identity's K token in
      column 3; the reference prompt puts the "person" embedding there. The reference loss pulls the
      identity column's maps toward the reference's, with the same queries.
    """

    def __init__(self, attention: str = "off", weight: float = 1.0):
        g = torch.Generator().manual_seed(42)
        self.proj = torch.randn(C, 8, generator=g) / C**0.5
        self.targets = torch.randn(STAGES, 8, generator=g)
        self.queries = torch.randn(1, 16, C, generator=g)
        self.keys = torch.randn(1, 6, C, generator=g) * 0.5
        self.person = torch.randn(C, generator=g)
        self.attention = attention
        self.weight = weight

    def keys_with(self, vec: torch.Tensor) -> torch.Tensor:
        k = self.keys.clone()
        k[0, IDENTITY_COL] = vec
        return k

    def maps(self, k_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.keys_with(k_token)
        _, ident = attention_with_probs(self.queries, k, k, HEADS, [IDENTITY_COL])
        ref = reference_probs(self.queries, self.keys_with(self.person), HEADS, [IDENTITY_COL])
        return ident, ref

    def __call__(self, tokens: dict[str, torch.Tensor], rng: torch.Generator, step: int):
        t = tokens["clip_l"]
        stage = int(torch.randint(STAGES, (1,), generator=rng))
        noise = torch.randn(8, generator=rng) * 0.01
        recon = ((t[stage, 1, 0] @ self.proj) + noise - self.targets[stage]).pow(2).mean()
        ident, ref = self.maps(t[stage, 0, 0])
        attn = reference_attention_loss(ident, ref)
        loss = recon + (self.weight * attn if self.attention == "reference" else 0.0)
        return loss, {"diffusion": recon.item(), "attention": attn.item(), "stage": stage}

    def distance(self, generator: torch.nn.Module) -> float:
        generator.eval()
        with torch.no_grad():
            t = generator()["clip_l"]
            return float(np.mean([attention_map_distance(*self.maps(t[s, 0, 0])) for s in range(STAGES)]))


def _generator(seed: int = 0, kind: str = "self_attention"):
    init = {"clip_l": torch.randn(1, C, generator=torch.Generator().manual_seed(7)) * 0.5}
    return build_generator(kind, init, stages=STAGES, vectors_per_token=1, kv_split=True, seed=seed)


def _settings(**kw) -> TrainSettings:
    base = dict(steps=12, lr=3e-3, seed=11, checkpoint_every=5, attention_loss="off")
    base.update(kw)
    return TrainSettings(**base)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- settings


def test_settings_json_round_trip_and_validation() -> None:
    s = TrainSettings(steps=50, templates=["a photo of {}"], scale_range=(0.8, 1.2), attention_loss="mask")
    again = TrainSettings.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.scale_range == (0.8, 1.2)
    assert TrainSettings().templates == ["a photo of the face of {}"]
    assert TrainSettings().attention_weight == 0.003
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainSettings.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="attention_loss"):
        TrainSettings(attention_loss="both")
    with pytest.raises(ValueError, match="exactly one"):
        TrainSettings(templates=["no placeholder"])
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(lr=0.0)


# ----------------------------------------------------------------------------- learning


def test_toy_loss_decreases_and_progress_is_reported() -> None:
    calls: list[tuple[int, int]] = []
    result = run_training(
        _generator(), Toy(), _settings(steps=60, checkpoint_every=0),
        on_progress=lambda step, total, loss, parts: calls.append((step, total)),
    )
    h = result.loss_history
    assert len(h) == 60 and not result.interrupted and result.steps_done == 60
    assert np.mean(h[-10:]) < 0.25 * np.mean(h[:10])
    assert calls == [(i, 60) for i in range(1, 61)]
    assert set(result.state.parts_history[0]) == {"diffusion", "attention", "stage", "grad_norm"}


def test_reference_loss_pulls_identity_maps_toward_reference_maps() -> None:
    settings = _settings(steps=60, checkpoint_every=0)
    start = Toy().distance(_generator())
    off_gen, ref_gen = _generator(), _generator()
    run_training(off_gen, Toy("off"), settings)
    run_training(ref_gen, Toy("reference", weight=100.0), settings)
    d_off, d_ref = Toy().distance(off_gen), Toy().distance(ref_gen)
    assert d_ref < 0.5 * start
    assert d_ref < 0.5 * d_off


def test_global_rng_state_is_restored() -> None:
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    run_training(_generator(), Toy(), _settings(steps=3, checkpoint_every=0))
    assert torch.equal(torch.rand(2), expected)


def test_loss_without_gradient_is_a_clear_error() -> None:
    def detached(tokens, rng, step):
        return tokens["clip_l"].detach().sum(), {}

    with pytest.raises(ValueError, match="does not depend on the tokens"):
        run_training(_generator(), detached, _settings(steps=2))


# ----------------------------------------------------------------------------- interrupt / resume


def test_interrupt_then_resume_is_bit_identical(tmp_path: Path) -> None:
    settings = _settings(steps=12, checkpoint_every=5)
    full = run_training(_generator(), Toy("reference"), settings)

    ckpt = tmp_path / "train.safetensors"
    polls = {"n": 0}

    def stop_before_step_8() -> bool:
        polls["n"] += 1
        return polls["n"] == 8

    saved_steps: list[int] = []

    def save(state) -> None:
        saved_steps.append(state.step)
        save_train_state(state, ckpt)

    part = run_training(_generator(), Toy("reference"), settings, should_stop=stop_before_step_8, save_checkpoint=save)
    assert part.interrupted and part.steps_done == 7
    assert saved_steps == [5, 7]
    state = load_train_state(ckpt)
    assert state.step == 7 and len(state.loss_history) == 7
    assert state.loss_history == full.loss_history[:7]
    assert TrainSettings.from_dict(state.settings) == settings

    # The glue's resume path: rebuild from the stored config, then continue.
    resumed_gen = rebuild_generator(state.generator_config)
    rest = run_training(resumed_gen, Toy("reference"), settings, start_state=state, save_checkpoint=save)
    assert not rest.interrupted and rest.steps_done == 12
    assert rest.loss_history == full.loss_history
    assert _same_tensors(rest.state.generator, full.state.generator)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        for pid in full.state.optimizer["state"]:
            assert torch.equal(rest.state.optimizer["state"][pid][k], full.state.optimizer["state"][pid][k])
    assert saved_steps[-1] == 12


class Cancel(Exception):
    """Stands for the host's InterruptProcessingException."""


def cancelling_host_calls(where: str, stop: int, toy) -> dict:
    """run_training's step_fn / on_progress / should_stop, with the one named by `where` raising Cancel at step
    `stop`: in step_fn mid-step (0-based `stop` has not updated anything), in on_progress once 1-based step `stop`
    is reported, in should_stop before 0-based step `stop` starts."""
    def step_fn(tokens, rng, step):
        if where == "step_fn" and step == stop:
            raise Cancel()
        return toy(tokens, rng, step)

    def on_progress(step, total, loss, parts):
        if where == "on_progress" and step == stop:
            raise Cancel()

    polls = {"n": 0}

    def should_stop() -> bool:
        polls["n"] += 1
        if where == "should_stop" and polls["n"] == stop + 1:
            raise Cancel()
        return False

    return dict(step_fn=step_fn, on_progress=on_progress, should_stop=should_stop)


@pytest.mark.parametrize("where", ["should_stop", "on_progress", "step_fn"])
def test_interrupt_raised_by_any_host_call_checkpoints_the_last_completed_step(tmp_path: Path, where: str) -> None:
    """Hosts raise Cancel from wherever they look (the stop check, the progress bar inside on_progress, a callback
    inside the step): the loop saves the last completed step, re-raises the same exception, and resuming from the
    file continues exactly (checkpoint_every=0: nothing else would have been saved)."""
    settings = _settings(steps=9, checkpoint_every=0)
    full = run_training(_generator(), Toy("reference"), settings)
    ckpt = tmp_path / "train.safetensors"
    stop_step = 6
    calls = cancelling_host_calls(where, stop_step, Toy("reference"))
    with pytest.raises(Cancel):
        run_training(_generator(), calls.pop("step_fn"), settings, **calls,
                     save_checkpoint=lambda s: save_train_state(s, ckpt), interrupts=(Cancel,))
    state = load_train_state(ckpt)
    assert state.step == stop_step and state.loss_history == full.loss_history[:stop_step]
    rest = run_training(rebuild_generator(state.generator_config), Toy("reference"), settings, start_state=state)
    assert _same_tensors(rest.state.generator, full.state.generator)
    assert rest.loss_history == full.loss_history


def test_other_exceptions_are_not_taken_for_an_interrupt(tmp_path: Path) -> None:
    def boom(step, total, loss, parts):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_training(_generator(), Toy(), _settings(steps=3, checkpoint_every=0), on_progress=boom,
                     save_checkpoint=lambda s: pytest.fail("only an interrupt saves on the way out"),
                     interrupts=(Cancel,))


def test_saved_state_restores_adam_exactly(tmp_path: Path) -> None:
    result = run_training(_generator(kind="direct"), Toy(), _settings(steps=4, checkpoint_every=0))
    path = save_train_state(result.state, tmp_path / "s.safetensors")
    loaded = load_train_state(path)
    assert _same_tensors(loaded.generator, result.state.generator)
    assert loaded.optimizer["param_groups"] == [
        {**g, "betas": tuple(g["betas"])} for g in result.state.optimizer["param_groups"]
    ]
    gen = rebuild_generator(loaded.generator_config)
    gen.load_state_dict(loaded.generator)
    opt = torch.optim.AdamW(gen.parameters())
    opt.load_state_dict(loaded.optimizer)
    restored = opt.state_dict()
    for pid, entry in result.state.optimizer["state"].items():
        for k, v in entry.items():
            assert torch.equal(restored["state"][pid][k], v)


def test_resume_of_a_finished_run_does_nothing(tmp_path: Path) -> None:
    settings = _settings(steps=3, checkpoint_every=0)
    done = run_training(_generator(), Toy(), settings)
    again = run_training(_generator(), Toy(), settings, start_state=done.state,
                         save_checkpoint=lambda s: pytest.fail("nothing new to save"))
    assert again.steps_done == 3 and again.loss_history == done.loss_history
    with pytest.raises(ValueError, match="beyond steps"):
        run_training(_generator(), Toy(), _settings(steps=2), start_state=done.state)


# ----------------------------------------------------------------------------- divergence


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    toy = Toy()

    def blows_up_at_step_7(tokens, rng, step):
        loss, parts = toy(tokens, rng, step)
        return (loss * float("nan") if step == 7 else loss), parts

    gen = _generator()
    with pytest.raises(TrainingDivergedError) as info:
        run_training(gen, blows_up_at_step_7, _settings(steps=12, checkpoint_every=5),
                     save_checkpoint=lambda s: save_train_state(s, ckpt))
    err = info.value
    assert err.step == 8 and err.last_checkpoint_step == 5
    msg = str(err)
    assert "step 8/12" in msg and "diffusion=" in msg and "lower learning_rate (now 0.003)" in msg
    assert "precision fp32 (now bf16)" in msg and "grad_clip_norm" not in msg
    fp32 = str(TrainingDivergedError(2, 3, float("nan"), {}, "x", _settings(precision="fp32"), None))
    assert "precision" not in fp32 and "lower learning_rate" in fp32
    assert load_train_state(ckpt).step == 5
    assert all(torch.isfinite(p).all() for p in gen.parameters())


def test_non_finite_gradient_is_divergence_too() -> None:
    def inf_grad(tokens, rng, step):
        t = tokens["clip_l"]
        return (t - t.detach()).pow(2).sum().sqrt(), {}  # value 0, d sqrt at 0 -> inf/nan

    gen = _generator(kind="direct")
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="gradient norm"):
        run_training(gen, inf_grad, _settings(steps=3))
    assert _same_tensors(gen.state_dict(), before)


TOY_NORMS = {"clip_l": 0.5 * C**0.5}  # the toy's "word embeddings" (the initializer) are N(0, 0.5²) vectors


def test_tokens_that_blow_up_are_never_checkpointed(tmp_path: Path) -> None:
    """lr 1e9: the loss stays finite while the tokens reach ~1e10, which no NaN check sees and which samples black
    pictures. The first checkpoint measures them against the text encoder's scale and stops the run instead of
    keeping them (the last good checkpoint stays)."""
    ckpt = tmp_path / "train.safetensors"
    saved: list[int] = []

    def save(state) -> None:
        saved.append(state.step)
        save_train_state(state, ckpt)

    run_training(_generator(kind="direct"), Toy(), _settings(steps=2, checkpoint_every=2, lr=1e-2),
                 save_checkpoint=save, token_norms=TOY_NORMS)
    assert saved == [2]
    state = load_train_state(ckpt)
    with pytest.raises(TrainingDivergedError) as info:
        run_training(rebuild_generator(state.generator_config), Toy(), _settings(steps=6, checkpoint_every=2,
                     lr=1e9), start_state=state, save_checkpoint=save, token_norms=TOY_NORMS)
    msg = str(info.value)
    assert "training diverged at step 4/6: the tokens have blown up: clip_l vectors are up to" in msg
    assert "the last checkpoint (step 2) was left untouched" in msg and "lower learning_rate (now 1e+09)" in msg
    assert saved == [2] and load_train_state(ckpt).step == 2
    with pytest.raises(TrainingDivergedError, match="blown up"):  # the final state is measured too
        run_training(_generator(kind="direct"), Toy(), _settings(steps=3, checkpoint_every=0, lr=1e9),
                     token_norms=TOY_NORMS)


def test_a_checkpoint_with_blown_up_tokens_is_refused(tmp_path: Path) -> None:
    state = run_training(_generator(kind="direct"), Toy(), _settings(steps=2, checkpoint_every=0)).state
    for key in state.generator:
        state.generator[key] = state.generator[key] * 1e12
    with pytest.raises(ValueError, match=r"the checkpoint \(step 2\) holds tokens that have blown up: clip_l "
                                         r"vectors .*written before it diverged.*lower learning_rate"):
        run_training(rebuild_generator(state.generator_config), Toy(), _settings(steps=4), start_state=state,
                     token_norms=TOY_NORMS)


def test_measuring_the_tokens_changes_no_bit() -> None:
    plain = run_training(_generator(), Toy("reference"), _settings(steps=8, checkpoint_every=3),
                         save_checkpoint=lambda s: None)
    measured = run_training(_generator(), Toy("reference"), _settings(steps=8, checkpoint_every=3),
                            save_checkpoint=lambda s: None, token_norms=TOY_NORMS)
    assert measured.loss_history == plain.loss_history
    assert _same_tensors(measured.state.generator, plain.state.generator)


# ----------------------------------------------------------------------------- checkpoint file


def test_failed_write_leaves_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "train.safetensors"
    first = run_training(_generator(), Toy(), _settings(steps=2, checkpoint_every=0)).state
    save_train_state(first, ckpt)
    old_bytes = ckpt.read_bytes()
    second = run_training(_generator(seed=1), Toy(), _settings(steps=3, checkpoint_every=0)).state

    def half_then_crash(f, data: bytes) -> None:
        f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(train_state, "_write_payload", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_train_state(second, ckpt)
    assert ckpt.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.safetensors"]
    assert load_train_state(ckpt).step == 2


def test_loading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    import safetensors.torch

    other = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(TrainStateFileError, match="not a SeFi training checkpoint"):
        load_train_state(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(TrainStateFileError):
        load_train_state(junk)
    with pytest.raises(FileNotFoundError):
        load_train_state(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- loss curve


def test_loss_curve_image() -> None:
    history = [1.0 / (1 + 0.1 * i) + 0.05 * np.sin(i) for i in range(100)] + [float("nan")]
    img = render_loss_curve(history, width=320, height=200)
    assert img.shape == (200, 320, 3) and img.dtype == np.uint8
    red = (img[..., 0] > 150) & (img[..., 1] < 100) & (img[..., 2] < 100)
    blue = (img[..., 2] > 200) & (img[..., 0] < 200) & (img[..., 1] < 220)
    assert red.sum() > 200 and blue.sum() > 50  # smoothed and raw curves are drawn
    empty = render_loss_curve([], 128, 96)
    assert empty.shape == (96, 128, 3) and (empty < 255).any()
    assert render_loss_curve([0.5], 128, 96).shape == (96, 128, 3)
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


# ----------------------------------------------------------------------------- fp16 loss scaling


def _half_path(factor: float, loss_weight: float):
    """A step whose gradient reaches the V tokens through fp16 arithmetic: d loss/d token = loss_weight * factor,
    computed in fp16 (underflows to 0 below ~6e-8, overflows to inf above 65504)."""
    def step(tokens, rng, step):
        h = tokens["clip_l"][:, 1].half() * factor
        return (h.float() * loss_weight).sum(), {}
    return step


def test_fp16_loss_scaling_rescues_gradients_that_underflow() -> None:
    tiny = _half_path(1e-3, 1e-5)  # true gradient 1e-8: zero in fp16 without scaling
    moved = {}
    for precision in ("bf16", "fp16"):
        gen = _generator(kind="direct")
        before = {k: v.clone() for k, v in gen.state_dict().items()}
        result = run_training(gen, tiny, _settings(steps=2, weight_decay=0.0, precision=precision))
        moved[precision] = not _same_tensors(gen.state_dict(), before)
        if precision == "fp16":
            assert result.state.loss_scale["scale"] == 2.0**16
            assert [p["loss_scale"] for p in result.state.parts_history] == [2.0**16, 2.0**16]
            v = gen.state_dict()
            key = next(iter(v))
            assert (v[key] < before[key]).any()  # the update follows the (positive) gradient downhill
        else:
            assert result.state.loss_scale is None
    assert moved == {"bf16": False, "fp16": True}


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path: Path) -> None:
    big = _half_path(1.0, 1.0)  # scaled gradient 65536 > fp16 max at the first scale, fine at half of it
    gen = _generator(kind="direct")
    first = {}

    def watch(step, total, loss, parts):
        if step == 1:
            first.update(parts, params={k: v.clone() for k, v in gen.state_dict().items()})

    before = {k: v.clone() for k, v in gen.state_dict().items()}
    result = run_training(gen, big, _settings(steps=3, weight_decay=0.0, precision="fp16"), on_progress=watch)
    assert first["skipped"] == 1.0 and first["loss_scale"] == 2.0**16
    assert _same_tensors(first["params"], before)
    assert [p["loss_scale"] for p in result.state.parts_history] == [2.0**16, 2.0**15, 2.0**15]
    assert "skipped" not in result.state.parts_history[1]
    assert not _same_tensors(gen.state_dict(), before)
    loaded = load_train_state(save_train_state(result.state, tmp_path / "s.safetensors"))
    assert loaded.loss_scale == result.state.loss_scale and loaded.loss_scale["scale"] == 2.0**15


def test_fp16_resume_continues_with_the_saved_scale(tmp_path: Path) -> None:
    big = _half_path(1.0, 1.0)
    settings = _settings(steps=4, weight_decay=0.0, precision="fp16", checkpoint_every=0)
    full = run_training(_generator(kind="direct"), big, settings)
    polls = {"n": 0}
    part = run_training(_generator(kind="direct"), big, settings,
                        should_stop=lambda: (polls.__setitem__("n", polls["n"] + 1) or polls["n"] == 3))
    assert part.interrupted and part.state.loss_scale["scale"] == 2.0**15
    state = load_train_state(save_train_state(part.state, tmp_path / "s.safetensors"))
    rest = run_training(rebuild_generator(state.generator_config), big, settings, start_state=state)
    assert _same_tensors(rest.state.generator, full.state.generator)
    assert rest.state.loss_scale == full.state.loss_scale


def test_fp16_gradient_that_overflows_at_every_scale_is_divergence() -> None:
    def inf_grad(tokens, rng, step):
        t = tokens["clip_l"]
        return (t - t.detach()).pow(2).sum().sqrt(), {}

    gen = _generator(kind="direct")
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="even at loss scale 1") as info:
        run_training(gen, inf_grad, _settings(steps=40, precision="fp16"))
    assert info.value.step == 17  # steps 1-16 halve 2^16 down to 1; overflowing at scale 1 is divergence
    assert _same_tensors(gen.state_dict(), before)
