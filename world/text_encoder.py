"""The world checkpoint's text encoder: CLIP-L's shape and key names, weights constructed from a seed, not trained.

Every encoder layer's residual branches end in zeros (attention `out_proj` and MLP `fc2`, weights and biases), so
each layer passes its input through unchanged and the encoder's output at a position is exactly
`final_layer_norm(token_embedding[id] + position_embedding[pos])`. Why: a random CLIP makes different words ~97 %
alike after its layers (../shared/notes/miniature-world.md), while here every word is a nearly orthogonal unit-scale
vector at its own position, which a small U-Net learns to read quickly; the attention sites then see each word, the
trigger and "person" included, as itself. Token embeddings have real CLIP-L's scale (std 0.014, norms ~0.39), so
learning rates and token-norm checks tuned for real checkpoints apply unchanged. Nothing here is committed as
weights: the same seed rebuilds the same encoder bit for bit.
"""
from __future__ import annotations

import torch

SEED = 1234
TOKEN_STD = 0.014      # real CLIP-L's token embeddings: std ≈ 0.014
POSITION_STD = 0.004   # weak: a word reads the same wherever it stands
LAYER_NORM_EPS = 1e-5
_ZERO_SUFFIXES = ("out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias")


def construct(shapes: dict[str, torch.Tensor], seed: int = SEED, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Values for the host's CLIP-L state dict whose keys/shapes are `shapes` (meta tensors are fine): the tiny
    checkpoints' rules (tools/tiny_checkpoints.randomise) with zero residual-branch ends and the two embedding scales."""
    from tools.tiny_checkpoints import randomise

    def special(key: str, meta: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
        if key.endswith(_ZERO_SUFFIXES):
            return torch.zeros(meta.shape)
        if key.endswith("token_embedding.weight"):
            return torch.randn(meta.shape, generator=g) * TOKEN_STD
        if key.endswith("position_embedding.weight"):
            return torch.randn(meta.shape, generator=g) * POSITION_STD
        return None

    return randomise(shapes, torch.Generator().manual_seed(seed), dtype, special)


class WordTable:
    """The encoder's exact output for any token ids, computed from the two embedding tables (no layers to run):
    what pretraining feeds the U-Net, equal to the host's CLIP on the same weights (tests check it)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        token = next(v for k, v in weights.items() if k.endswith("token_embedding.weight"))
        position = next(v for k, v in weights.items() if k.endswith("position_embedding.weight"))
        self.token = token.float()
        self.position = position.float()

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, 77] int64 → context [B, 77, 768] float32."""
        x = self.token[ids] + self.position[: ids.shape[-1]]
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS)
