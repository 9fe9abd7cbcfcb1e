"""Token vectors against their text encoder's own embedding scale (sefi_core.token_scale)."""
from __future__ import annotations

import pytest
import torch

from sefi_core.token_scale import (MAX_SCALE_RATIO, TokenScaleError, check_token_scale, embedding_norm,
                                   token_scale_problem)


@pytest.mark.parametrize("std", [0.014, 0.02, 1.0])  # CLIP-L's scale, a random-init table, a unit-scale one
def test_the_yardstick_is_the_tables_own_scale(std: float) -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(4000, 768, generator=g) * std
    norm = embedding_norm(table)
    assert norm == pytest.approx(std * 768**0.5, rel=0.01)
    word = table[:1][None, None]  # [S=1, 2?, n, C] shapes do not matter: every vector is measured
    assert token_scale_problem({"clip_l": word * 50}, {"clip_l": norm}) is None
    assert token_scale_problem({"clip_l": word * 2 * MAX_SCALE_RATIO}, {"clip_l": norm}) is not None


def test_only_encoders_with_a_known_scale_are_judged_and_each_is_named() -> None:
    tokens = {"clip_l": torch.full((1, 2, 1, 768), 1e20), "clip_g": torch.full((1, 2, 1, 1280), 1e3)}
    problem = token_scale_problem(tokens, {"clip_g": 0.5})
    assert problem is not None and problem.startswith("clip_g vectors are up to 3.58e+04 long, 7.16e+04 times")
    assert "clip_l" not in problem
    with pytest.raises(TokenScaleError, match="checkpoint 'me': its tokens have blown up: clip_g.*lower learning_rate"):
        check_token_scale(tokens, {"clip_g": 0.5}, "checkpoint 'me'")
    assert token_scale_problem(tokens, {}) is None


def test_nan_is_never_within_scale() -> None:
    assert token_scale_problem({"clip_l": torch.full((1, 1, 768), float("nan"))}, {"clip_l": 0.4}) is not None


@pytest.mark.parametrize("table", [torch.zeros(10, 8), torch.zeros(0, 8), torch.zeros(8)])
def test_a_degenerate_table_is_refused(table: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        embedding_norm(table)
