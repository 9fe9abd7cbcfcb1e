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
