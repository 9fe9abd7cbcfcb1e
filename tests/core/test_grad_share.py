"""Gradient shares of the loss terms, and their place in the training loop and on the loss curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sefi_core.grad_share import backward_with_shares, gradient_norms
from sefi_core.losses import reference_attention_loss
from sefi_core.plot import render_loss_curve, term_shares
from sefi_core.training import TrainSettings, run_training


def test_shares_are_the_terms_gradient_norms_over_their_sum() -> None:
    w = torch.randn(5, requires_grad=True, generator=torch.Generator().manual_seed(0))
    terms = {"diffusion": (w ** 2).sum(), "attention": 0.5 * w.sum()}
    norms = gradient_norms(terms, [w])
    assert norms["diffusion"] == pytest.approx(float((2 * w).detach().norm()))
    assert norms["attention"] == pytest.approx(0.5 * math.sqrt(5))
    assert w.grad is None  # measuring keeps the graph and leaves .grad alone
    shares = backward_with_shares(terms, [w])
    total = norms["diffusion"] + norms["attention"]
    assert shares == pytest.approx({"grad_share_diffusion": norms["diffusion"] / total,
                                    "grad_share_attention": norms["attention"] / total})


def test_backward_with_shares_leaves_the_gradient_of_the_sum() -> None:
    """The loop's logging steps: the per-term backwards also give the total gradient, so no third backward runs
    (the graph is freed after the last term: a further backward must fail)."""
    w = torch.randn(5, requires_grad=True, generator=torch.Generator().manual_seed(0))
    frozen = torch.randn(5, generator=torch.Generator().manual_seed(1))  # a term without a gradient
    terms = {"diffusion": (3 * w).sin().sum(), "attention": 0.5 * (w * w.sin()).sum(), "constant": frozen.sum()}
    shares = backward_with_shares(terms, [w])
    expected = torch.autograd.grad((3 * w).sin().sum() + 0.5 * (w * w.sin()).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected)
    assert shares["grad_share_constant"] == 0.0
    assert shares["grad_share_diffusion"] + shares["grad_share_attention"] == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        terms["attention"].backward()  # the last term with a gradient freed what it walked


class Linear:
    """A step function with two weighted terms on one parameter vector, so shares are known in closed form."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, tokens, rng, step):
        x = tokens["clip_l"].reshape(-1)
        diff = x.sum()  # gradient 1 per element
        att = self.weight * (2 * x).sum()  # gradient 2λ per element
        parts = {"diffusion": float(diff.detach()), "attention": float(att.detach())}
        return diff + att, parts, {"diffusion": diff, "attention": att}


class Tokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1, 2, 1, 4))

    def forward(self):
        return {"clip_l": self.p}


@pytest.mark.parametrize("weight", [0.25, 1.0, 4.0])
def test_training_logs_shares_at_the_first_every_nth_and_last_step(weight: float) -> None:
    settings = TrainSettings(steps=7, grad_share_every=3, lr=1e-3, checkpoint_every=0, precision="fp32")
    seen = {}
    run_training(Tokens(), Linear(weight), settings, on_progress=lambda s, t, loss, parts: seen.update({s: parts}))
    logged = sorted(s for s, p in seen.items() if "grad_share_attention" in p)
    assert logged == [1, 3, 6, 7]
    want = 2 * weight / (1 + 2 * weight)
    for s in logged:
        assert seen[s]["grad_share_attention"] == pytest.approx(want)
        assert seen[s]["grad_share_diffusion"] == pytest.approx(1 - want)


def test_sum_spatial_reduction_is_the_mse_times_the_grid_size() -> None:
    g = torch.Generator().manual_seed(3)
    a, r = torch.rand(2, 4, 64, 5, generator=g), torch.rand(2, 4, 64, 5, generator=g)
    mean = reference_attention_loss(a, r, reduction="mean")
    summed = reference_attention_loss(a, r)
    assert float(summed) == pytest.approx(64 * float(mean), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        reference_attention_loss(a, r, reduction="max")
    with pytest.raises(ValueError, match="attention_reduction"):
        TrainSettings(attention_reduction="max")


def test_loss_curve_draws_the_attention_share() -> None:
    parts = [{"grad_share_attention": 0.2} if i in (0, 24, 49) else {} for i in range(50)]
    shares = term_shares(parts)
    assert shares == [(1, 0.2), (25, 0.2), (50, 0.2)]
    history = list(np.linspace(1.0, 0.5, 50))
    plain = render_loss_curve(history)
    drawn = render_loss_curve(history, shares=shares)
    green = (drawn[..., 1].astype(int) - drawn[..., 0] > 80) & (drawn[..., 1].astype(int) - drawn[..., 2] > 40)
    assert green.sum() > 50 and not np.array_equal(plain, drawn)
