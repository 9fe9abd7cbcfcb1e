"""The world U-Net: its shape, its initialisation and SD1.5's noise schedule it is trained with.

The shape is the smallest the hosts detect as SD1.5 (../shared/notes/tiny-checkpoint.md, `sd15_bare`): width 320,
context 768, one level with one ResBlock and one transformer (the single cross-attention site, input block 1, where
the face-wise loss reads its maps), no middle block, two ResBlock-only output blocks — 13.6 M parameters. The
25.8 M-parameter shape with middle and output attention cost 2.5× the CPU time per sample here, which a 2-core,
2-hour pretraining budget cannot pay.
"""
from __future__ import annotations

import torch

# Written out here, not derived from the tiny test checkpoint's shape: the committed weights (world/weights/) hold
# this shape, and a change to the tests' checkpoint must not change it.
UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
            out_channels=4, model_channels=320, use_temporal_resblock=False, use_temporal_attention=False,
            adm_in_channels=None, context_dim=768, use_linear_in_transformer=False, channel_mult=[1],
            num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=-2, transformer_depth_output=[0, 0])
TIMESTEPS = 1000


def sd_alphas_cumprod() -> torch.Tensor:
    """SD1.5's scaled-linear schedule (β 0.00085 → 0.012), as the host's ModelSamplingDiscrete builds it."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def unet_config() -> dict:
    import comfy.model_detection
    return dict(comfy.model_detection.model_config_from_unet_config(dict(UNET)).unet_config)


def new_unet(seed: int) -> torch.nn.Module:
    """The host's UNetModel at the world's shape, initialised as SD initialises it: Xavier weights, zero biases,
    unit norms, and zero at the end of every residual branch and of the output (each block starts as identity)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(seed)
    unet = UNetModel(**unet_config(), dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for mod in unet.modules():
            norm = isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in mod.named_parameters(recurse=False):
                if norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.dim() == 1:
                    p.zero_()
                else:
                    torch.nn.init.xavier_uniform_(p.view(p.shape[0], -1))
        for name, mod in unet.named_modules():
            if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
                for p in mod.parameters():
                    p.zero_()
    return unet
