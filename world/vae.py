"""The world checkpoint's VAE: the host's SD AutoencoderKL shape, weights constructed (not trained) so that world
pictures round-trip exactly.

A world picture is 8 × 8 flat cells of 8 × 8 pixels; its latent is 4 × 8 × 8 with channels 0..2 = (2·colour − 1) /
LATENT_SCALE per cell and channel 3 = 0, so after the host's SD1 latent scale the U-Net sees each cell's colour in
[−1, 1]. Decoding any latent paints each cell the colour 0.5 + LATENT_SCALE · z / 2 (nearest-cell upsampling), linear
in the latent. How (../shared/notes/miniature-world.md, "A VAE built by hand"):
- every ResnetBlock is the identity (its residual branch ends in a zero conv2; `nin_shortcut` keeps the first
  channels where the width changes), every attention block too (zero `proj_out`);
- the encoder's stride-2 downsampling averages 2 × 2 pixels, the decoder's upsampling is nearest ×2 plus a centre tap;
- the only non-linear step that touches the signal, GroupNorm → SiLU before each side's output conv, is made linear:
  colour j travels as four channels (+s·x, −s·x, +K, −K) inside one GroupNorm group, so the group's mean is exactly 0
  and its std is fixed by the constants up to a relative s²x²/(2K²); and SiLU(z) − SiLU(−z) = z exactly, so the
  output conv's (+1, −1) pair returns x.
Precision: s = 2⁻⁸ against K = 1 keeps that std error below 1e-5 (round trip ~1e-5 in fp32), keeps activations
small (the latent's ±5.5 is the largest but for the log-variance's −30) and every weight a normal fp16 number, so the
same weights hold when a GPU host runs the VAE in fp16 (~5e-4) or bf16 (~2e-3). Only GroupNorm looks beyond a pixel,
and its statistics are set by the constants, so the host's tiled fallback decodes the same picture.
"""
from __future__ import annotations

import torch

LATENT_SCALE = 0.18215   # the host's SD1 latent format multiplies VAE latents by this before the U-Net
COLOURS = 3
CARRIER = 4              # channels per colour in the trunk: (+s·x, −s·x, +K, −K)
SIGNAL = 2.0 ** -8       # s: the colour's scale in the trunk, small next to K so GroupNorm's std stays put
CONSTANT = 1.0           # K
LOG_VARIANCE = -30.0     # the host clamps log-variance at −30: a std of e⁻¹⁵, i.e. deterministic latents
NORM_GROUPS = 32         # the host's Normalize() is GroupNorm(32, C, eps=1e-6)
NORM_EPS = 1e-6
_TRUNK = COLOURS * CARRIER


def construct(shapes: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Values for the host's AutoencoderKL state dict (keys `encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*`) whose shapes are `shapes` (meta tensors are fine)."""
    _check_shapes(shapes)
    out = {key: torch.zeros(meta.shape) for key, meta in shapes.items()}
    for key, value in out.items():
        if key.endswith((".norm1.weight", ".norm2.weight", ".norm.weight")):
            value.fill_(1.0)   # inside residual branches that add 0: any finite value does
        elif key.endswith(("nin_shortcut.weight", "quant_conv.weight")):
            _diagonal(value)[..., 0, 0] = 1.0          # 1 × 1: keep the first channels
        elif key.endswith("downsample.conv.weight"):
            _diagonal(value)[..., :2, :2] = 0.25       # the host pads right/bottom, then strides 2: 2 × 2 average
        elif key.endswith("upsample.conv.weight"):
            _diagonal(value)[..., 1, 1] = 1.0          # after the host's nearest ×2
    _into_trunk(out["encoder.conv_in.weight"], out["encoder.conv_in.bias"], gain=SIGNAL)
    _into_trunk(out["decoder.conv_in.weight"], out["decoder.conv_in.bias"], gain=SIGNAL * LATENT_SCALE)
    for side in ("encoder", "decoder"):
        out[f"{side}.norm_out.weight"].copy_(_linear_norm_weight(shapes[f"{side}.norm_out.weight"].shape[0]))
    _out_of_trunk(out["encoder.conv_out.weight"], gain=1.0 / LATENT_SCALE)
    out["encoder.conv_out.bias"][out["encoder.conv_out.bias"].shape[0] // 2:] = LOG_VARIANCE
    _out_of_trunk(out["decoder.conv_out.weight"], gain=1.0)
    return {key: value.to(dtype) for key, value in out.items()}


def _check_shapes(shapes: dict[str, torch.Tensor]) -> None:
    expected = {"encoder.conv_in.weight": (None, 3), "encoder.conv_out.weight": (8, None),
                "decoder.conv_in.weight": (None, 4), "decoder.conv_out.weight": (3, None)}
    for key, (out_ch, in_ch) in expected.items():
        shape = tuple(shapes[key].shape) if key in shapes else None
        if shape is None or (out_ch or shape[0]) != shape[0] or (in_ch or shape[1]) != shape[1]:
            raise ValueError(f"the host's VAE is not the SD KL-VAE this construction is for: {key} has shape {shape}; "
                             "build its shapes from tools.tiny_checkpoints.VAE_CONFIG (RGB, z 4, double_z)")


def _diagonal(weight: torch.Tensor) -> torch.Tensor:
    """The [n, kh, kw] view of weight[c, c, :, :] for c < n = min(out, in) channels: a per-channel kernel."""
    n = min(weight.shape[0], weight.shape[1])
    return weight[:n, :n].diagonal(dim1=0, dim2=1).permute(2, 0, 1)


def _into_trunk(weight: torch.Tensor, bias: torch.Tensor, gain: float) -> None:
    """A 3 × 3 conv from colours (or latent channels) to the trunk's carriers, centre tap only."""
    for j in range(COLOURS):
        weight[CARRIER * j, j, 1, 1] = gain
        weight[CARRIER * j + 1, j, 1, 1] = -gain
        bias[CARRIER * j + 2] = CONSTANT
        bias[CARRIER * j + 3] = -CONSTANT


def _out_of_trunk(weight: torch.Tensor, gain: float) -> None:
    """A 3 × 3 conv reading colour j as the difference of its SiLU'd pair, centre tap only."""
    for j in range(COLOURS):
        weight[j, CARRIER * j, 1, 1] = gain
        weight[j, CARRIER * j + 1, 1, 1] = -gain


def _linear_norm_weight(channels: int) -> torch.Tensor:
    """GroupNorm weights that turn each carrier's ±s·x back into ±x: the std of its group is set by the constants
    alone (their mean square over the group's channels), the signal's share of it is the only error."""
    group = channels // NORM_GROUPS
    if group % CARRIER or channels < _TRUNK:
        raise ValueError(f"a GroupNorm of {channels} channels in {NORM_GROUPS} groups cannot hold the colour carriers")
    constants = torch.zeros(channels)
    for j in range(COLOURS):
        constants[CARRIER * j + 2:CARRIER * j + 4] = CONSTANT
    std = (constants.square().view(NORM_GROUPS, group).mean(dim=1) + NORM_EPS).sqrt()
    weight = torch.zeros(channels)
    for j in range(COLOURS):
        weight[CARRIER * j:CARRIER * j + 2] = std[CARRIER * j // group] / SIGNAL
    return weight
