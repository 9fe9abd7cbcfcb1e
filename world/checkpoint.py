"""The world checkpoint: one single-file SD1.5 checkpoint that CheckpointLoaderSimple loads on both hosts.

Only the trained U-Net is committed (world/weights/unet.safetensors, the host's UNetModel key names, fp16); the text
encoder (world/text_encoder.py) and the VAE (world/vae.py) are constructed, and the file is assembled on the spot with
the host's own classes and key converters, the way tools/tiny_checkpoints.py writes the tiny ones. The U-Net has the
smallest shape the hosts detect as SD1.5 (world/model.py).

Needs the host's `comfy` importable (host_boot.embedded_host.import_host_modules, or a booted host).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from tools import tiny_checkpoints

from . import model, text_encoder, vae
from .model import UNET

NAME = "world-sd15.safetensors"
#: Where the demo, the claims bench and the tests assemble it: one folder, so that one build serves them all.
CACHE_FOLDER = Path(__file__).resolve().parents[1] / ".cache" / "world"
UNET_WEIGHTS = Path(__file__).resolve().parent / "weights" / "unet.safetensors"
RECIPE_KEY = "sefi_world_recipe"
# The file is a product of the U-Net weights and of the code that constructs the rest: a change in either rebuilds it.
_RECIPE_SOURCES = (Path(text_encoder.__file__), Path(vae.__file__), Path(model.__file__), Path(__file__),
                   Path(tiny_checkpoints.__file__))


def random_unet_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random U-Net state dict of the world U-Net's shape (fp16): a stand-in until trained weights exist."""
    config = tiny_checkpoints.model_config(UNET)
    return tiny_checkpoints.randomise(tiny_checkpoints.unet_shapes(config), torch.Generator().manual_seed(seed))


def build(path: Path, unet_weights: Mapping[str, torch.Tensor] | Path | None = None, shape: dict = UNET) -> Path:
    """Write the world checkpoint to `path` (atomically). `unet_weights`: a U-Net state dict in the host's UNetModel
    key names, or a .safetensors file of one; None reads the committed world/weights/unet.safetensors. A file's
    recipe (see `recipe`) is stored in the checkpoint's metadata for `ensure`."""
    import comfy.sd1_clip
    weights_file = UNET_WEIGHTS if unet_weights is None else unet_weights
    metadata = None
    if isinstance(weights_file, (str, Path)):
        metadata = {RECIPE_KEY: recipe(Path(weights_file))}
        unet_weights = _read_unet_weights(Path(weights_file))
    config = tiny_checkpoints.model_config(shape)
    _check_unet_fits(unet_weights, tiny_checkpoints.unet_shapes(config))
    text = text_encoder.construct(tiny_checkpoints.text_shapes(comfy.sd1_clip.SD1ClipModel))
    # fp32: the VAE's gains are not fp16 numbers, and rounding them would cost the round trip ~1e-4 of exactness.
    autoencoder = vae.construct(tiny_checkpoints.vae_shapes(), dtype=torch.float32)
    return tiny_checkpoints.assemble(Path(path), config, dict(unet_weights), text, autoencoder, metadata)


def ensure(folder: Path, unet_weights: Path = UNET_WEIGHTS, name: str = NAME, shape: dict = UNET) -> Path:
    """`folder`/`name` (world-sd15.safetensors), built when it is missing or was built from other U-Net weights or
    code. The third world's checkpoint (world/third/checkpoint.py) is the same recipe with its own weights and name."""
    path = Path(folder) / name
    if stored_recipe(path) != recipe(unet_weights):
        build(path, unet_weights, shape)
    return path


def recipe(unet_weights: Path) -> str:
    """A hash of what the checkpoint is made of: the U-Net weights file and the construction code."""
    digest = hashlib.sha256()
    for source in (_existing_weights(unet_weights), *_RECIPE_SOURCES):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def stored_recipe(path: Path) -> str | None:
    """The recipe a checkpoint was built from, or None (no file, or built from an in-memory state dict)."""
    if not Path(path).exists():
        return None
    import safetensors
    with safetensors.safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(RECIPE_KEY)


def _existing_weights(path: Path) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"the world U-Net weights are not at {path}: train them with `python -m world train` "
                                "(docs/world.md), or pass another weights file")
    return Path(path)


def _read_unet_weights(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch
    return safetensors.torch.load_file(str(_existing_weights(path)))


def _check_unet_fits(weights: Mapping[str, torch.Tensor], shapes: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(shapes) - set(weights))
    unexpected = sorted(set(weights) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(weights) if tuple(weights[k].shape) != tuple(shapes[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", wrong)) if keys)
        raise ValueError(f"the U-Net weights do not fit the world U-Net (world/model.py's UNETS, the host's "
                         f"UNetModel key names without `model.diffusion_model.`): {details}")
