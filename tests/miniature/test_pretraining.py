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


def test_a_round_of_the_smaller_shape_grows_into_the_third_worlds_u_net_unchanged(host):
    """The third world's U-Net adds transformer blocks to the second's shape; a round of the smaller shape loads into
    it with every added block the identity, so the grown net computes exactly what the round computed — and then
    learns through the added blocks' zeroed ends."""
    from world import model
    from world.train import _clone_saved
    small = model.new_unet(3, "second")
    with torch.no_grad():   # a trained-looking round: no zero ends anywhere, so identity must come from grow()
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    grown = model.new_unet(0, "third")
    added = model.grow(grown, small.state_dict())
    assert added and all(k.startswith(("input_blocks.1.1.transformer_blocks.1.", "output_blocks.0.1.")) for k in added)
    x, context = torch.randn(2, 4, 10, 10), torch.randn(2, 77, 768)
    t = torch.tensor([20.0, 700.0])
    with torch.no_grad():
        assert torch.equal(small(x, timesteps=t, context=context), grown(x, timesteps=t, context=context))
    with torch.autograd.graph.saved_tensors_hooks(_clone_saved, lambda saved: saved):
        grown(x, timesteps=t, context=context).square().mean().backward()
    params = dict(grown.named_parameters())
    assert any(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in added)


def test_grow_refuses_weights_that_are_not_a_smaller_shape(host):
    from world import model
    weights = model.new_unet(0, "second").state_dict()
    weights["out.2.weight"] = torch.zeros(8, 320, 3, 3)
    with pytest.raises(ValueError, match="not a smaller shape.*out.2.weight"):
        model.grow(model.new_unet(0, "third"), weights)


def test_a_third_world_run_from_a_round_of_the_smaller_shape_grows_and_says_so(host, tmp_path):
    from world import model
    from world import train as pretrain
    from world.third import checkpoint as third
    small = {k: v.detach().clone() for k, v in model.new_unet(0, "second").state_dict().items()}
    pretrain.write_weights(small, tmp_path / "round", [{"step": 1, "loss": 1.0, "seconds": 1.0}], seed=0, steps=1,
                           batch=2, world="third")
    said = []
    pretrain.train(0, 2, batch=2, run_dir=tmp_path / "run", out_dir=tmp_path / "next", checkpoint_every=1,
                   threads=1, log=said.append, world="third", init=tmp_path / "round" / "unet.safetensors")
    assert any("growing the round's U-Net" in line for line in said)
    weights, step, _, meta = pretrain.read_round(tmp_path / "next" / "unet.safetensors")
    assert step == 2 and meta["grown_at"] == "1"
    assert set(weights) == set(model.new_unet(0, "third").state_dict())
    third.ensure(tmp_path / "checkpoints", tmp_path / "next" / "unet.safetensors")   # fits the third world's shape
    with pytest.raises(ValueError, match="do not fit the world U-Net"):
        third.ensure(tmp_path / "checkpoints", tmp_path / "round" / "unet.safetensors")


def test_min_snr_weights_only_the_nearly_clean_timesteps_down():
    from world.model import sd_alphas_cumprod
    from world.train import loss_weights
    alphas = sd_alphas_cumprod()
    assert torch.equal(loss_weights(alphas, 0.0), torch.ones(1000))
    w = loss_weights(alphas, 5.0)
    snr = alphas / (1 - alphas)
    assert torch.allclose(w[snr <= 5], torch.ones(int((snr <= 5).sum())))
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5]) and w[0] < 0.01 and bool((w[snr > 5] < 1).all())


def test_a_run_keeps_its_loss_weighting_across_a_resume(host, tmp_path):
    from world import train as pretrain
    quiet = dict(batch=2, checkpoint_every=1, threads=1, log=lambda *_: None)
    pretrain.train(0, 1, run_dir=tmp_path / "run", out_dir=tmp_path / "out", min_snr=5.0, **quiet)
    assert pretrain.read_round(tmp_path / "out" / "unet.safetensors")[3]["min_snr"] == "5.0"
    with pytest.raises(SystemExit, match="--min-snr 5.0"):
        pretrain.train(0, 2, run_dir=tmp_path / "run", out_dir=tmp_path / "out", **quiet)
