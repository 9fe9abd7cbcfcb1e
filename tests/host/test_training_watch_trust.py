"""Watching never costs the training, and what it keeps belongs to one run (issue 32): a failing sample render,
snapshot or preview is logged, shown and recorded while training goes on (or stops with its checkpoint, if asked);
snapshots are tagged with their run and an earlier run's survive until the new run succeeds; sample rows are bounded
in memory, kept on disk and read back by a resumed run; no watch input is accepted and then ignored."""
from __future__ import annotations

import logging
import mmap
import os

import numpy as np
import pytest
import torch
from PIL import Image

from .test_training_watch import NODE_ARGS, RES, _identity, _node

FAST = dict(stages=2, parametrisation="direct tokens", checkpoint_every=0, overwrite=True, seed=3, preview_every=0)


@pytest.fixture(scope="module")
def photo(face_photo):
    return face_photo("obama_1.jpg", 160)


class Bar:
    """A stand-in progress bar recording (step, preview) as the host's bar receives them."""

    def __init__(self):
        self.seen = []

    def update_absolute(self, value, total=None, preview=None):
        self.seen.append((value, preview))


def _watch(pack, tmp_path, render, *, run_id="run1", stop=False, resumed_at=None, **settings):
    tw, sn = pack.glue("training_watch"), pack.glue("snapshots")
    identity = _identity(pack)
    tagged = pack.core("identity").Identity(identity.family, identity.tokens, "sks", "person", {"run_id": run_id})
    snapshots = sn.RunSnapshots(tmp_path / "ids", tmp_path / "ids" / "checkpoints" / "w.snapshots", "w", run_id)
    return tw.TrainingWatch(tw.WatchSettings(stop_on_failure=stop, **settings), Bar(), "w", snapshots,
                            lambda step: tagged, render, sample_folder=tmp_path / "samples" / run_id,
                            resumed_at=resumed_at)


# ----------------------------------------------------------------------------- failures never cost the training


def test_a_failing_sample_render_is_logged_shown_and_recorded_and_training_goes_on(host, pack, tmp_path, caplog):
    tw, hostmod = pack.glue("training_watch"), pack.glue("host")
    calls = []

    def render(identity):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.rand(1, RES, RES, 3)

    watch = _watch(pack, tmp_path, render, sample_prompts=("sks",), sample_every=2, save_every=2, preview_every=0)
    with caplog.at_level(logging.WARNING, logger="sefi"):
        for step in range(1, 5):
            watch.on_step(step, 4, 1.0 / step, {})
    assert "the sample render of step 2 failed (OutOfMemoryError: CUDA out of memory" in caplog.text
    assert watch.failures == ["step 2: sample render: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                              "2.00 GiB"]
    # the failure is on the node: a preview at step 2 although preview_every is 0, titled with it
    assert [step for step, preview in watch.bar.seen if preview is not None] == [2, 4]
    assert watch.note == "sample render of step 2 failed: see the log"
    assert [s for s, _ in watch.rows] == [4] and (tmp_path / "ids" / "w@2.safetensors").is_file()

    def broken(step):
        raise OSError("disk full")
    watch = _watch(pack, tmp_path, None, save_every=1)
    watch.current_identity = broken
    watch.on_step(1, 2, 1.0, {})  # a failed snapshot: recorded, goes on
    assert watch.failures == ["step 1: snapshot: OSError: disk full"]
    stopping = _watch(pack, tmp_path, render, stop=True, sample_prompts=("sks",), sample_every=1)
    calls.clear()
    with pytest.raises(tw.WatchFailedError, match="the sample render of step 1 failed .*stop_on_watch_failure"):
        stopping.on_step(1, 3, 1.0, {})

    def cancelled(identity):
        raise hostmod.InterruptProcessingException()
    with pytest.raises(hostmod.InterruptProcessingException):  # Cancel is never taken for a failure
        _watch(pack, tmp_path, cancelled, sample_prompts=("sks",), sample_every=1).on_step(1, 3, 1.0, {})


def test_an_out_of_memory_in_sampling_keeps_the_run_and_stop_on_watch_failure_keeps_its_checkpoint(
        host, sd15, pack, photo, monkeypatch, caplog):
    """In the node: every sample render runs out of memory. The run finishes, its identity records the failures;
    with stop_on_watch_failure it stops at the first, with the checkpoint of that step written (checkpoint_every 0);
    a failing attention-map picture costs the picture, never the identity."""
    train, hostmod, tw = pack.glue("train"), pack.glue("host"), pack.glue("training_watch")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (sampling)")
    monkeypatch.setattr(hostmod, "sample", out_of_memory)

    def no_picture(*args, **kwargs):
        raise RuntimeError("out of memory (attention picture)")
    monkeypatch.setattr(train, "attention_picture", no_picture)
    watch = dict(sample_prompt="a photo of sks person", sample_every=1)
    with caplog.at_level(logging.INFO, logger="sefi"):
        identity, _, file_name, samples, maps = _node(host, sd15, photo, name="oom", **{**FAST, "steps": 2}, **watch)
    assert identity.training["watch_failures"] == [
        "step 1: sample render: OutOfMemoryError: CUDA out of memory (sampling)",
        "step 2: sample render: OutOfMemoryError: CUDA out of memory (sampling)"]
    assert identity.training["steps_done"] == 2 and (train.identity_dir() / file_name).is_file()
    assert "its attention-map picture failed (RuntimeError: out of memory" in caplog.text
    assert float(maps.max()) == 0 and samples.shape == (1, RES, RES, 3)
    with pytest.raises(tw.WatchFailedError, match=r"sample render of step 1 failed .*checkpoint .*oomstop\.sefi-train"
                                                  r" holds step 1: set resume_from=oomstop"):
        _node(host, sd15, photo, name="oomstop", stop_on_watch_failure=True, **{**FAST, "steps": 3}, **watch)
    state = pack.core("train_state").load_train_state(train.checkpoint_dir() / "oomstop.sefi-train")
    assert state.step == 1 and state.run_id
    assert not (train.identity_dir() / "oomstop.safetensors").exists()
    assert list(pack.glue("train_options").OPTION_INPUTS)[-1] == "stop_on_watch_failure"  # appended, at the end


# ----------------------------------------------------------------------------- snapshots belong to one run


def test_run_snapshots_stage_beside_another_runs_and_replace_them_only_on_success(host, pack, tmp_path):
    sn = pack.glue("snapshots")
    identity = _identity(pack)

    def tagged(run_id):
        return pack.core("identity").Identity(identity.family, identity.tokens, "sks", "person", {"run_id": run_id})
    folder, staging = tmp_path / "ids", tmp_path / "ids" / "checkpoints" / "w.snapshots"
    old = sn.RunSnapshots(folder, staging, "w", "old")
    old.begin(None)
    for step in (2, 4):
        old.save(tagged("old"), step)
    (folder / "w@6.safetensors").write_bytes(b"not an identity")  # unreadable: not provably anyone's
    new = sn.RunSnapshots(folder, staging, "w", "new")
    assert sorted(new.foreign()) == [2, 4, 6] and old.foreign() == {6: folder / "w@6.safetensors"}
    new.begin(None)
    new.save(tagged("new"), 2)  # beside another run's: staged, the earlier run's @2 untouched
    assert sn.run_of(folder / "w@2.safetensors") == "old" and sn.run_of(staging / "w@2.safetensors") == "new"
    # the new run fails (nothing more happens): the earlier run's snapshots are all there; a resume of it goes on
    again = sn.RunSnapshots(folder, staging, "w", "new")
    again.begin(2)
    again.save(tagged("new"), 4)
    assert sorted(p.name for p in staging.iterdir()) == ["w@2.safetensors", "w@4.safetensors"]
    again.finish()  # success: the earlier run's go, this run's take their place
    assert {p.name: sn.run_of(p) for p in folder.glob("w@*")} == {"w@2.safetensors": "new", "w@4.safetensors": "new"}
    assert not staging.exists()
    # a resume from step 2 after a kill -9 at step 5: this run's @4 (beyond its checkpoint) is stale and goes
    sn.RunSnapshots(folder, staging, "w", "new").begin(2)
    assert [p.name for p in folder.glob("w@*")] == ["w@2.safetensors"]


def test_overwrite_keeps_the_earlier_runs_snapshots_until_the_new_run_succeeds(host, sd15, pack, photo):
    """The earlier run's snapshots are not deleted when an overwrite run starts: a cancelled overwrite run leaves
    them as they were; its resume (overwrite) replaces them on success. A resume without overwrite that finds
    another run's snapshots is refused before any work."""
    train, hostmod, sn = pack.glue("train"), pack.glue("host"), pack.glue("snapshots")
    folder = train.identity_dir()
    first = _node(host, sd15, photo, name="runs", **{**FAST, "steps": 1}, save_every=1)[0]
    earlier = {p.name: p.stat().st_mtime_ns for p in folder.glob("runs@*")}
    assert sorted(earlier) == ["runs@1.safetensors"]
    assert all(sn.run_of(folder / n) == first.training["run_id"] for n in earlier)

    def cancel(step, total, loss, parts):
        if step == 1:
            hostmod.interrupt_current_processing(True)
    with pytest.raises(hostmod.InterruptProcessingException):
        _node(host, sd15, photo, name="runs", **{**FAST, "steps": 2}, save_every=1, observer=cancel)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("runs@*")} == earlier
    aside = (folder / "runs.safetensors").rename(folder / "runs.aside")  # so only the snapshots stand in the way
    with pytest.raises(FileExistsError, match="snapshots named 'runs' that this checkpoint's run did not write"):
        host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=photo,
                 **{**NODE_ARGS, **FAST, "name": "runs", "resume_from": "runs", "steps": 2, "overwrite": False})
    aside.rename(folder / "runs.safetensors")
    resumed = _node(host, sd15, photo, name="runs", resume_from="runs", **{**FAST, "steps": 2}, save_every=1)[0]
    run_id = resumed.training["run_id"]
    assert run_id != first.training["run_id"]
    assert {p.name: sn.run_of(p) for p in folder.glob("runs@*")} == {f"runs@{s}.safetensors": run_id
                                                                     for s in (1, 2)}
    assert pack.core("identity").load_identity(folder / "runs.safetensors").training["run_id"] == run_id


# ----------------------------------------------------------------------------- sample rows: bounded, on disk, resumed


def test_sample_rows_are_bounded_in_memory_written_to_disk_and_read_back_by_a_resume(host, pack, tmp_path,
                                                                                       monkeypatch):
    tw = pack.glue("training_watch")
    rows = {}

    def render(identity):
        rows[len(rows)] = torch.rand(2, RES, RES, 3)
        return rows[len(rows) - 1]

    monkeypatch.setattr(tw, "SAMPLE_ROWS_BYTES", 2 * 2 * RES * RES * 3 * 4)  # two rows of two prompts
    watch = _watch(pack, tmp_path, render, sample_prompts=("sks", "sks smiling"), sample_every=2, preview_every=0)
    for step in range(1, 8):  # 7 steps, every 2: 2, 4, 6 and the final tokens (7)
        watch.on_step(step, 7, 1.0, {})
    assert [s for s, _ in watch.rows] == [6, 7]
    assert watch.samples(RES).shape == (1, 2 * RES, 2 * RES, 3)
    on_disk = sorted(p.name for p in (tmp_path / "samples" / "run1").iterdir())
    assert on_disk == ["w@2.png", "w@4.png", "w@6.png", "w@7.png"]
    # a resume from step 4 (a kill -9 after 7): 6 and 7 are stale and go; 2 and 4 come back from disk, within bound
    back = _watch(pack, tmp_path, render, resumed_at=4, sample_prompts=("sks", "sks smiling"), sample_every=2)
    assert [s for s, _ in back.rows] == [2, 4]
    torch.testing.assert_close(back.rows[1][1], rows[1], atol=1 / 255, rtol=0)  # PNG: 8 bits a channel
    assert sorted(p.name for p in (tmp_path / "samples" / "run1").iterdir()) == ["w@2.png", "w@4.png"]


def test_watch_inputs_do_what_they_say(host, pack, tmp_path, monkeypatch):
    """sample_every 0 with prompts: the final tokens are sampled; sample_every not dividing steps: the final tokens
    too; negative preview/sample/save_every refused at the node edge; a list of prompts: all of them."""
    tw, train = pack.glue("training_watch"), pack.glue("train")
    at_end = tw.WatchSettings(sample_prompts=("sks",), sample_every=0)
    assert [s for s in range(1, 6) if at_end.sampling_due(s, 5)] == [5]
    assert [s for s in range(1, 6) if tw.WatchSettings(sample_prompts=("sks",), sample_every=2).sampling_due(s, 5)
            ] == [2, 4, 5]
    assert not tw.WatchSettings(sample_every=2).sampling_due(4, 5)  # no prompts, no samples
    seen = []
    monkeypatch.setattr(train.SeFiTrainIdentity, "_train", lambda self, *a, watch, **k: seen.append(watch))
    node = train.SeFiTrainIdentity()
    for name in ("preview_every", "sample_every", "save_every"):
        with pytest.raises(ValueError, match=rf"SeFi Train Identity: {name}=-1 is below its minimum 0; set {name} "
                                             r"between 0 and \d+"):
            node.train(None, None, None, [torch.rand(1, 8, 8, 3)], ["n"], trigger=["sks"], **{name: [-1]})
        # a Python caller that builds the settings itself meets the same refusal
        with pytest.raises(ValueError, match=rf"{name} must be a whole number >= 0 \(0 = off\), got -1"):
            tw.WatchSettings(**{name: -1})
    node.train(None, None, None, [torch.rand(1, 8, 8, 3)], ["n"], trigger=["sks"],
               sample_prompt=["a photo of sks person", "sks smiling\nsks laughing"])
    assert seen[-1].sample_prompts == ("a photo of sks person", "sks smiling", "sks laughing")


def test_a_resumed_runs_samples_keep_the_earlier_rows_and_the_final_tokens(host, sd15, pack, photo, monkeypatch):
    """Cancel in the last sampling point (step 2 of 2): the checkpoint holds step 2. The resumed run trains no step,
    yet its samples output holds the earlier row (step 1, from disk) and the final tokens' row — not a black
    frame. A fast stand-in sampler keeps the test short; render_samples' equality with a KSampler graph is tested in
    test_training_watch."""
    train, hostmod = pack.glue("train"), pack.glue("host")
    calls = []

    def fast_sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, on_step=None):
        calls.append(1)
        if len(calls) == 2:
            hostmod.interrupt_current_processing(True)  # Cancel while step 2's samples render
        if on_step is not None:
            on_step()
        return torch.randn(latent.shape, generator=torch.Generator().manual_seed(len(calls)))
    monkeypatch.setattr(hostmod, "sample", fast_sample)
    watch = dict(sample_prompt="a photo of sks person", sample_every=1, steps=2)
    with pytest.raises(hostmod.InterruptProcessingException):
        _node(host, sd15, photo, name="lastcut", **FAST, **watch)
    state = pack.core("train_state").load_train_state(train.checkpoint_dir() / "lastcut.sefi-train")
    assert state.step == 2
    out = _node(host, sd15, photo, name="lastcut", resume_from="lastcut", **{**FAST, "overwrite": False}, **watch)
    samples = out[3]
    assert samples.shape == (1, 2 * RES, RES, 3) and len(calls) == 3
    folder = _samples(pack, "lastcut", state.run_id)
    assert sorted(p.name for p in folder.iterdir()) == ["lastcut@1.png", "lastcut@2.png"]
    disk = np.asarray(Image.open(folder / "lastcut@1.png"), dtype=np.float32) / 255.0
    torch.testing.assert_close(samples[0, :RES], torch.from_numpy(disk))
    assert float(samples[0, RES:].std()) > 0


def _samples(pack, name, run_id):
    from pathlib import Path
    return Path(pack.glue("host").folder_paths.get_output_directory()) / "sefi_samples" / name / run_id


# ----------------------------------------------------------------------------- this run's peak memory


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux measures a run's CPU peak; "
                    "elsewhere none is recorded")
def test_peak_memory_on_the_cpu_is_this_runs_not_the_process_lifetimes(host, pack):
    import resource  # POSIX only: the test runs on Linux
    th = pack.glue("training")
    cpu = torch.device("cpu")
    # 200 MiB of fresh pages, resident, then handed back to the kernel: the process's lifetime peak includes them.
    # An anonymous mmap, not a numpy array: in a long suite malloc may serve an array from freed heap pages that are
    # already resident (no rise) and keep them after del (no fall).
    big = mmap.mmap(-1, 200 * 2**20)
    for offset in range(0, len(big), mmap.PAGESIZE):
        big[offset] = 1
    big.close()
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # what was recorded before (KiB on Linux)
    th.reset_peak_memory(cpu)
    peak = th.peak_memory_bytes(cpu)
    rss = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS:")).split()[1]) * 1024
    assert peak is not None and rss * 0.9 <= peak < lifetime - 100 * 2**20
    during = mmap.mmap(-1, 100 * 2**20)  # this run's own allocation is seen
    for offset in range(0, len(during), mmap.PAGESIZE):
        during[offset] = 1
    assert th.peak_memory_bytes(cpu) >= peak + 90 * 2**20
    during.close()
