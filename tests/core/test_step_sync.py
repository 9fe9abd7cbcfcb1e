"""The accelerator path of the training loop (fused AdamW, steps read back together), forced on the CPU: same
numbers as the step-by-step path, and the same guarantees on divergence, interrupts and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sefi_core.generator import rebuild_generator
from sefi_core.step_sync import DEFERRED_SYNC_STEPS, choose_sync
from sefi_core.train_state import load_train_state, save_train_state
from sefi_core.training import TrainingDivergedError, run_training

from .test_training import Cancel, Toy, _generator, _same_tensors, _settings, cancelling_host_calls

pytestmark = pytest.mark.usefixtures("one_thread")

DEFERRED = dict(fused=True, sync_every=4)


def _run(mode: dict, steps: int = 13, step_fn=None, **kw):
    saved: list[int] = []
    progress: list[tuple[int, float]] = []
    result = run_training(_generator(), step_fn or Toy("reference"), _settings(steps=steps, checkpoint_every=5),
                          save_checkpoint=lambda s: saved.append(s.step),
                          on_progress=lambda step, total, loss, parts: progress.append((step, loss)), **mode, **kw)
    return result, saved, progress


def test_reading_steps_back_together_changes_no_number() -> None:
    """Only the moment the numbers reach the host differs: bit-identical to the same optimiser read every step,
    with progress, history and checkpoints at the same steps."""
    every, every_saved, every_progress = _run(dict(fused=True, sync_every=1))
    batched, saved, progress = _run(DEFERRED)
    assert _same_tensors(batched.state.generator, every.state.generator)
    assert batched.loss_history == every.loss_history and progress == every_progress
    assert batched.state.parts_history == every.state.parts_history
    assert saved == every_saved == [5, 10, 13]
    assert [s for s, _ in progress] == list(range(1, 14))


def test_fused_adamw_matches_the_step_by_step_path_within_rounding() -> None:
    eager, eager_saved, _ = _run({})
    fused, saved, _ = _run(DEFERRED)
    assert saved == eager_saved
    assert fused.loss_history == pytest.approx(eager.loss_history, rel=1e-5, abs=1e-7)
    for key, value in eager.state.generator.items():
        torch.testing.assert_close(fused.state.generator[key], value, rtol=1e-5, atol=1e-6)
    assert fused.state.parts_history[0].keys() == eager.state.parts_history[0].keys()


def _nan_at(step_index: int):
    toy = Toy("reference")

    def step_fn(tokens, rng, step):
        loss, parts = toy(tokens, rng, step)
        return (loss * float("nan") if step == step_index else loss), parts
    return step_fn


def test_a_non_finite_step_in_the_middle_of_a_batch_is_named_and_leaves_the_step_before(tmp_path: Path) -> None:
    """NaN at step 8 of a 4-step window (5..8 read together): the error names step 8, the last checkpoint is step 5,
    and the generator holds exactly the parameters after step 7, although steps 8 and 9 ran on the device."""
    ckpt = tmp_path / "train.safetensors"
    gen = _generator()
    with pytest.raises(TrainingDivergedError) as info:
        run_training(gen, _nan_at(7), _settings(steps=12, checkpoint_every=5), fused=True, sync_every=4,
                     save_checkpoint=lambda s: save_train_state(s, ckpt))
    assert info.value.step == 8 and info.value.last_checkpoint_step == 5
    assert "step 8/12" in str(info.value) and "loss is not finite" in str(info.value)
    assert load_train_state(ckpt).step == 5
    seven, _, _ = _run(dict(fused=True, sync_every=1), steps=7)
    assert _same_tensors({k: v.detach() for k, v in gen.state_dict().items()}, seven.state.generator)


def test_non_finite_gradient_on_the_first_step_leaves_the_generator_untouched() -> None:
    def inf_grad(tokens, rng, step):
        t = tokens["clip_l"]
        return (t - t.detach()).pow(2).sum().sqrt(), {}  # value 0, d sqrt at 0 -> inf/nan

    gen = _generator(kind="direct")
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="step 1/3: the gradient norm is"):
        run_training(gen, inf_grad, _settings(steps=3), fused=True, sync_every=3)
    assert _same_tensors(gen.state_dict(), before)


@pytest.mark.parametrize("where", ["should_stop", "on_progress", "step_fn"])
def test_interrupt_between_read_backs_checkpoints_the_last_completed_step(tmp_path: Path, where: str) -> None:
    """Cancel at step 6 while steps 5.. are still on the device (sync_every=4): the checkpoint holds step 6 with
    its whole history, and resuming from it reproduces the uninterrupted run bit for bit."""
    settings = _settings(steps=11, checkpoint_every=0)
    full = run_training(_generator(), Toy("reference"), settings, **DEFERRED)
    ckpt = tmp_path / "train.safetensors"
    stop = 6
    calls = cancelling_host_calls(where, stop, Toy("reference"))
    with pytest.raises(Cancel):
        run_training(_generator(), calls.pop("step_fn"), settings, **calls,
                     save_checkpoint=lambda s: save_train_state(s, ckpt), interrupts=(Cancel,), **DEFERRED)
    state = load_train_state(ckpt)
    # on_progress raises while steps 5..8 are reported together: 7 and 8 are done too
    done = 8 if where == "on_progress" else stop
    assert state.step == done and state.loss_history == full.loss_history[:done]
    assert len(state.parts_history) == done
    rest = run_training(rebuild_generator(state.generator_config), Toy("reference"), settings, start_state=state,
                        **DEFERRED)
    assert _same_tensors(rest.state.generator, full.state.generator)
    assert rest.loss_history == full.loss_history


def test_interrupt_after_an_unread_non_finite_step_saves_the_last_good_one(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    bad = _nan_at(5)

    def step_fn(tokens, rng, step):
        if step == 7:
            raise Cancel()  # in step 8: steps 5..7 are unread, and step 6 (index 5) was NaN
        return bad(tokens, rng, step)

    with pytest.raises(Cancel):
        run_training(_generator(), step_fn, _settings(steps=12, checkpoint_every=0), interrupts=(Cancel,),
                     save_checkpoint=lambda s: save_train_state(s, ckpt), **DEFERRED)
    state = load_train_state(ckpt)
    five, _, _ = _run(dict(fused=True, sync_every=1), steps=5)
    assert state.step == 5 and state.loss_history == five.loss_history
    assert _same_tensors(state.generator, five.state.generator)


OLD_GROUP_KEYS = ("fused", "foreach", "capturable", "differentiable", "decoupled_weight_decay")


@pytest.mark.parametrize(("written", "resumed"), [("cpu", "deferred"), ("deferred", "cpu"), ("old", "deferred"),
                                                  ("old", "cpu")])
def test_resume_runs_in_this_runs_optimizer_mode(written: str, resumed: str) -> None:
    """A checkpoint written on the CPU (or by an earlier version, whose param groups lack the mode keys) resumed
    where the fused AdamW reads its skip flag from the device failed at its first step ("Expected grad_scale and
    found_inf to be None"); the reverse kept the fused path. The resumed run's own mode wins, and both reach the
    uninterrupted run's tokens within rounding."""
    modes = {"cpu": {}, "deferred": DEFERRED, "old": {}}
    settings = _settings(steps=10, checkpoint_every=0)
    full, _, _ = _run({}, steps=10)
    state = run_training(_generator(), Toy("reference"), _settings(steps=5, checkpoint_every=0),
                         **modes[written]).state
    if written == "old":
        for group in state.optimizer["param_groups"]:
            for key in OLD_GROUP_KEYS:
                group.pop(key, None)
    rest = run_training(rebuild_generator(state.generator_config), Toy("reference"), settings, start_state=state,
                        **modes[resumed])
    group = rest.state.optimizer["param_groups"][0]
    assert bool(group["fused"]) is (resumed == "deferred")
    assert group["foreach"] in (None, False)  # single-tensor on the CPU; fused leaves foreach unset
    assert rest.steps_done == 10
    for key, value in full.state.generator.items():
        torch.testing.assert_close(rest.state.generator[key], value, rtol=1e-5, atol=1e-6)


def test_choices_and_their_checks() -> None:
    cpu = list(_generator().parameters())
    assert choose_sync(cpu, False, None, None) == (False, 1)  # CPU: step by step, exact-resume AdamW
    assert choose_sync(cpu, False, True, None) == (True, 1)  # the accelerator default only applies off the CPU
    assert choose_sync(cpu, False, True, DEFERRED_SYNC_STEPS) == (True, DEFERRED_SYNC_STEPS)
    with pytest.raises(ValueError, match="needs the fused AdamW"):
        choose_sync(cpu, False, False, 4)
    with pytest.raises(ValueError, match="fp16"):
        choose_sync(cpu, True, True, 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        choose_sync(cpu, False, True, 0)
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]  # an accelerator without a fused kernel
    assert choose_sync(meta, False, None, None) == (False, 1)
    with pytest.raises(ValueError, match="not available"):
        choose_sync(meta, False, True, None)


def test_settle_at_steps_reach_on_progress_with_the_generator_of_that_step() -> None:
    """A sample render or snapshot at step s reads the generator in on_progress(s): with steps read back together,
    settle_at makes the loop read back right after s, so the generator is not already some steps further."""
    gen = _generator()
    seen: dict[int, dict] = {}
    reference = {}

    def every_step(step, total, loss, parts):
        reference[step] = {k: v.detach().clone() for k, v in gen.state_dict().items()}

    run_training(gen, Toy("reference"), _settings(steps=9, checkpoint_every=0), on_progress=every_step,
                 fused=True, sync_every=1)
    gen = _generator()
    run_training(gen, Toy("reference"), _settings(steps=9, checkpoint_every=0), fused=True, sync_every=4,
                 on_progress=lambda step, total, loss, parts: seen.__setitem__(
                     step, {k: v.detach().clone() for k, v in gen.state_dict().items()}),
                 settle_at=lambda step: step in (3, 6))
    assert _same_tensors(seen[3], reference[3]) and _same_tensors(seen[6], reference[6])
    assert not _same_tensors(seen[1], reference[1])  # without settle_at a step reaches on_progress later


@pytest.mark.parametrize("mode", [{}, DEFERRED], ids=["step_by_step", "read_back_together"])
def test_a_steps_checkpoint_is_written_before_its_on_progress(mode, tmp_path: Path) -> None:
    """on_progress runs the optional work (sample renders, snapshots): its failure must never cost a trained step.
    A step whose checkpoint is due (every 5 steps, and the last) is on disk before on_progress of that step runs;
    an error there then leaves the checkpoint of that very step (checkpoint_every 0: the last step is still saved)."""
    events: list[tuple[str, int]] = []
    run_training(_generator(), Toy("reference"), _settings(steps=7, checkpoint_every=5),
                 save_checkpoint=lambda s: events.append(("saved", s.step)),
                 on_progress=lambda step, total, loss, parts: events.append(("progress", step)), **mode)
    assert [e for e in events if e[1] in (5, 7)] == [("saved", 5), ("progress", 5), ("saved", 7), ("progress", 7)]
    ckpt = tmp_path / "c.safetensors"

    def out_of_memory(step, total, loss, parts):
        if step == 3:
            raise RuntimeError("CUDA out of memory (a sample render)")
    with pytest.raises(RuntimeError, match="out of memory"):
        run_training(_generator(), Toy("reference"), _settings(steps=3, checkpoint_every=0),
                     save_checkpoint=lambda s: save_train_state(s, ckpt), on_progress=out_of_memory, **mode)
    assert load_train_state(ckpt).step == 3
