"""The world U-Net: its shape, its initialisation and SD1.5's noise schedule it is trained with.

The shape is the smallest the hosts detect as SD1.5 (../shared/notes/tiny-checkpoint.md, `sd15_bare`): width 320,
context 768, one level with one ResBlock and one transformer (the single cross-attention site, input block 1, where
the face-wise loss reads its maps), no middle block, two ResBlock-only output blocks — 13.6 M parameters. The
25.8 M-parameter shape with middle and output attention cost 2.5× the CPU time per sample here, which a 2-core,
2-hour pretraining budget cannot pay. The third world's U-Net (THIRD_UNET) adds two transformer blocks to it.
"""
from __future__ import annotations

import torch

# Written out here, not derived from the tiny test checkpoint's shape: the committed weights (world/weights/) hold
# this shape, and a change to the tests' checkpoint must not change it.
UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
            out_channels=4, model_channels=320, use_temporal_resblock=False, use_temporal_attention=False,
            adm_in_channels=None, context_dim=768, use_linear_in_transformer=False, channel_mult=[1],
            num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=-2, transformer_depth_output=[0, 0])
# The third world's U-Net reads the caption three times instead of once: a second transformer block in input block 1
# and one after output block 0's ResBlock. With one read, the round-2 samples blended the views and ignored the view
# words (docs/world.md, "Gates of round 2"): a cell's role depends on the view and on where the head stands, which
# one attention read over a noisy start may not settle (round 3 helped, not enough: docs/world.md). 1.7× UNET's CPU
# time per step (1.87 against 1.11 s, batch 32, 2 threads, docs/world.md "Round 3"); still detected as SD1.5 by both
# hosts, every site at the full latent.
# The host pops transformer_depth_output from its end: [0, 1] puts the block in output block 0.
THIRD_UNET = dict(UNET, transformer_depth=[2], transformer_depth_output=[0, 1])
UNETS = {"second": UNET, "third": THIRD_UNET}
TIMESTEPS = 1000


def sd_alphas_cumprod() -> torch.Tensor:
    """SD1.5's scaled-linear schedule (β 0.00085 → 0.012), as the host's ModelSamplingDiscrete builds it."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def unet_config(world: str = "second") -> dict:
    import comfy.model_detection
    return dict(comfy.model_detection.model_config_from_unet_config(dict(UNETS[world])).unet_config)


def new_unet(seed: int, world: str = "second") -> torch.nn.Module:
    """The host's UNetModel at the world's shape, initialised as SD initialises it: Xavier weights, zero biases,
    unit norms, and zero at the end of every residual branch and of the output (each block starts as identity)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(seed)
    unet = UNetModel(**unet_config(world), dtype=torch.float32, device="cpu",
                     operations=comfy.ops.disable_weight_init)
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


# The ends of a transformer block's three residual branches: zero makes the block the identity.
_BLOCK_BRANCH_ENDS = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")


def grow(unet: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load a round of a smaller U-Net (`weights`) into `unet`, a shape that only adds transformer blocks to it, so
    that the grown net computes exactly what the round computed: every added block starts as the identity (its
    residual branches end in zero; an added SpatialTransformer's proj_out is zero already, and its inner blocks keep
    their random ends so that gradients reach them). Returns the added keys (none: a plain load of a round of this
    shape). Refuses weights that the larger shape does not contain."""
    own = unet.state_dict()
    foreign = sorted(k for k in weights if k not in own or own[k].shape != weights[k].shape)
    if foreign:
        raise ValueError(f"these weights are not a smaller shape of this U-Net: {', '.join(foreign[:5])}"
                         f"{' …' if len(foreign) > 5 else ''} do not fit")
    added = sorted(k for k in own if k not in weights)
    added_blocks = {k.rsplit(".", 1)[0] for k in added}
    with torch.no_grad():
        for name, mod in unet.named_modules():
            if name in added_blocks and name.endswith(_BLOCK_BRANCH_ENDS) and \
                    name.split(".transformer_blocks.")[0] + ".proj_out.weight" in weights:
                for p in mod.parameters():
                    p.zero_()
    missing, unexpected = unet.load_state_dict(weights, strict=False)
    assert not unexpected and sorted(missing) == added
    return added
