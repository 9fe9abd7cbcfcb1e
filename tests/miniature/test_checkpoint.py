"""The world checkpoint (world/checkpoint.py) as the host's own CheckpointLoaderSimple sees it."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from tools import tiny_checkpoints
from world import checkpoint, text_encoder


def test_world_checkpoint_is_detected_as_sd15_with_the_sd_vae(host, world_models, world_sd15):
    model, _, autoencoder = world_models
    assert world_sd15.name in host.folder_paths.get_filename_list("checkpoints")
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(autoencoder.first_stage_model).__name__ == "AutoencoderKL"
    assert autoencoder.downscale_ratio == 8      # not taken for the ×4 upscaler's VAE


def test_its_unet_holds_the_weights_it_was_built_from(world_models, world_unet_weights):
    import safetensors.torch
    model, _, _ = world_models
    weights = safetensors.torch.load_file(str(world_unet_weights))
    loaded = model.model.diffusion_model.state_dict()
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key].to(value.dtype), value), key


@pytest.fixture(scope="module")
def word_table(host) -> text_encoder.WordTable:
    import comfy.sd1_clip
    return text_encoder.WordTable(text_encoder.construct(tiny_checkpoints.text_shapes(comfy.sd1_clip.SD1ClipModel)))


@pytest.mark.parametrize("text", ["a photo of the face of person", "a close-up photo of the face of a person with "
                                  "red hair, wearing glasses and smiling, on a beach"])
def test_clip_text_encode_equals_the_word_table_pretraining_uses(host, world_models, word_table, text):
    """Pretraining feeds the U-Net WordTable.encode(ids) (no CLIP run): the host's CLIP on the file must agree."""
    _, clip, _ = world_models
    cond = host.run("CLIPTextEncode", clip=clip, text=text)[0][0][0]
    ids = torch.tensor([[token[0] for token in clip.tokenize(text)["l"][0]]])
    expected = word_table.encode(ids)
    assert cond.shape == expected.shape == (1, 77, 768)
    assert (cond.float() - expected).abs().max().item() < 1e-3


def test_ensure_reuses_the_file_and_rebuilds_it_when_the_unet_weights_change(host, world_sd15, world_unet_weights,
                                                                              tmp_path):
    weights = tmp_path / "unet.safetensors"
    shutil.copy(world_unet_weights, weights)
    (tmp_path / "models").mkdir()
    os.link(world_sd15, tmp_path / "models" / checkpoint.NAME)   # built from the same weights: already current
    before = os.stat(tmp_path / "models" / checkpoint.NAME)
    path = checkpoint.ensure(tmp_path / "models", weights)
    assert os.stat(path).st_ino == before.st_ino and os.stat(path).st_mtime_ns == before.st_mtime_ns
    tiny_checkpoints.save(checkpoint.random_unet_weights(seed=7), weights)
    path = checkpoint.ensure(tmp_path / "models", weights)
    assert os.stat(path).st_ino != before.st_ino
    assert checkpoint.stored_recipe(path) == checkpoint.recipe(weights) != checkpoint.stored_recipe(world_sd15)


def test_unet_weights_of_another_shape_are_refused_with_what_is_wrong(host, tmp_path):
    weights = checkpoint.random_unet_weights(seed=0)
    weights["input_blocks.0.0.weight"] = torch.zeros(320, 8, 3, 3, dtype=torch.float16)
    del weights["out.2.bias"]
    weights["label_emb.0.0.weight"] = torch.zeros(1280, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="missing: out.2.bias; unexpected: label_emb.0.0.weight; "
                                         "wrong shape: input_blocks.0.0.weight"):
        checkpoint.build(tmp_path / "bad.safetensors", weights)
    assert not list(tmp_path.iterdir())


def test_missing_weights_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m world train"):
        checkpoint.ensure(tmp_path, tmp_path / "absent.safetensors")
