"""Loss terms of SeFi-IDE training and the attention metrics the tests and logs use.

* Diffusion reconstruction: :func:`diffusion_target` + :func:`diffusion_loss`.
* Face-wise attention loss (the method's regulariser, method.md §2.2):
  :func:`reference_attention_loss` — the identity token's cross-attention maps are pulled
  towards the maps the frozen model draws for the word "person" in the reference prompt,
  under the same queries.
* Mask alternative (not the method; FastComposer-style, for users who have a face mask):
  :func:`mask_attention_loss`.
* Metrics: :func:`attention_mass_inside`, :func:`attention_map_distance`.

Attention tensors follow :mod:`sefi_core.attention`: per site ``[b, heads, nq, T]`` with
``T`` the compared token columns; a loss over several sites takes a sequence of them (sites
have different ``nq``).

Noise-schedule convention (variance preserving, DDPM): ``x_t = alpha_t*x0 + sigma_t*eps`` with
``alpha_t = sqrt(alpha_bar_t)``, ``sigma_t = sqrt(1 - alpha_bar_t)``. ComfyUI/k-diffusion's
``sigma`` (``x = x0 + sigma*eps``) is the same process rescaled: ``alpha_bar = 1/(1 + sigma^2)``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from .attention import resize_mask

__all__ = [
    "vp_coefficients",
    "diffusion_target",
    "eps_from_denoised",
    "diffusion_loss",
    "ATTENTION_REDUCTIONS",
    "reference_attention_loss",
    "mask_attention_loss",
    "attention_mass_inside",
    "attention_map_distance",
]

_PREDICTION_ALIASES = {
    "eps": "eps",
    "epsilon": "eps",
    "v": "v",
    "v_prediction": "v",
    "x0": "x0",
    "sample": "x0",
}


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or per-sample ``[B]`` schedule value against ``like [B, ...]``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        return t.to(like.dtype)
    if t.dim() != 1 or t.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"schedule values must be a scalar or [B={like.shape[0]}], got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def vp_coefficients(
    *, alpha_bar: Tensor | float | None = None, sigma: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """``(alpha_t, sigma_t)`` of the VP process from ``alpha_bar`` (DDPM) or a ComfyUI ``sigma``.

    Exactly one of the two must be given. ``alpha_t**2 + sigma_t**2 == 1``.
    """
    if (alpha_bar is None) == (sigma is None):
        raise ValueError("give exactly one of alpha_bar (DDPM alphas_cumprod[t]) or sigma (ComfyUI sigma)")
    if alpha_bar is not None:
        ab = torch.as_tensor(alpha_bar, dtype=torch.float32)
        if bool(((ab <= 0) | (ab > 1)).any()):
            raise ValueError("alpha_bar must be in (0, 1]")
        return ab.sqrt(), (1.0 - ab).clamp_min(0.0).sqrt()
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if bool((s < 0).any()):
        raise ValueError("sigma must be >= 0")
    a = 1.0 / torch.sqrt(1.0 + s * s)
    return a, s * a


def diffusion_target(
    prediction_type: str,
    x0: Tensor,
    noise: Tensor,
    *,
    alpha_bar: Tensor | float | None = None,
    sigma: Tensor | float | None = None,
) -> Tensor:
    """What the denoiser should output for ``x_t = alpha_t*x0 + sigma_t*noise``.

    * ``"eps"`` / ``"epsilon"``: ``noise`` (SD1.x, SDXL base).
    * ``"v"`` / ``"v_prediction"``: ``alpha_t*noise - sigma_t*x0`` (Salimans & Ho; SD2.x-768).
    * ``"x0"`` / ``"sample"``: ``x0`` (e.g. when comparing ComfyUI's denoised output).

    Schedule values (``alpha_bar`` = ``alphas_cumprod[t]``, or ComfyUI ``sigma``) may be a
    scalar or one per sample ``[B]``; only ``"v"`` needs them.
    """
    kind = _PREDICTION_ALIASES.get(prediction_type)
    if kind is None:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {sorted(_PREDICTION_ALIASES)}")
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    a, s = vp_coefficients(alpha_bar=alpha_bar, sigma=sigma)
    return _per_sample(a, x0) * noise - _per_sample(s, x0) * x0


def eps_from_denoised(x_noisy: Tensor, denoised: Tensor, sigma: Tensor | float) -> Tensor:
    """Recover the noise prediction from ComfyUI's denoised output (EPS models).

    ComfyUI's ``apply_model`` returns ``denoised = x - sigma*eps_hat`` for an input
    ``x = x0 + sigma*eps`` (its un-scaled noisy latent), so ``eps_hat = (x - denoised)/sigma``.
    Lets the glue keep the usual eps-MSE weighting when it drives ``apply_model``.
    """
    s = _per_sample(sigma, x_noisy)
    if bool((s <= 0).any()):
        raise ValueError("sigma must be > 0 to recover eps")
    return (x_noisy - denoised) / s


def diffusion_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error, optionally restricted to a (face) mask.

    ``mask`` (``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, soft values in [0, 1], any
    resolution) is area-resized to the latent's size and the squared error is averaged over
    the masked area only: ``sum(m*(pred-target)^2) / (sum(m) * C)``. Dividing by the mask
    area (rather than by the whole latent, as Break-A-Scene's ``MSE(pred*m, target*m)`` does)
    keeps the loss on the same scale as the unmasked one, so the attention weight keeps its
    meaning whatever the face size.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()).pow(2)
    if mask is None:
        return err.mean()
    if pred.dim() != 4:
        raise ValueError(f"a masked diffusion loss needs latents [B, C, H, W], got {tuple(pred.shape)}")
    m = mask.to(device=pred.device)
    if m.dim() == 2:
        m = m[None]
    m = resize_mask(m if m.dim() == 3 else m[:, 0], tuple(pred.shape[-2:]))[:, None]  # [B|1, 1, h, w]
    if m.shape[0] not in (1, pred.shape[0]):
        raise ValueError(f"{m.shape[0]} masks for a batch of {pred.shape[0]} latents")
    m = m.expand(pred.shape[0], 1, *pred.shape[-2:])
    area = m.sum() * pred.shape[1]
    if float(area) <= 0:
        raise ValueError("the face mask is empty at latent resolution; check the mask or turn masked_diffusion off")
    return (err * m).sum() / area


ATTENTION_REDUCTIONS = ("sum_spatial", "mean")


def _as_sites(x: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    sites = [x] if isinstance(x, Tensor) else list(x)
    if not sites:
        raise ValueError(f"{name}: no attention sites given")
    for i, t in enumerate(sites):
        if t.dim() != 4:
            raise ValueError(f"{name}[{i}] must be [batch, heads, queries, tokens], got {tuple(t.shape)}")
    return sites


def reference_attention_loss(
    identity_probs: Tensor | Sequence[Tensor],
    reference_probs: Tensor | Sequence[Tensor],
    *,
    per_head: bool = False,
    reduction: str = "sum_spatial",
) -> Tensor:
    """The paper's face-wise attention loss: squared error between identity and reference maps.

    Each argument is one ``[b, heads, nq, T]`` tensor per loss site, columns paired one to one
    by the caller: by default (``attention_tokens="words_eos"``) every word of the training
    prompt and its first end token against the same word of the reference prompt, the identity's
    slots against the reference word ("person"); method.md §2.2, docs/method.md.
    Defaults (method.md §2.3, our choices — the paper gives no formula):

    * heads are averaged **before** comparing (Break-A-Scene); ``per_head=True`` compares
      each head (FastComposer),
    * ``reduction="sum_spatial"``: per compared token, the squared L2 distance between the two
      maps summed over the site's query positions (its spatial grid), then the mean over batch
      and tokens — a map is compared as a whole picture, so the term does not shrink as the
      grid grows. ``"mean"`` also averages over the queries (plain MSE; nq times smaller: 256 on
      SD1.5's 16×16 sites). docs/method.md says why sum_spatial is the default and what
      gradient share it gives lambda = 0.003. No max-normalisation (both maps are softmaxes over the
      same keys with the same queries),
    * sites are weighted equally (mean over sites, whatever their resolution).

    The reference is detached here as well, so a caller cannot leak gradient through it.
    """
    ids = _as_sites(identity_probs, "identity_probs")
    refs = _as_sites(reference_probs, "reference_probs")
    if len(ids) != len(refs):
        raise ValueError(f"{len(ids)} identity sites but {len(refs)} reference sites")
    if reduction not in ATTENTION_REDUCTIONS:
        raise ValueError(f"reduction must be one of {ATTENTION_REDUCTIONS}, got {reduction!r}")
    losses = []
    for i, (a, r) in enumerate(zip(ids, refs)):
        if a.shape != r.shape:
            raise ValueError(f"site {i}: identity {tuple(a.shape)} vs reference {tuple(r.shape)}")
        a = a.float()
        r = r.detach().float()
        if not per_head:
            a, r = a.mean(dim=1), r.mean(dim=1)
        err = (a - r).pow(2)  # [b, (heads,) nq, T]
        losses.append(err.sum(dim=-2).mean() if reduction == "sum_spatial" else err.mean())
    return torch.stack(losses).mean()


def _flat_mask(mask_grid: Tensor, probs: Tensor) -> Tensor:
    """A site mask (``[h, w]``, ``[nq]``, ``[B, h, w]`` or ``[B, nq]``) as ``[B|1, 1, nq, 1]``."""
    nq = probs.shape[2]
    m = mask_grid.to(device=probs.device, dtype=torch.float32)
    if m.shape[-1] != nq:
        m = m.flatten(-2)
    if m.shape[-1] != nq:
        raise ValueError(f"mask grid with {m.shape[-1]} cells does not match a site with {nq} queries")
    if m.dim() == 1:
        m = m[None]
    if m.dim() != 2 or m.shape[0] not in (1, probs.shape[0]):
        raise ValueError(f"mask grid shape {tuple(mask_grid.shape)} does not fit probs {tuple(probs.shape)}")
    return m[:, None, :, None]


def _as_mask_sites(mask_grid: Tensor | Sequence[Tensor], n: int) -> list[Tensor]:
    masks = [mask_grid] * n if isinstance(mask_grid, Tensor) else list(mask_grid)
    if len(masks) != n:
        raise ValueError(f"{n} attention sites but {len(masks)} mask grids")
    return masks


def mask_attention_loss(
    identity_probs: Tensor | Sequence[Tensor],
    mask_grid: Tensor | Sequence[Tensor],
    *,
    mode: Literal["balanced_l1", "outside_fraction"] = "balanced_l1",
    eps: float = 1e-5,
) -> Tensor:
    """Pull the identity token's attention into the face mask (an alternative to the method).

    ``mask_grid``: per site, the face mask on that site's grid (see
    :func:`sefi_core.attention.mask_to_grid`); a single tensor is used for every site.

    * ``"balanced_l1"`` (FastComposer's ``BalancedL1Loss``): per head and token, mean
      attention over background cells minus mean over face cells. Bounded, negative when the
      token attends mostly inside; scale-free w.r.t. face size.
    * ``"outside_fraction"``: ``1 - attention_mass_inside`` per head and token, in [0, 1].

    Averaged over batch, heads, tokens, then sites.
    """
    sites = _as_sites(identity_probs, "identity_probs")
    masks = _as_mask_sites(mask_grid, len(sites))
    losses = []
    for p, mg in zip(sites, masks):
        p = p.float()
        m = _flat_mask(mg, p)
        if mode == "balanced_l1":
            fg = (p * m).sum(2) / (m.sum(2) + eps)
            bg = (p * (1 - m)).sum(2) / ((1 - m).sum(2) + eps)
            losses.append((bg - fg).mean())
        elif mode == "outside_fraction":
            inside = (p * m).sum(2) / (p.sum(2) + eps)
            losses.append((1 - inside).mean())
        else:
            raise ValueError(f"unknown mask loss mode {mode!r}; use 'balanced_l1' or 'outside_fraction'")
    return torch.stack(losses).mean()


@torch.no_grad()
def attention_mass_inside(probs: Tensor, mask_grid: Tensor, eps: float = 1e-12) -> float:
    """Fraction of a token's attention mass that falls inside the mask, in [0, 1].

    ``sum(p*m)/sum(p)`` over the query axis, averaged over batch, heads and tokens. A uniform
    map scores the mask's area fraction; a map entirely inside the face scores 1.
    """
    p = probs.float()
    m = _flat_mask(mask_grid, p)
    return float(((p * m).sum(2) / (p.sum(2) + eps)).mean())


@torch.no_grad()
def attention_map_distance(a: Tensor, b: Tensor) -> float:
    """Distance between two sets of maps ``[b, heads, nq, T]``, in [0, 1].

    Heads are averaged, then each token's map is normalised to a distribution over the query
    grid and the total-variation distance ``0.5*sum|p - q|`` is taken, averaged over batch and
    tokens: "the fraction of attention that is in the wrong place", independent of the maps'
    absolute scale.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    pa = a.float().mean(1)
    pb = b.float().mean(1)
    pa = pa / pa.sum(1, keepdim=True).clamp_min(1e-12)
    pb = pb / pb.sum(1, keepdim=True).clamp_min(1e-12)
    return float(0.5 * (pa - pb).abs().sum(1).mean())
