"""Host adapter for SeFi training: differentiable text encoding, the U-Net step with the K/V split and attention
capture, VAE latents, and the frozen-weight bookkeeping. The training loop itself is host-free
(sefi_core.training); this module builds its `step_fn`.

Two host traps (comfyui-host.md A10, B4) and how they are handled here:

* Inference tensors: the executor runs nodes under `torch.inference_mode()`, so loaded weights cannot be saved
  for backward. `frozen_copies` gives every parameter of the U-Net / CLIP an ordinary-tensor copy for the
  duration of training and puts the original Parameter objects back in a `finally`.
* In-place residuals: CLIP's `CLIPLayer.forward` (`x += ...`, both hosts) and 0.0.1's
  `BasicTransformerBlock.forward` (`x += n`) overwrite tensors autograd saved. CLIP is run by hand here
  (`TextEncoder`, out-of-place residuals; that is needed anyway because 0.0.1's token splicing writes into an
  embedding in place). For the U-Net, modules whose class forward does `x += n` (found by reading the host's
  source, so upstream 0.3.64 — which writes `x = n + x` — pays nothing) get a temporary instance `forward`
  running under `saved_tensors_hooks` that clones the tensors autograd saves inside that block; the instance
  attribute is deleted afterwards. Cloning is chosen over a rewritten copy of the block because it keeps the
  host's own arithmetic and patch handling (attn1/attn2 patches, replaces) exactly.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import re
import resource
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import host
from .prompt_encoding import clip_family, plan_prompt, word_token_ids
from ..sefi_core import attention as attn_core
from ..sefi_core import losses
from ..sefi_core.augment import random_scale
from ..sefi_core.stages import stage_of_timestep
from ..sefi_core.tokens import find_positions
from ..sefi_core.training import TrainSettings

SDXL_MESSAGE = ("SeFi Train Identity supports SD1.x checkpoints only in this version; SDXL training (clip_l + "
                "clip_g tokens, 2048-d context, pooled adm input) is not implemented yet. Train on an SD1.5 "
                "checkpoint.")


# --------------------------------------------------------------------------------------------------------------
# Frozen weights and in-place residuals
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def frozen_copies(modules: Sequence[nn.Module], dtype: torch.dtype | None):
    """Give every parameter of `modules` (except embedding tables) an ordinary-tensor, requires_grad=False copy
    (cast to `dtype` when given) and restore the original Parameter objects on exit, whatever happens."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    copies: dict[int, nn.Parameter] = {}
    try:
        seen: set[int] = set()
        for root in modules:
            for mod in root.modules():
                if id(mod) in seen:
                    continue
                seen.add(id(mod))
                if isinstance(mod, nn.Embedding):
                    continue  # embedding weights are only gathered from (indices are saved, not the weight)
                for key, p in list(mod._parameters.items()):
                    if p is None:
                        continue
                    new = copies.get(id(p))
                    if new is None:
                        data = p.detach().clone()
                        if dtype is not None and data.is_floating_point():
                            data = data.to(dtype)
                        new = copies[id(p)] = nn.Parameter(data, requires_grad=False)
                    saved.append((mod, key, p))
                    mod._parameters[key] = new
        yield
    finally:
        for mod, key, p in reversed(saved):
            mod._parameters[key] = p


_INPLACE_RESIDUAL = re.compile(r"^\s*x\s*\+=\s*n\b", re.M)
_CLASS_CACHE: dict[type, bool] = {}


def _adds_residual_in_place(cls: type) -> bool:
    if cls not in _CLASS_CACHE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _CLASS_CACHE[cls] = bool(_INPLACE_RESIDUAL.search(src))
    return _CLASS_CACHE[cls]


def _pack_clone(t: Tensor):
    return t if isinstance(t, nn.Parameter) else t.clone()


def _unpack(t: Tensor) -> Tensor:
    return t


@contextlib.contextmanager
def safe_inplace_residuals(root: nn.Module):
    """Wrap the forward of every sub-module whose host forward does `x += n` so that tensors saved for backward
    inside it are clones (see the module docstring); removed on exit."""
    wrapped: list[tuple[nn.Module, object]] = []
    try:
        for mod in root.modules():
            if not _adds_residual_in_place(type(mod)):
                continue
            previous = mod.__dict__.get("forward")
            original = mod.forward

            def forward(*args, __orig=original, **kwargs):
                with torch.autograd.graph.saved_tensors_hooks(_pack_clone, _unpack):
                    return __orig(*args, **kwargs)

            mod.forward = forward
            wrapped.append((mod, previous))
        yield len(wrapped)
    finally:
        for mod, previous in reversed(wrapped):
            if previous is None:
                del mod.forward
            else:
                mod.forward = previous


def compute_dtype(model) -> torch.dtype:
    """float32 on CPU; the model's (manual-cast) dtype on an accelerator."""
    device = model.load_device
    if getattr(device, "type", str(device)) == "cpu":
        return torch.float32
    inner = model.model
    return getattr(inner, "manual_cast_dtype", None) or inner.get_dtype()


def peak_memory_bytes(device) -> int:
    if getattr(device, "type", "") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak_memory(device) -> None:
    if getattr(device, "type", "") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def training_context(model, clip):
    """Everything needed for gradients through the host's frozen models, undone on exit: grad mode on outside
    inference mode, weights loaded, ordinary-tensor parameter copies, safe in-place residuals."""
    with torch.inference_mode(False), torch.enable_grad():
        host.load_for_training(model, clip)
        dtype = compute_dtype(model)
        unet = model.model.diffusion_model
        text = clip.cond_stage_model
        clip_dtype = torch.float32  # the host's CLIP computes in float32 from fp16 storage on every device
        with frozen_copies([unet], dtype), frozen_copies([text], clip_dtype), safe_inplace_residuals(unet):
            yield dtype


# --------------------------------------------------------------------------------------------------------------
# Text encoding with gradient (SD1 clip_l)
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Trigger:  # the duck-typed stand-in plan_prompt needs (trigger, vectors_per_token)
    trigger: str
    vectors_per_token: int


@dataclass(frozen=True)
class PromptTokens:
    ids: list[int]            # 77 token ids of the rewritten prompt (placeholders in place)
    slots: list[int]          # positions of the identity vectors 0..n-1, in order
    eos: int                  # position of the first end token


class TextEncoder:
    """The host's SD1 CLIP-L run by hand so that spliced vectors get gradients, on both hosts.

    token_embedding(ids) with the identity positions replaced (index_put, out-of-place) + position embedding →
    the encoder layers up to the layer the host's SDClipModel would use (`layer`/`layer_idx`, honouring the
    CLIP's CLIPSetLastLayer setting) → final_layer_norm (if `layer_norm_hidden_state`), with a causal mask and
    out-of-place residuals. Equal to `clip.encode_from_tokens` for the same spliced tokens (tested)."""

    def __init__(self, clip):
        family = clip_family(clip)
        if family != "sd1":
            raise NotImplementedError(SDXL_MESSAGE)
        self.clip = clip
        self.enc = clip.cond_stage_model.clip_l
        if getattr(self.enc, "enable_attention_masks", False) or getattr(self.enc, "zero_out_masked", False):
            raise NotImplementedError("this CLIP uses attention masks; SeFi training supports standard SD1 CLIP-L")
        self.tm = self.enc.transformer.text_model
        layer, idx = self.enc.options_default[0], self.enc.options_default[1]
        if getattr(clip, "layer_idx", None) is not None:
            idx = clip.layer_idx
            layer = "last" if abs(idx) > self.enc.num_layers else "hidden"
        if layer not in ("last", "hidden"):
            raise NotImplementedError(f"CLIP layer mode {layer!r} is not supported for training")
        n_layers = len(self.tm.encoder.layers)
        self.stop = n_layers - 1 if layer == "last" else (idx if idx >= 0 else n_layers + idx)
        self.final_norm = layer == "last" or bool(self.enc.layer_norm_hidden_state)
        self.end_token = clip.tokenize("")["l"][0][1][0]

    @property
    def width(self) -> int:
        return int(self.tm.embeddings.token_embedding.weight.shape[1])

    def initializer_embedding(self, word: str) -> Tensor:
        ids = word_token_ids(self.clip, word, "l")
        if not ids:
            raise ValueError(f"the initializer word {word!r} gives no tokens; use a plain word such as 'person'")
        weight = self.tm.embeddings.token_embedding.weight
        return weight.detach()[torch.tensor(ids, device=weight.device)].float().cpu().clone()

    def prompt(self, template: str, trigger: str, n: int) -> PromptTokens:
        plan = plan_prompt(self.clip, template.replace("{}", trigger), [_Trigger(trigger, n)], 1.0)
        chunks = plan.tokens["l"]
        if len(chunks) != 1:
            raise ValueError(f"training prompt {template!r} is longer than one 77-token chunk; shorten it")
        slots = find_positions(chunks, {plan.placeholder_ids[0]: n})[plan.placeholder_ids[0]]
        ids = [int(t) for t, *_ in chunks[0]]
        return PromptTokens(ids, [s.index for s in sorted(slots, key=lambda s: (s.index))], self._eos(ids))

    def plain(self, text: str) -> list[int]:
        chunks = self.clip.tokenize(text)["l"]
        if len(chunks) != 1:
            raise ValueError(f"prompt {text!r} is longer than one 77-token chunk")
        return [int(t) for t, *_ in chunks[0]]

    def _eos(self, ids: Sequence[int]) -> int:
        return next(i for i in range(1, len(ids)) if ids[i] == self.end_token)

    def encode(self, ids: Tensor, slots: Sequence[int] | None = None, vectors: Tensor | None = None) -> Tensor:
        """ids [B, 77] long; vectors [B, n, C] for positions `slots` (n of them) → cond [B, 77, C] float32."""
        weight = self.tm.embeddings.token_embedding.weight
        device = weight.device
        ids = ids.to(device)
        x = F.embedding(ids, weight).float()
        if vectors is not None:
            b, n, c = vectors.shape
            rows = torch.arange(b, device=device).repeat_interleave(n)
            cols = torch.tensor(list(slots), device=device, dtype=torch.long).repeat(b)
            x = torch.index_put(x, (rows, cols), vectors.reshape(b * n, c).to(device=device, dtype=x.dtype))
        t = x.shape[1]
        x = x + self.tm.embeddings.position_embedding.weight[:t].to(x.dtype).clone()
        mask = torch.full((t, t), -torch.finfo(x.dtype).max, dtype=x.dtype, device=device).triu_(1)
        attention = host.clip_attention(device)
        for i, layer in enumerate(self.tm.encoder.layers):
            x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
            if i == self.stop:
                break
        if self.final_norm:
            x = self.tm.final_layer_norm(x)
        return x.float()


def align_columns(target: PromptTokens, reference: Sequence[int], ref_slots: Sequence[int], mode: str,
                  eos_ref: int) -> tuple[list[int], list[int]]:
    """Pair the training prompt's key columns with the reference prompt's (settings.attention_tokens).

    "identity": identity slots ↔ the reference word's slots; "words_eos": every position 1..first EOS, the
    identity slots paired with the reference word (repeated/truncated when the piece counts differ) and the
    words around it paired in order; "all": all 77 positions (only when the two prompts align one to one)."""
    n, m = len(target.slots), len(ref_slots)
    id_pairs = [(s, ref_slots[min(j, m - 1)]) for j, s in enumerate(target.slots)]
    if mode == "identity":
        return [a for a, _ in id_pairs], [b for _, b in id_pairs]
    first, last = target.slots[0], target.slots[-1]
    rfirst, rlast = ref_slots[0], ref_slots[-1]
    pairs = [(i, i) for i in range(1, first)] + id_pairs
    pairs += [(last + k, rlast + k) for k in range(1, target.eos - last + 1) if rlast + k <= eos_ref]
    if mode == "all":
        if n != m:
            raise ValueError("attention_tokens='all' needs the identity and the reference word to have the same "
                             "token count; use 'words_eos'")
        return list(range(len(target.ids))), list(range(len(target.ids)))
    return [a for a, _ in pairs], [b for _, b in pairs]


# --------------------------------------------------------------------------------------------------------------
# U-Net step with K/V split and attention capture
# --------------------------------------------------------------------------------------------------------------

def _split(x: Tensor, heads: int) -> Tensor:
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    out = F.scaled_dot_product_attention(_split(q, heads), _split(k, heads), _split(v, heads))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


class UnetStep:
    """A private clone of the MODEL with an attn2_patch (K from c_K, V from c_V; at loss sites the reference
    encoding is appended to both) and an attn2 replace at each loss site that computes the identity columns'
    probabilities and the same-Q reference probabilities (detached). The caller's MODEL is never patched."""

    def __init__(self, model, latent_hw: tuple[int, int], loss_sites: str, context_dim: int):
        self.model = model
        self.clone = model.clone()
        self.latent_hw = latent_hw
        self.st = SimpleNamespace(values=None, ref=None, tcols=None, rcols=None, records=[], spy=None)
        self.clone.set_model_attn2_patch(self._patch)
        self.sites = self._discover(context_dim)
        self.loss_keys = select_sites(self.sites, latent_hw, loss_sites)
        for key in self.loss_keys:
            self.clone.set_model_attn2_replace(self._replace, key[0], key[1], key[2])

    def _discover(self, context_dim: int) -> dict[tuple, int]:
        """Run one no-grad forward with a spy to read the cross-attention sites (key → query count)."""
        found: dict[tuple, int] = {}
        self.st.spy = found
        try:
            with torch.no_grad():
                ms = self.model.get_model_object("model_sampling")
                x = torch.zeros(1, 4, *self.latent_hw)
                sigma = ms.sigmas.detach().cpu()[500:501].clone()
                self.forward(x, sigma, torch.zeros(1, 77, context_dim), None)
        finally:
            self.st.spy = None
        if not found:
            raise RuntimeError("no cross-attention site fired during the site discovery pass")
        return found

    def _patch(self, n, context, value, eo):
        st = self.st
        key = (eo["block"][0], eo["block"][1], eo.get("block_index", 0))
        if st.spy is not None:
            st.spy[key] = n.shape[1]
        if st.values is None:
            return n, context, value
        v = st.values.to(device=context.device, dtype=context.dtype)
        if st.ref is not None and key in self.loss_keys:
            r = st.ref.to(device=context.device, dtype=context.dtype)
            return n, torch.cat([context, r], 1), torch.cat([v, r], 1)
        return n, context, v

    def _replace(self, q, k, v, eo):
        st = self.st
        heads = eo["n_heads"]
        t = 77
        if st.ref is None or k.shape[1] == t:
            return _sdpa(q, k, v, heads)
        out, probs = attn_core.attention_with_probs(q, k[:, :t], v[:, :t], heads, st.tcols)
        ref = attn_core.reference_probs(q, k[:, t:], heads, st.rcols) if st.rcols is not None else None
        st.records.append((eo["block"][0], eo["block"][1], eo.get("block_index", 0), probs, ref))
        return out

    def forward(self, x_t: Tensor, sigma: Tensor, c_k: Tensor, c_v: Tensor | None, ref: Tensor | None = None,
                tcols=None, rcols=None):
        st = self.st
        st.values, st.ref, st.tcols, st.rcols, st.records = c_v, ref, tcols, rcols, []
        device = self.model.load_device
        to = dict(self.clone.model_options.get("transformer_options", {}))
        sigma = sigma.to(device)
        to["cond_or_uncond"] = [0]
        to["sigmas"] = sigma
        try:
            out = self.clone.model.apply_model(x_t.to(device), sigma, c_crossattn=c_k.to(device),
                                               transformer_options=to)
            return out, list(st.records)
        finally:
            st.values = st.ref = None
            st.records = []


def select_sites(sites: dict[tuple, int], latent_hw: tuple[int, int], mode: str) -> list[tuple]:
    """Loss sites by resolution: "quarter" = latent/4 grids (SD1.5 512 px: 16×16), "quarter+half" adds latent/2,
    "all" = every site. When a model has no latent/4 (or /2) grid (the tiny test UNet runs everything at full
    latent size), the coarsest grids not coarser than /4 stand in."""
    area = latent_hw[0] * latent_hw[1]
    factor = {k: max(1, round(math.sqrt(area / nq))) for k, nq in sites.items()}
    if mode == "all":
        return sorted(sites)
    wanted = {4} if mode == "quarter" else {4, 2}
    chosen = [k for k, f in factor.items() if f in wanted]
    if not chosen:
        present = sorted({f for f in factor.values() if f <= 4}, reverse=True) or sorted(set(factor.values()))
        keep = set(present[: len(wanted)])
        chosen = [k for k, f in factor.items() if f in keep]
    return sorted(chosen)


# --------------------------------------------------------------------------------------------------------------
# Images, latents, the step function
# --------------------------------------------------------------------------------------------------------------

def fit_image(image: Tensor, resolution: int) -> Tensor:
    """[H, W, C] or [B, H, W, C] → [B, res, res, C]: shorter side resized to `resolution`, centre crop."""
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


def prediction_type(model_sampling) -> str:
    names = [c.__name__ for c in type(model_sampling).__mro__]
    for name in names:
        if name == "V_PREDICTION":
            return "v"
        if name == "EPS":
            return "eps"
    raise NotImplementedError(f"SeFi training supports eps and v-prediction models, not {type(model_sampling).__name__}")


class SefiStep:
    """The `step_fn` for sefi_core.training.run_training, plus a fixed-noise evaluation for tests and logs."""

    def __init__(self, model, clip, vae, images: Tensor, masks: Tensor | None, settings: TrainSettings,
                 trigger: str, vectors_per_token: int, encoder: TextEncoder | None = None):
        self.model, self.settings, self.n = model, settings, vectors_per_token
        self.text = encoder or TextEncoder(clip)
        self.ms = model.get_model_object("model_sampling")
        self.kind = prediction_type(self.ms)
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
        self.ref_ids = [self.text.plain(t) for t in ref_texts]
        self.columns = []
        self.id_columns = []
        for p, ids in zip(self.prompts, self.ref_ids):
            start = next(i for i in range(1, len(ids) - len(ref_word) + 1) if ids[i:i + len(ref_word)] == ref_word)
            rslots = list(range(start, start + len(ref_word)))
            eos_ref = self.text._eos(ids)
            self.columns.append(align_columns(p, ids, rslots, settings.attention_tokens, eos_ref))
            self.id_columns.append(align_columns(p, ids, rslots, "identity", eos_ref))
        with torch.no_grad():
            self.ref_conds = [clip.encode_from_tokens(clip.tokenize(t)).float().cpu().clone() for t in ref_texts]
        self.unet = UnetStep(model, self.latent_hw, settings.loss_sites, self.ref_conds[0].shape[-1])

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
        toks = tokens["clip_l"].float()
        vec = torch.cat([toks[stage, 0], toks[stage, 1]], 0)  # [2B, n, C]
        p = self.prompts[j]
        ids = torch.tensor(p.ids, dtype=torch.long)[None].expand(2 * b, -1)
        cond = self.text.encode(ids, p.slots, vec)
        c_k, c_v = cond[:b], cond[b:]
        device = self.model.load_device
        sigma = self.sigmas[t].to(device)
        x0d = self.model.model.process_latent_in(x0.to(device))
        noise = noise.to(device)
        x_t = self.ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0d)
        ref = self.ref_conds[j].expand(b, -1, -1) if capture else None
        tcols, rcols = columns[j] if capture else (None, None)
        denoised, records = self.unet.forward(x_t, sigma, c_k, c_v, ref, tcols, rcols)
        denoised = denoised.float()
        eps_hat = losses.eps_from_denoised(x_t.float(), denoised, sigma)
        if self.kind == "eps":
            pred, target = eps_hat, noise.float()
        else:
            a, sg = losses.vp_coefficients(sigma=sigma.float())
            a, sg = a.view(-1, 1, 1, 1), sg.view(-1, 1, 1, 1)
            pred = a * eps_hat - sg * denoised
            target = losses.diffusion_target("v", x0d.float(), noise.float(), sigma=sigma.float())
        mask = m.to(device) if (m is not None and s.masked_diffusion) else None
        return losses.diffusion_loss(pred, target, mask), records, m

    def _attention_loss(self, records, m):
        s = self.settings
        if s.attention_loss == "reference":
            return losses.reference_attention_loss([r[3] for r in records], [r[4] for r in records])
        grids = [attn_core.mask_to_grid(m.to(r[3].device), r[3].shape[2], self.latent_hw) for r in records]
        return losses.mask_attention_loss([r[3] for r in records], grids, mode=s.mask_loss_mode)

    def __call__(self, tokens: dict[str, Tensor], rng: torch.Generator, step: int):
        s = self.settings
        j, x0, m, t, noise = self._draw(rng, s.batch_size)
        capture = s.attention_loss != "off" and s.attention_weight > 0
        columns = self.columns if s.attention_loss == "reference" else self.id_columns
        diff, records, m = self._forward(tokens, j, x0, m, t, noise, capture, columns)
        parts = {"diffusion": float(diff.detach()), "t": float(t.float().mean())}
        loss = diff
        if capture:
            att = self._attention_loss(records, m)
            parts["attention"] = float(att.detach())
            loss = diff + s.attention_weight * att
        return loss, parts

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
