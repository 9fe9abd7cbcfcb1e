"""The third world's checkpoint: the second world's recipe (constructed text encoder and VAE) with the third world's
U-Net (world.model.THIRD_UNET, three attention reads instead of one; its weights do not depend on the picture size),
under its own file name so both can sit in one checkpoints folder."""
from __future__ import annotations

from pathlib import Path

from .. import checkpoint
from ..model import THIRD_UNET

NAME = "world3-sd15.safetensors"
UNET_WEIGHTS = Path(__file__).resolve().parent / "weights" / "unet.safetensors"


def ensure(folder: Path, unet_weights: Path | None = None) -> Path:
    """`folder`/world3-sd15.safetensors, rebuilt when its U-Net weights or the construction code changed. Until a
    round of the third world's pretraining is committed, pass `unet_weights` (a run's weights/unet.safetensors)."""
    weights = Path(unet_weights) if unet_weights is not None else UNET_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"the third world's U-Net weights are not at {weights}: pretrain them with "
                                "`python -m world train --world third` (docs/world.md, 'The third world') and pass "
                                "the run's weights/unet.safetensors, or commit a round to world/third/weights/")
    return checkpoint.ensure(folder, weights, NAME, THIRD_UNET)
