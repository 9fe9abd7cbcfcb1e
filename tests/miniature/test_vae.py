"""The constructed VAE round-trips world pictures exactly through the host's own AutoencoderKL (world/vae.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from world import captions, render, vae

TWO_LEVELS = 2 / 255          # the bound on the mean round-trip error
EXACT = 1e-4                  # what the construction achieves in fp32 (measured ~1e-5): far tighter than the bound


def world_pictures(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` rendered world pictures as a ComfyUI IMAGE [B, 64, 64, 3] and their cells [B, 8, 8, 3]."""
    rng = np.random.default_rng(seed)
    facts = [captions.random_facts(rng) for _ in range(count)]
    cells = torch.tensor(np.stack([render.render_cells(f) for f in facts]), dtype=torch.float32)
    images = torch.tensor(np.stack([render.render(f) for f in facts]))
    return images, cells


def latent_of(cells: torch.Tensor) -> torch.Tensor:
    """The latent the construction promises: channels 0..2 = (2·colour − 1) / 0.18215 per cell, channel 3 = 0."""
    colour = (2 * cells - 1) / vae.LATENT_SCALE
    return torch.cat([colour, torch.zeros(cells.shape[:3] + (1,))], dim=-1).permute(0, 3, 1, 2)


def colour_error(latent: torch.Tensor, cells: torch.Tensor) -> float:
    """The latent's largest error, in colour units (a colour is 0.5 + latent · 0.18215 / 2)."""
    return (latent - latent_of(cells)).abs().max().item() * vae.LATENT_SCALE / 2


def upsampled(cells: torch.Tensor) -> torch.Tensor:
    """Cells [B, h, w, 3] → the picture [B, 8h, 8w, 3] of flat 8 × 8-pixel squares."""
    return cells.repeat_interleave(render.CELL, dim=1).repeat_interleave(render.CELL, dim=2)


def test_world_pictures_encode_to_their_cell_colours_and_decode_back(host, world_models):
    _, _, autoencoder = world_models
    images, cells = world_pictures(3, seed=0)
    assert torch.equal(images, upsampled(cells)), "the renderer's pictures are no longer flat 8 × 8 cells"
    latent = host.run("VAEEncode", vae=autoencoder, pixels=images)[0]["samples"]
    assert latent.shape == (3, 4, 8, 8)
    assert colour_error(latent, cells) < EXACT
    decoded = host.run("VAEDecode", vae=autoencoder, samples={"samples": latent})[0]
    assert decoded.shape == images.shape
    assert (decoded - images).abs().mean().item() <= TWO_LEVELS
    assert (decoded - images).abs().max().item() < EXACT


def test_any_latent_decodes_linearly_to_nearest_cell_colours(host, world_models):
    _, _, autoencoder = world_models
    colours = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    latent = latent_of(colours)
    latent[:, 3] = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2))  # the free channel is ignored
    decoded = host.run("VAEDecode", vae=autoencoder, samples={"samples": latent})[0]
    assert (decoded - upsampled(colours)).abs().max().item() < EXACT


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_round_trip_holds_when_the_host_runs_the_vae_in_half_precision(host, world_models, dtype):
    """A GPU host may run the VAE in fp16 or bf16: the same weights, the host's VAE class at that dtype. One picture
    of two cells, with every channel's extremes, keeps this fast on a CPU (half-precision convolutions are slow
    there)."""
    import comfy.sd
    _, _, loaded = world_models
    half = comfy.sd.VAE(sd=loaded.first_stage_model.state_dict(), dtype=dtype)
    cells = torch.tensor([[[[0.0, 1.0, 0.3], [1.0, 0.0, 0.7]]]])
    images = upsampled(cells)
    with torch.inference_mode():
        latent = half.encode(images)
        decoded = half.decode(latent)
    assert torch.isfinite(latent).all()
    assert colour_error(latent, cells) <= TWO_LEVELS
    assert (decoded - images).abs().mean().item() <= TWO_LEVELS


def test_a_vae_of_another_shape_is_refused_with_what_to_build():
    shapes = {"encoder.conv_in.weight": torch.empty(128, 3, 3, 3, device="meta"),
              "encoder.conv_out.weight": torch.empty(32, 512, 3, 3, device="meta"),   # a z-16 VAE
              "decoder.conv_in.weight": torch.empty(512, 16, 3, 3, device="meta"),
              "decoder.conv_out.weight": torch.empty(3, 128, 3, 3, device="meta")}
    with pytest.raises(ValueError, match="VAE_CONFIG"):
        vae.construct(shapes)
