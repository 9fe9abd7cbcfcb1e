"""The SeFi `step_fn` for sefi_core.training.run_training: photos to latents, the step's random draws, the
diffusion and attention losses, and a fixed-noise evaluation for tests and logs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .text_encoder import TextEncoder, TriggerWord, align_columns, reference_slots
from .unet_step import UnetStep
from ..prompt_encoding import initializer_conditioning, word_token_ids
from ..sampling_support import check_model_sampling
from ...sefi_core import attention as attn_core
from ...sefi_core import losses
from ...sefi_core.augment import random_scale
from ...sefi_core.stages import stage_of_timestep
from ...sefi_core.training import TrainSettings


def fit_image(image: Tensor, resolution: int) -> Tensor:
    """[H, W, C] or [B, H, W, C] -> [B, res, res, C]: shorter side resized to `resolution`, centre crop."""
    x = image if image.dim() == 4 else image[None]
    x = x.movedim(-1, 1).float()
    h, w = x.shape[-2:]
    s = resolution / min(h, w)
    nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[..., top:top + resolution, left:left + resolution].movedim(1, -1).contiguous()


def fit_mask(mask: Tensor, resolution: int) -> Tensor:
    m = mask if mask.dim() == 3 else mask[None]
    return fit_image(m[..., None], resolution)[..., 0].clamp(0, 1)


def adm_input(model, pooled: Tensor | None, resolution: int) -> Tensor | None:
    """The U-Net's `y` for models with an adm input (SDXL: pooled clip_g output + size embeddings), built by the
    model's own encode_adm with the arguments the host's sampler passes for a square, uncropped image of
    `resolution` pixels; None for models without one (SD1)."""
    inner = model.model
    if pooled is None and not getattr(inner, "adm_channels", 0):
        return None
    y = inner.encode_adm(pooled_output=pooled, width=resolution, height=resolution, crop_w=0, crop_h=0,
                         target_width=resolution, target_height=resolution, prompt_type="positive",
                         device=model.load_device, seed=0)
    return None if y is None else y.detach().float().cpu().clone()


class SefiStep:
    """The `step_fn` for sefi_core.training.run_training, plus a fixed-noise evaluation for tests and logs."""

    def __init__(self, model, clip, vae, images: Tensor, masks: Tensor | None, settings: TrainSettings,
                 trigger: str, vectors_per_token: int, encoder: TextEncoder | None = None,
                 initializer: str = "person"):
        self.model, self.settings, self.n = model, settings, vectors_per_token
        self.text = encoder or TextEncoder(clip)
        self.kind = check_model_sampling(model, "SeFi Train Identity")
        self.ms = model.get_model_object("model_sampling")
        self.sigmas = self.ms.sigmas.detach().float().cpu().clone()
        res = settings.resolution
        self.latent_hw = (res // 8, res // 8)
        # The host's VAE samples its latent distribution with the global RNG: fix it so runs (and resumes) repeat.
        with torch.no_grad(), torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(settings.seed)
            pix = images.float().cpu()
            self.latents = vae.encode(pix[..., :3]).float().cpu().clone()
            self.latents_flip = vae.encode(pix.flip(2)[..., :3]).float().cpu().clone() if settings.flip else None
        self.masks = None if masks is None else masks.float().cpu().clone()
        if self.masks is None and (settings.attention_loss == "mask" or settings.masked_diffusion):
            raise ValueError("attention_loss='mask' and masked_diffusion_loss need a face mask input "
                             "(e.g. from SeFi Face Mask)")
        self.prompts = [self.text.prompt(t, trigger, vectors_per_token) for t in settings.templates]
        ref_texts = [t.replace("{}", settings.reference_word) for t in settings.templates]
        ref_word = word_token_ids(clip, settings.reference_word, "l")
        self.encoders = self.text.encoders
        self.ref_ids = [self.text.plain(t) for t in ref_texts]
        self.columns = []
        self.id_columns = []
        for template, p, ids in zip(settings.templates, self.prompts, self.ref_ids):
            rslots = reference_slots(template, p, ids, ref_word, settings.reference_word)
            eos_ref = self.text._eos(ids)
            self.columns.append(align_columns(p, ids, rslots, settings.attention_tokens, eos_ref))
            self.id_columns.append(align_columns(p, ids, rslots, "identity", eos_ref))
        self.ref_conds, self.adm = [], []
        identity = TriggerWord(trigger, vectors_per_token, initializer)
        with torch.no_grad():
            for template, t in zip(settings.templates, ref_texts):
                self.ref_conds.append(clip.encode_from_tokens(clip.tokenize(t)).float().cpu().clone())
                # SDXL's y: the same rule as SeFi Apply Identity (prompt_encoding.initializer_conditioning)
                _, pooled = initializer_conditioning(clip, template.replace("{}", trigger), [identity])
                self.adm.append(adm_input(model, pooled, res))
        self._device_constants: dict[tuple, Tensor] = {}
        self.unet = UnetStep(model, self.latent_hw, settings.loss_sites, self.ref_conds[0].shape[-1], self.adm[0])

    # -- one sample set ------------------------------------------------------------------------------------
    def _draw(self, rng: torch.Generator, batch: int):
        s = self.settings
        j = int(torch.randint(len(self.prompts), (1,), generator=rng))
        idx = torch.randint(self.latents.shape[0], (batch,), generator=rng)
        x0 = self.latents[idx]
        m = self.masks[idx] if self.masks is not None else None
        if s.flip:
            flip = torch.rand(batch, generator=rng) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), self.latents_flip[idx], x0)
            if m is not None:
                m = torch.where(flip.view(-1, 1, 1), m.flip(-1), m)
        if s.scale_augment:
            if m is not None:
                m = F.interpolate(m[:, None], size=x0.shape[-2:], mode="area")[:, 0]
            x0, m = random_scale(x0, m, rng, s.scale_range)
        t = torch.randint(len(self.sigmas), (batch,), generator=rng)
        noise = torch.randn(x0.shape, generator=rng)
        return j, x0, m, t, noise

    def _forward(self, tokens: dict[str, Tensor], j: int, x0: Tensor, m: Tensor | None, t: Tensor, noise: Tensor,
                 capture: bool, columns):
        s = self.settings
        b = x0.shape[0]
        stages = tokens["clip_l"].shape[0]
        stage = stage_of_timestep(t * (1000.0 / len(self.sigmas)), stages).long()
        # K and V rows stacked into one batch: one CLIP forward per encoder gives both contexts
        vec = {e: torch.cat([tokens[e].float()[stage, 0], tokens[e].float()[stage, 1]], 0) for e in self.encoders}
        cond = self.text.encode_prompt(self.prompts[j], vec)  # [2B, 77, C]
        c_k, c_v = cond[:b], cond[b:]
        device = self.model.load_device
        # the step's draws are made on the CPU (reproducible everywhere) and copied without blocking: on a GPU a
        # blocking copy would wait for everything queued before it (sefi_core.step_sync)
        sigma = self.sigmas[t].to(device, non_blocking=True)
        x0d = self.model.model.process_latent_in(x0.to(device, non_blocking=True))
        noise = noise.to(device, non_blocking=True)
        x_t = self.ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0d)
        ref = self._on_device("ref", j, self.ref_conds[j], device).expand(b, -1, -1) if capture else None
        tcols, rcols = columns[j] if capture else (None, None)
        y = None if self.adm[j] is None else self._on_device("adm", j, self.adm[j], device)
        denoised, records = self.unet.forward(x_t, sigma, c_k, c_v, ref, tcols, rcols, y=y)
        denoised = denoised.float()
        eps_hat = losses.eps_from_denoised(x_t.float(), denoised, sigma)
        if self.kind == "eps":
            pred, target = eps_hat, noise.float()
        else:
            a, sg = losses.vp_coefficients(sigma=sigma.float())
            a, sg = a.view(-1, 1, 1, 1), sg.view(-1, 1, 1, 1)
            pred = a * eps_hat - sg * denoised
            target = losses.diffusion_target("v", x0d.float(), noise.float(), sigma=sigma.float())
        mask = m.to(device, non_blocking=True) if (m is not None and s.masked_diffusion) else None
        return losses.diffusion_loss(pred, target, mask), records, m

    def _on_device(self, kind: str, j: int, value: Tensor, device) -> Tensor:
        """A per-template constant (reference encoding, SDXL's `y`), copied to the device once, not every step."""
        key = (kind, j, str(device))
        cached = self._device_constants.get(key)
        if cached is None:
            cached = self._device_constants[key] = value.to(device)
        return cached

    def _attention_loss(self, records, m):
        s = self.settings
        if s.attention_loss == "reference":
            return losses.reference_attention_loss([r[3] for r in records], [r[4] for r in records],
                                                   reduction=s.attention_reduction)
        grids = [attn_core.mask_to_grid(m.to(r[3].device), r[3].shape[2], self.latent_hw) for r in records]
        return losses.mask_attention_loss([r[3] for r in records], grids, mode=s.mask_loss_mode)

    @property
    def loss_columns(self) -> list[tuple[list[int], list[int]]]:
        """Per template, the (training prompt, reference prompt) key columns whose maps the attention loss reads."""
        return self.columns if self.settings.attention_loss == "reference" else self.id_columns

    def identity_positions(self, j: int = 0) -> list[int]:
        """Where the identity slots sit among template j's loss columns (their reference partners sit at the same
        places among the reference columns)."""
        slots = set(self.prompts[j].slots)
        return [i for i, c in enumerate(self.loss_columns[j][0]) if c in slots]

    def __call__(self, tokens: dict[str, Tensor], rng: torch.Generator, step: int):
        s = self.settings
        j, x0, m, t, noise = self._draw(rng, s.batch_size)
        capture = s.attention_loss != "off" and s.attention_weight > 0
        diff, records, m = self._forward(tokens, j, x0, m, t, noise, capture, self.loss_columns)
        # tensors, not floats: the loop reads them back when it syncs (sefi_core.step_sync); `t` is on the CPU
        parts = {"diffusion": diff.detach(), "t": float(t.float().mean())}
        terms = {"diffusion": diff}
        if capture:
            att = self._attention_loss(records, m)
            parts["attention"] = att.detach()
            terms["attention"] = s.attention_weight * att
        return sum(terms.values()), parts, terms

    @torch.no_grad()
    def attention_records(self, tokens: dict[str, Tensor], image: int, t: int, noise: Tensor, j: int = 0):
        """The loss sites' records (block, id, index, identity-prompt maps, reference maps) of photo `image` at
        timestep index `t` with `noise`, over the loss's own columns: what the attention loss would read there."""
        x0 = self.latents[image:image + 1]
        m = self.masks[image:image + 1] if self.masks is not None else None
        _, records, _ = self._forward(tokens, j, x0, m, torch.tensor([int(t)]), noise, True, self.loss_columns)
        return records

    @torch.no_grad()
    def evaluate(self, tokens: dict[str, Tensor], pairs: Sequence[tuple[int, Tensor]], image: int = 0):
        """Diffusion loss averaged over fixed (t, noise) pairs on image `image` (no augmentation), plus the identity
        slots' and the reference word's maps at the loss sites (for attention metrics)."""
        total, id_maps, ref_maps, masks = 0.0, [], [], []
        x0 = self.latents[image:image + 1]
        m = self.masks[image:image + 1] if self.masks is not None else None
        for t, noise in pairs:
            diff, records, _ = self._forward(tokens, 0, x0, m, torch.tensor([int(t)]), noise, True, self.id_columns)
            total += float(diff)
            id_maps.append([r[3] for r in records])
            ref_maps.append([r[4] for r in records])
            if m is not None:
                masks.append([attn_core.mask_to_grid(m, r[3].shape[2], self.latent_hw) for r in records])
        return {"loss": total / max(1, len(pairs)), "id_maps": id_maps, "ref_maps": ref_maps, "mask_grids": masks}
