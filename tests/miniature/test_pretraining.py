"""Pretraining the world's U-Net (world/train.py): a stopped run resumes to exactly the weights of one that was not
stopped, and `--steps` takes rounds."""
from __future__ import annotations

import argparse

import pytest
import torch


def _weights(folder):
    import safetensors.torch
    return safetensors.torch.load_file(str(folder / "unet.safetensors"))


def test_a_stopped_pretraining_resumes_to_the_weights_of_an_unstopped_one(host, tmp_path, monkeypatch):
    from world import train as pretrain
    quiet = dict(batch=2, checkpoint_every=1, threads=1, log=lambda *_: None)
    pretrain.train(0, 3, run_dir=tmp_path / "whole", out_dir=tmp_path / "whole-out", **quiet)

    drawn = {"pairs": 0}
    real_pair = pretrain.training_pair

    def stop_in_step_3(rng, held_out):  # the process dies while drawing step 3's batch (after step 2's checkpoint)
        drawn["pairs"] += 1
        if drawn["pairs"] > 2 * 2:
            raise KeyboardInterrupt
        return real_pair(rng, held_out)

    monkeypatch.setattr(pretrain, "training_pair", stop_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(0, 3, run_dir=tmp_path / "stopped", out_dir=tmp_path / "stopped-out", **quiet)
    at_stop = torch.load(tmp_path / "stopped" / "state.pt", weights_only=True)
    assert at_stop["step"] == 2
    monkeypatch.setattr(pretrain, "training_pair", real_pair)
    pretrain.train(0, 3, run_dir=tmp_path / "stopped", out_dir=tmp_path / "stopped-out", **quiet)

    whole, resumed = _weights(tmp_path / "whole-out"), _weights(tmp_path / "stopped-out")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # and step 3 did train: the weights moved from where the stopped run left them
    assert any(not torch.equal(whole[k], at_stop["ema"][k].half()) for k in whole)


def test_steps_take_increasing_rounds():
    from world import train as pretrain
    assert pretrain._rounds("1200,2400") == (1200, 2400) and pretrain._rounds("5") == (5,)
    for bad in ("2400,1200", "0", "5,5"):
        with pytest.raises(argparse.ArgumentTypeError, match="increasing positive"):
            pretrain._rounds(bad)


def test_a_run_continues_from_a_committed_round_on_a_fresh_machine(host, tmp_path):
    """Only the EMA weights and the loss log are committed: a run started from them (--init) begins at their step
    with those weights, carries the log on, and trains on."""
    from world import train as pretrain
    quiet = dict(batch=2, checkpoint_every=1, threads=1, log=lambda *_: None)
    pretrain.train(0, 2, run_dir=tmp_path / "first", out_dir=tmp_path / "round", **quiet)
    committed = _weights(tmp_path / "round")
    pretrain.train(0, 3, run_dir=tmp_path / "fresh-machine", out_dir=tmp_path / "next", init=tmp_path / "round" /
                   "unet.safetensors", **quiet)
    _, step, history, meta = pretrain.read_round(tmp_path / "next" / "unet.safetensors")
    assert step == 3 and meta["continued_from"] == "2" and [h["step"] for h in history] == [2, 3]
    continued = _weights(tmp_path / "next")
    assert any(not torch.equal(committed[k], continued[k]) for k in committed)
    with pytest.raises(SystemExit, match="a round of the second world"):
        pretrain.train(0, 4, run_dir=tmp_path / "other", out_dir=tmp_path / "other-out", world="third",
                       init=tmp_path / "next" / "unet.safetensors", **quiet)


def test_training_writes_outside_the_repository_unless_told_and_never_over_the_other_world(tmp_path):
    from world import train as pretrain
    run_dir, out = pretrain.output_paths("second", None, None)
    repo = pretrain.WEIGHTS_DIR.parents[1]
    assert repo not in run_dir.resolve().parents and repo not in out.resolve().parents
    assert pretrain.output_paths("third", tmp_path, None) == (tmp_path, tmp_path / "weights")
    assert pretrain.output_paths("second", tmp_path, pretrain.WEIGHTS_DIR)[1] == pretrain.WEIGHTS_DIR
    with pytest.raises(SystemExit, match="second world's committed model"):
        pretrain.output_paths("third", tmp_path, pretrain.WEIGHTS_DIR)
