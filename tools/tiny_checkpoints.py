"""Write tiny random-weight SD1.5 / SDXL checkpoints that the host's own loader detects.

The UNet is shrunk (width 320 is the smallest the host's detection accepts; depth and levels are cut), the text
encoders and the VAE keep their real shapes because the host builds them from fixed configs. Every weight is
written explicitly: the host never initialises keys missing from a file (its layers start as torch.empty).
Files are built with the host's own classes and key converters, so they are what a real single-file checkpoint
looks like to CheckpointLoaderSimple. See ../shared/notes/tiny-checkpoint.md for the measurements behind this.

Usage: python -m tools.tiny_checkpoints OUT_DIR [--family sd1|sdxl|controlnet|all]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from host_boot import embedded_host

SD15_NAME = "tiny-sd15-random.safetensors"
SDXL_NAME = "tiny-sdxl-random.safetensors"
CONTROLNET_NAME = "tiny-controlnet-sd15-random.safetensors"

# SD1.5 detection needs width 320, context 768, conv proj_in. One level, with attention in the input block
# (site ("input", 1)), the middle block and both output blocks: 4 cross-attention sites at the real ids.
SD15_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
                 out_channels=4, model_channels=320, use_temporal_resblock=False, use_temporal_attention=False,
                 adm_in_channels=None, context_dim=768, use_linear_in_transformer=False, channel_mult=[1],
                 num_res_blocks=[1], transformer_depth=[1], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1])
# SDXL detection keys on the exact input depth list [0,0,2,2,10,10]; width stays 320 at every level.
SDXL_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
                 out_channels=4, model_channels=320, use_temporal_resblock=False, use_temporal_attention=False,
                 adm_in_channels=2816, num_classes="sequential", context_dim=2048, use_linear_in_transformer=True,
                 channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1])
VAE_CONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                  num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def _meta_state_dict(make) -> dict[str, torch.Tensor]:
    # no_grad: the PyPI host's CLIP constructor copies into a Parameter in place.
    with torch.device("meta"), torch.no_grad():
        return make().state_dict()


def randomise(shapes: dict[str, torch.Tensor], generator: torch.Generator, dtype=torch.float16,
              special=None) -> dict[str, torch.Tensor]:
    """Norm weights 1, biases 0, the rest N(0, 0.02): finite, deterministic, roughly unit-scale activations.
    `special(key, meta, generator)` may return a key's value first (None: the rule above); keys are visited in sorted
    order, so the generator's draws are the same for the same shapes and rules."""
    out = {}
    for key in sorted(shapes):
        meta = shapes[key]
        if not meta.is_floating_point():
            out[key] = torch.arange(meta.shape[-1], dtype=meta.dtype).expand(meta.shape).clone()  # position_ids
            continue
        value = None if special is None else special(key, meta, generator)
        if value is not None:
            pass
        elif key.endswith("logit_scale"):
            value = torch.full(meta.shape, 4.6055)
        elif key.endswith("bias") or key.endswith("vae_shift"):
            value = torch.zeros(meta.shape)
        elif meta.dim() == 1 and key.endswith("weight"):
            value = torch.ones(meta.shape)
        else:
            value = torch.randn(meta.shape, generator=generator) * 0.02
        out[key] = value.to(dtype)
    return out


def unet_shapes(config) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return _meta_state_dict(lambda: UNetModel(**config.unet_config, dtype=torch.float32, device="meta",
                                              operations=comfy.ops.disable_weight_init))


def vae_shapes() -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencoderKL
    return _meta_state_dict(lambda: AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4))


def model_config(unet_config: dict):
    import comfy.model_detection
    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if config is None:
        raise RuntimeError(f"the host does not detect this UNet configuration: {unet_config}")
    return config


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    import safetensors.torch

    from sefi_core.atomic import atomic_write_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    # not save_file: it creates the file owner-only (0600); atomic_write_bytes gives it the umask's permissions
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def text_shapes(text_model) -> dict[str, torch.Tensor]:
    return _meta_state_dict(lambda: text_model(device="meta", dtype=torch.float32))


def assemble(path: Path, config, unet: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
             vae: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """One single-file checkpoint from module state dicts, converted by the detected config's own savers."""
    tensors = {**config.process_unet_state_dict_for_saving(unet),
               **config.process_clip_state_dict_for_saving(text),
               **config.process_vae_state_dict_for_saving(vae)}
    return save(tensors, path, metadata)


def _build_checkpoint(path: Path, unet_config: dict, text_model, seed: int) -> Path:
    """UNet + text encoder(s) + KL-VAE, each randomised."""
    g = torch.Generator().manual_seed(seed)
    config = model_config(unet_config)
    return assemble(path, config, randomise(unet_shapes(config), g), randomise(text_shapes(text_model), g),
                    randomise(vae_shapes(), g))


def build_sd15(path: Path, seed: int = 0) -> Path:
    import comfy.sd1_clip
    return _build_checkpoint(path, SD15_UNET, comfy.sd1_clip.SD1ClipModel, seed)


def build_sdxl(path: Path, seed: int = 0) -> Path:
    import comfy.sdxl_clip
    return _build_checkpoint(path, SDXL_UNET, comfy.sdxl_clip.SDXLClipModel, seed)


def build_controlnet_sd15(path: Path, seed: int = 0) -> Path:
    """A ControlNet matching the tiny SD1.5 UNet, in the original ldm key layout (`control_model.*`)."""
    import comfy.ops
    from comfy.cldm.cldm import ControlNet
    g = torch.Generator().manual_seed(seed)
    unet = {k: v for k, v in model_config(SD15_UNET).unet_config.items()
            if k not in ("transformer_depth_output", "out_channels", "use_temporal_resblock",
                         "use_temporal_attention", "use_checkpoint")}
    shapes = _meta_state_dict(lambda: ControlNet(hint_channels=3, **unet, dtype=torch.float32, device="meta",
                                                 operations=comfy.ops.disable_weight_init))
    tensors = {f"control_model.{k}": v for k, v in randomise(shapes, g).items()}
    return save(tensors, path)


BUILDERS = {"sd1": (SD15_NAME, build_sd15), "sdxl": (SDXL_NAME, build_sdxl),
            "controlnet": (CONTROLNET_NAME, build_controlnet_sd15)}


def ensure(family: str, folder: Path) -> Path:
    """Return the tiny checkpoint of `family` in `folder`, building it when it is not there yet."""
    name, build = BUILDERS[family]
    path = Path(folder) / name
    if not path.exists():
        build(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write into (e.g. models/checkpoints)")
    parser.add_argument("--family", choices=[*BUILDERS, "all"], default="sd1")
    parser.add_argument("--force", action="store_true", help="rebuild files that already exist")
    args = parser.parse_args(argv)
    embedded_host.import_host_modules()
    for family in (list(BUILDERS) if args.family == "all" else [args.family]):
        name, build = BUILDERS[family]
        path = args.out_dir / name
        if args.force or not path.exists():
            build(path)
        print(f"{family}: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
