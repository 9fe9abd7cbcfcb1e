"""Diffusion targets and losses, the face-wise attention loss, the mask loss and the metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sefi_core.losses import (
    attention_map_distance,
    attention_mass_inside,
    diffusion_loss,
    diffusion_target,
    eps_from_denoised,
    mask_attention_loss,
    reference_attention_loss,
    vp_coefficients,
)


def _latents(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64)


def test_eps_and_x0_targets() -> None:
    x0, eps = _latents()
    assert diffusion_target("eps", x0, eps) is eps
    assert diffusion_target("epsilon", x0, eps) is eps
    assert diffusion_target("x0", x0, eps) is x0


def test_v_target_matches_hand_derivation_per_sample() -> None:
    x0, eps = _latents()
    ab = torch.tensor([0.9, 0.5, 0.01])
    v = diffusion_target("v", x0, eps, alpha_bar=ab)
    for i, a_bar in enumerate(ab.tolist()):
        expected = math.sqrt(a_bar) * eps[i] - math.sqrt(1 - a_bar) * x0[i]
        torch.testing.assert_close(v[i], expected, rtol=1e-6, atol=1e-6)
    # v-parametrisation identity: x0 = alpha*x_t - sigma*v
    a, s = vp_coefficients(alpha_bar=ab)
    a, s = a.view(-1, 1, 1, 1).double(), s.view(-1, 1, 1, 1).double()
    x_t = a * x0 + s * eps
    torch.testing.assert_close(a * x_t - s * v, x0, rtol=1e-5, atol=1e-5)


def test_comfy_sigma_is_the_same_process() -> None:
    x0, eps = _latents()
    sigma = torch.tensor([0.1, 1.0, 14.6])
    by_sigma = diffusion_target("v_prediction", x0, eps, sigma=sigma)
    by_ab = diffusion_target("v", x0, eps, alpha_bar=1 / (1 + sigma**2))
    torch.testing.assert_close(by_sigma, by_ab, rtol=1e-5, atol=1e-6)
    a, s = vp_coefficients(sigma=sigma)
    torch.testing.assert_close(a**2 + s**2, torch.ones(3))


def test_target_errors() -> None:
    x0, eps = _latents()
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target("flow", x0, eps)
    with pytest.raises(ValueError, match="exactly one"):
        diffusion_target("v", x0, eps)
    with pytest.raises(ValueError, match="exactly one"):
        diffusion_target("v", x0, eps, alpha_bar=0.5, sigma=1.0)


def test_eps_from_denoised_inverts_comfy_eps_models() -> None:
    x0, eps = _latents()
    sigma = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    denoised = x - sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(eps_from_denoised(x, denoised, sigma), eps)


def test_diffusion_loss_unmasked_and_masked() -> None:
    pred, target = _latents()
    torch.testing.assert_close(diffusion_loss(pred, target), F.mse_loss(pred.float(), target.float()))
    full = torch.ones(64, 64)  # image-resolution mask, resized to the 8x8 latent
    torch.testing.assert_close(diffusion_loss(pred, target, full), diffusion_loss(pred, target))
    # Error only in the right half; a mask on the left half sees none of it, on the right half all of it.
    target2 = pred.clone()
    target2[..., 4:] += 2.0
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    assert diffusion_loss(pred, target2, left).item() == pytest.approx(0.0)
    assert diffusion_loss(pred, target2, 1 - left).item() == pytest.approx(4.0)  # normalised by mask area
    assert diffusion_loss(pred, target2).item() == pytest.approx(2.0)
    per_sample = torch.stack([left, 1 - left, full])  # [B, H, W]
    expected = (0.0 * 32 + 4.0 * 32 + 2.0 * 64) / 128
    assert diffusion_loss(pred, target2, per_sample).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="empty"):
        diffusion_loss(pred, target2, torch.zeros(64, 64))


def test_reference_loss_sums_the_grid_of_head_means_and_averages_sites() -> None:
    g = torch.Generator().manual_seed(0)
    a1, r1 = torch.rand(2, 4, 16, 3, generator=g), torch.rand(2, 4, 16, 3, generator=g)
    a2, r2 = torch.rand(2, 4, 64, 3, generator=g), torch.rand(2, 4, 64, 3, generator=g)
    expected = (
        (a1.mean(1) - r1.mean(1)).pow(2).sum(1).mean() + (a2.mean(1) - r2.mean(1)).pow(2).sum(1).mean()
    ) / 2
    torch.testing.assert_close(reference_attention_loss([a1, a2], [r1, r2]), expected)
    torch.testing.assert_close(reference_attention_loss(a1, r1, per_head=True), (a1 - r1).pow(2).sum(2).mean())
    mse = ((a1.mean(1) - r1.mean(1)).pow(2).mean() + (a2.mean(1) - r2.mean(1)).pow(2).mean()) / 2
    torch.testing.assert_close(reference_attention_loss([a1, a2], [r1, r2], reduction="mean"), mse)


def test_reference_loss_averages_heads_before_comparing() -> None:
    ref = torch.full((1, 2, 4, 1), 0.5)
    ident = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1).expand(1, 2, 4, 1)  # heads disagree, mean agrees
    assert reference_attention_loss(ident, ref).item() == pytest.approx(0.0)
    assert reference_attention_loss(ident, ref, per_head=True).item() == pytest.approx(0.09 * 4)  # 4 queries


def test_reference_side_gets_no_gradient() -> None:
    ident = torch.rand(1, 2, 8, 2, requires_grad=True)
    ref = torch.rand(1, 2, 8, 2, requires_grad=True)  # even if the caller forgot to detach
    reference_attention_loss(ident, ref).backward()
    assert ident.grad is not None and ident.grad.abs().sum() > 0
    assert ref.grad is None


def _mask_4x4() -> torch.Tensor:
    m = torch.zeros(4, 4)
    m[1:3, 1:3] = 1  # 4 of 16 cells
    return m


def test_attention_mass_inside_and_balanced_l1_on_synthetic_maps() -> None:
    mask = _mask_4x4()
    inside = mask.flatten() / mask.sum()
    outside = (1 - mask.flatten()) / (1 - mask).sum()
    uniform = torch.full((16,), 1 / 16)
    as_probs = lambda p: p.view(1, 1, 16, 1).expand(2, 3, -1, -1)  # noqa: E731
    assert attention_mass_inside(as_probs(inside), mask) == pytest.approx(1.0)
    assert attention_mass_inside(as_probs(outside), mask) == pytest.approx(0.0)
    assert attention_mass_inside(as_probs(uniform), mask) == pytest.approx(0.25)
    l_in = mask_attention_loss(as_probs(inside), mask).item()
    l_out = mask_attention_loss(as_probs(outside), mask).item()
    l_uni = mask_attention_loss(as_probs(uniform), mask).item()
    assert l_in < l_uni < l_out
    assert l_in == pytest.approx(-0.25, abs=1e-4)  # bg mean 0, fg mean 1/4
    assert l_uni == pytest.approx(0.0, abs=1e-4)
    frac = mask_attention_loss(as_probs(uniform), mask, mode="outside_fraction").item()
    assert frac == pytest.approx(0.75, abs=1e-4)
    with pytest.raises(ValueError, match="mode"):
        mask_attention_loss(as_probs(uniform), mask, mode="dice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not match"):
        mask_attention_loss(as_probs(uniform), torch.ones(3, 3))


def test_mask_loss_gradient_moves_attention_into_the_mask() -> None:
    mask = _mask_4x4()
    logits = torch.zeros(1, 2, 16, 5, requires_grad=True)  # 16 queries x 5 keys, token column 2
    opt = torch.optim.SGD([logits], lr=50.0)
    start = attention_mass_inside(torch.softmax(logits, -1)[..., [2]], mask)
    for _ in range(20):
        opt.zero_grad()
        mask_attention_loss(torch.softmax(logits, -1)[..., [2]], mask).backward()
        opt.step()
    end = attention_mass_inside(torch.softmax(logits, -1)[..., [2]], mask)
    assert start == pytest.approx(0.25)
    assert end > 0.5


def test_attention_map_distance() -> None:
    a = torch.rand(2, 4, 16, 3)
    assert attention_map_distance(a, a) == pytest.approx(0.0)
    assert attention_map_distance(a, 5 * a) == pytest.approx(0.0, abs=1e-6)  # scale-free
    left = torch.zeros(1, 1, 16, 1)
    left[:, :, :8] = 1
    assert attention_map_distance(left, 1 - left) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        attention_map_distance(a, a[..., :2])
