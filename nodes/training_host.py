"""Host adapter for SeFi training: differentiable text encoding, the U-Net step with the K/V split and attention
capture, VAE latents, and the frozen-weight bookkeeping. The training loop itself is host-free
(sefi_core.training); this module builds its `step_fn`.

Two host traps (comfyui-host.md A10, B4) and how they are handled here:

* Inference tensors: the executor runs nodes under `torch.inference_mode()`, so loaded weights cannot be saved
  for backward. `frozen_copies` gives every parameter of the U-Net / CLIP an ordinary-tensor stand-in (an alias
  of the same memory when no cast is needed) for the duration of training and puts the original Parameter
  objects back in a `finally`.
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
import inspect
import math
import re
import resource
import types
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint as _checkpoint

from . import host
from .prompt_encoding import clip_family, initializer_conditioning, plan_prompt, word_token_ids
from .sampling_support import check_model_sampling
from ..sefi_core import attention as attn_core
from ..sefi_core import losses
from ..sefi_core.augment import random_scale
from ..sefi_core.stages import stage_of_timestep
from ..sefi_core.identity import FAMILY_ENCODERS
from ..sefi_core.tokens import ENCODER_TOKEN_KEYS, find_positions
from ..sefi_core.training import TrainSettings

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in PRECISION_DTYPES.items()}


# --------------------------------------------------------------------------------------------------------------
# Frozen weights and in-place residuals
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def frozen_copies(modules: Sequence[nn.Module], dtype: torch.dtype | None, park_originals: bool | None = None):
    """Give every parameter of `modules` (except embedding tables) an ordinary, requires_grad=False stand-in in
    `dtype` for the duration, and put the original Parameter objects back on exit, whatever happens.

    Memory: a stand-in whose dtype already matches *aliases* the original's storage (no copy; the originals are
    inference tensors, which autograd refuses to save, but an ordinary tensor over the same memory is fine and
    nothing here writes to weights). Only a cast makes a copy; then, on an accelerator (or when
    `park_originals` is True), the originals are parked on the CPU until exit so the weights are not held twice
    in device memory — SD1.5 stored in fp16 and trained in bf16 would otherwise need 1.7 GB more VRAM."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    copies: dict[int, nn.Parameter] = {}
    parked: list[tuple[nn.Parameter, torch.device]] = []
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
                        new = copies[id(p)] = nn.Parameter(_stand_in(p, dtype), requires_grad=False)
                        park = p.device.type != "cpu" if park_originals is None else park_originals
                        if park and new.data_ptr() != p.data_ptr():
                            parked.append((p, p.device))
                    saved.append((mod, key, p))
                    mod._parameters[key] = new
        with torch.inference_mode():  # the originals may be inference tensors: only move them in that mode
            for p, _ in parked:
                p.data = p.data.to("cpu", copy=True)
        yield
    finally:
        with torch.inference_mode():
            for p, device in parked:
                p.data = p.data.to(device, copy=True)
        for mod, key, p in reversed(saved):
            mod._parameters[key] = p


def _stand_in(p: nn.Parameter, dtype: torch.dtype | None) -> Tensor:
    """`p`'s values as an ordinary tensor in `dtype`: an alias of its memory when no cast is needed (plain
    tensors only; tensor subclasses such as quantised weights are copied)."""
    data = p.data
    if dtype is not None and data.is_floating_point() and data.dtype != dtype:
        return data.detach().to(dtype, copy=True)
    if type(data) is not Tensor:
        return data.detach().clone()
    alias = torch.empty(0, dtype=data.dtype, device=data.device)
    return alias.set_(data.untyped_storage(), data.storage_offset(), data.size(), data.stride())


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
def temporary_forwards(root: nn.Module, make_forward: Callable[[nn.Module], Callable | None]):
    """For the duration, every sub-module of `root` for which `make_forward(module)` returns a function gets it as
    its instance `forward` (the host's class forward is untouched); on exit, newest first, ours is deleted or an
    earlier instance forward put back, whatever happens. Yields how many modules were given one."""
    wrapped: list[tuple[nn.Module, object]] = []
    try:
        for mod in root.modules():
            forward = make_forward(mod)
            if forward is None:
                continue
            wrapped.append((mod, mod.__dict__.get("forward")))
            mod.forward = forward
        yield len(wrapped)
    finally:
        for mod, previous in reversed(wrapped):
            if previous is None:
                del mod.forward
            else:
                mod.forward = previous


def _cloning_saved_tensors(mod: nn.Module) -> Callable | None:
    if not _adds_residual_in_place(type(mod)):
        return None
    original = mod.forward

    def forward(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(_pack_clone, _unpack):
            return original(*args, **kwargs)

    return forward


def safe_inplace_residuals(root: nn.Module):
    """Wrap the forward of every sub-module whose host forward does `x += n` so that tensors saved for backward
    inside it are clones (see the module docstring); removed on exit."""
    return temporary_forwards(root, _cloning_saved_tensors)


class _WidenedLinear(torch.autograd.Function):
    """`F.linear(x, W, b)` with the frozen W, b stored narrower than x (CLIP: fp16 storage, fp32 compute) and widened
    to x's dtype on the fly — in forward, and again in backward. Autograd then keeps the stored weight (an alias of
    the host's, no extra memory) instead of one widened fp32 copy per layer until backward: 0.5 GB for SD1.5's
    CLIP-L, 2.8 GB more for SDXL's CLIP-G. The arithmetic is the host's own manual cast (widen, then linear)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        w = weight.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(device=x.device, dtype=x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(device=grad.device, dtype=grad.dtype), None, None


def _has_weight_functions(mod: nn.Module) -> bool:
    """Host weight patches applied at call time (LoRA in low-VRAM mode): a list upstream, one callable in 0.0.1."""
    for name in ("weight_function", "bias_function"):
        f = getattr(mod, name, None)
        if (len(f) > 0) if isinstance(f, list) else f is not None:
            return True
    return False


def _widened(mod: nn.Module) -> Callable | None:
    if not isinstance(mod, nn.Linear) or _has_weight_functions(mod):
        return None
    return lambda x: _WidenedLinear.apply(x, mod.weight, mod.bias)


def widened_linears(root: nn.Module):
    """Run every nn.Linear under `root` through `_WidenedLinear` for the duration (instance `forward`, removed on
    exit). Layers with call-time weight patches keep the host's forward, which applies them."""
    return temporary_forwards(root, _widened)


def compute_dtype(model, precision: str = "auto") -> torch.dtype:
    """The dtype the frozen U-Net is run in (its stand-ins are cast to it).

    "fp32" / "bf16" / "fp16" as asked; "auto" = float32 on CPU, else the loaded model's own compute dtype (its
    manual-cast dtype, or its storage dtype) — so the stored weights are used in place with no second copy in
    device memory (SD1.5 loads as fp16 on most GPUs; fp16's narrow range is handled by the training loop's
    dynamic loss scaling)."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
    if precision != "auto":
        return PRECISION_DTYPES[precision]
    device = model.load_device
    if getattr(device, "type", str(device)) == "cpu":
        return torch.float32
    inner = model.model
    dtype = getattr(inner, "manual_cast_dtype", None) or inner.get_dtype()
    return dtype if dtype in DTYPE_NAMES else torch.float32


@contextlib.contextmanager
def unet_compute_dtype(model, dtype: torch.dtype):
    """Make the host's apply_model cast its inputs to `dtype` (the dtype of the frozen copies) for the duration:
    the U-Net's `dtype` attribute and, where the model manual-casts, its manual-cast dtype; restored on exit."""
    inner = model.model
    unet = inner.diffusion_model
    had_dtype, old_dtype = "dtype" in unet.__dict__, unet.__dict__.get("dtype")
    old_cast = getattr(inner, "manual_cast_dtype", None)
    try:
        unet.dtype = dtype
        if old_cast is not None:
            inner.manual_cast_dtype = dtype
        yield
    finally:
        if had_dtype:
            unet.dtype = old_dtype
        else:
            unet.__dict__.pop("dtype", None)
        if old_cast is not None:
            inner.manual_cast_dtype = old_cast


def peak_memory_bytes(device) -> int:
    if getattr(device, "type", "") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak_memory(device) -> None:
    if getattr(device, "type", "") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def training_context(model, clip, precision: str = "auto"):
    """Everything needed for gradients through the host's frozen models, undone on exit: grad mode on outside
    inference mode, weights loaded, ordinary-tensor stand-ins for the parameters (U-Net in the compute dtype of
    `precision`; CLIP as stored, its linears widened to float32 per call as the host computes it), safe in-place
    residuals. Yields the U-Net compute dtype."""
    with torch.inference_mode(False), torch.enable_grad():
        host.load_for_training(model, clip)
        dtype = compute_dtype(model, precision)
        unet = model.model.diffusion_model
        text = clip.cond_stage_model
        # the host's CLIP computes in float32 from (usually fp16) storage on every device: the stand-ins keep the
        # storage dtype (aliases, no copy) and the linears widen per call
        with frozen_copies([unet], dtype), frozen_copies([text], None), widened_linears(text), \
                safe_inplace_residuals(unet), unet_compute_dtype(model, dtype):
            yield dtype


# --------------------------------------------------------------------------------------------------------------
# Text encoding with gradient (SD1: clip_l; SDXL: clip_l + clip_g)
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Trigger:  # the duck-typed identity plan_prompt / initializer_text need
    trigger: str
    vectors_per_token: int
    initializer: str = "person"


@dataclass(frozen=True)
class PromptTokens:
    ids: list[int]            # 77 token ids of the rewritten prompt (placeholders in place), clip_l's tokenizer
    slots: list[int]          # positions of the identity vectors 0..n-1, in order
    eos: int                  # position of the first end token
    by_encoder: dict = None   # encoder name → (ids, slots) for every encoder of the family (SDXL: clip_g too)


class _ClipRunner:
    """One of the host's CLIP text encoders (an SDClipModel) run by hand.

    token_embedding(ids) with the identity positions replaced (index_put, out-of-place) + position embedding →
    the encoder layers up to the layer the host's SDClipModel would use (`layer`/`layer_idx` of the model's own
    configuration, honouring CLIPSetLastLayer) → final_layer_norm (if `layer_norm_hidden_state`), with a causal
    mask and out-of-place residuals."""

    def __init__(self, clip, enc, key: str):
        if getattr(enc, "enable_attention_masks", False) or getattr(enc, "zero_out_masked", False):
            raise NotImplementedError("this CLIP uses attention masks; SeFi training supports the standard SD1/SDXL "
                                      "CLIP-L/CLIP-G text encoders")
        self.enc, self.key = enc, key
        self.tm = enc.transformer.text_model
        layer, idx = enc.options_default[0], enc.options_default[1]
        if getattr(clip, "layer_idx", None) is not None:  # CLIPSetLastLayer: set_clip_options({"layer": idx})
            idx = clip.layer_idx
            layer = "last" if abs(idx) > enc.num_layers else "hidden"
        if layer not in ("last", "hidden"):
            raise NotImplementedError(f"CLIP layer mode {layer!r} is not supported for training")
        n_layers = len(self.tm.encoder.layers)
        self.stop = n_layers - 1 if layer == "last" else (idx if idx >= 0 else n_layers + idx)
        self.final_norm = layer == "last" or bool(enc.layer_norm_hidden_state)
        self.end_token = clip.tokenize("")[key][0][1][0]

    @property
    def width(self) -> int:
        return int(self.tm.embeddings.token_embedding.weight.shape[1])

    def run(self, ids: Tensor, slots: Sequence[int] | None = None, vectors: Tensor | None = None) -> Tensor:
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


class TextEncoder:
    """The host's CLIP run by hand so that spliced vectors get gradients, on both hosts.

    SD1: clip_l alone. SDXL: clip_l and clip_g each run by hand with its own configuration (both read hidden layer
    -2 without the final norm in the stock SDXLClipModel) and concatenated [clip_l | clip_g] → [B, 77, 2048], as
    SDXLClipModel.encode_token_weights does. Equal to `clip.encode_from_tokens` for the same spliced tokens
    (tested for both families)."""

    def __init__(self, clip):
        self.family = clip_family(clip)
        self.clip = clip
        self.encoders: tuple[str, ...] = tuple(FAMILY_ENCODERS[self.family])
        csm = clip.cond_stage_model
        self.runners = {name: _ClipRunner(clip, getattr(csm, name), ENCODER_TOKEN_KEYS[name])
                        for name in self.encoders}
        first = self.runners["clip_l"]
        self.enc, self.tm, self.end_token = first.enc, first.tm, first.end_token

    @property
    def width(self) -> int:
        """Width of the concatenated context (768 for SD1, 2048 for SDXL)."""
        return sum(r.width for r in self.runners.values())

    def initializer_embedding(self, word: str, encoder: str = "clip_l") -> Tensor:
        runner = self.runners[encoder]
        ids = word_token_ids(self.clip, word, runner.key)
        if not ids:
            raise ValueError(f"the initializer word {word!r} gives no tokens; use a plain word such as 'person'")
        weight = runner.tm.embeddings.token_embedding.weight
        return weight.detach()[torch.tensor(ids, device=weight.device)].float().cpu().clone()

    def initializer_embeddings(self, word: str) -> dict[str, Tensor]:
        """{encoder: [k, C]} for every encoder of the family (what build_generator takes)."""
        return {name: self.initializer_embedding(word, name) for name in self.encoders}

    def prompt(self, template: str, trigger: str, n: int) -> PromptTokens:
        plan = plan_prompt(self.clip, template.replace("{}", trigger), [_Trigger(trigger, n)], 1.0)
        pid = plan.placeholder_ids[0]
        by_encoder = {}
        for name, runner in self.runners.items():
            chunks = plan.tokens[runner.key]
            if len(chunks) != 1:
                raise ValueError(f"training prompt {template!r} is longer than one 77-token chunk; shorten it")
            slots = find_positions(chunks, {pid: n})[pid]
            by_encoder[name] = ([int(t) for t, *_ in chunks[0]], [s.index for s in sorted(slots, key=lambda s: s.index)])
        ids, slots = by_encoder["clip_l"]
        return PromptTokens(ids, slots, self._eos(ids), by_encoder)

    def plain(self, text: str) -> list[int]:
        chunks = self.clip.tokenize(text)["l"]
        if len(chunks) != 1:
            raise ValueError(f"prompt {text!r} is longer than one 77-token chunk")
        return [int(t) for t, *_ in chunks[0]]

    def _eos(self, ids: Sequence[int]) -> int:
        return next(i for i in range(1, len(ids)) if ids[i] == self.end_token)

    def encode(self, ids: Tensor, slots: Sequence[int] | None = None, vectors: Tensor | None = None,
               encoder: str = "clip_l") -> Tensor:
        """One encoder: ids [B, 77] long; vectors [B, n, C] for positions `slots` → [B, 77, C] float32."""
        return self.runners[encoder].run(ids, slots, vectors)

    def encode_prompt(self, prompt: PromptTokens, vectors: dict[str, Tensor]) -> Tensor:
        """The prompt with vectors[encoder] ([B, n, C_enc]) at its identity slots in every encoder → the model's
        context [B, 77, ΣC] (SDXL: [clip_l | clip_g]). All B rows go through each encoder in one forward."""
        outs = []
        for name, runner in self.runners.items():
            ids, slots = prompt.by_encoder[name]
            vec = vectors[name]
            batch = torch.tensor(ids, dtype=torch.long)[None].expand(vec.shape[0], -1)
            outs.append(runner.run(batch, slots, vec))
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


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
    rlast = ref_slots[-1]
    pairs = [(i, i) for i in range(1, first)] + id_pairs
    pairs += [(last + k, rlast + k) for k in range(1, target.eos - last + 1) if rlast + k <= eos_ref]
    if mode == "all":
        if n != m:
            raise ValueError("attention_tokens='all' needs the identity and the reference word to have the same "
                             "token count; use 'words_eos'")
        return list(range(len(target.ids))), list(range(len(target.ids)))
    return [a for a, _ in pairs], [b for _, b in pairs]


def reference_slots(template: str, target: PromptTokens, reference: Sequence[int], word_ids: Sequence[int],
                    word: str) -> list[int]:
    """Positions of the reference word in the reference prompt that pair with the identity's slots.

    Both prompts are the same template, so their tokens agree up to the identity's first slot and the reference
    word must start exactly there — not wherever the word first occurs ("a person, the face of {}" has "person"
    twice). Anything else means the template glues {} to other characters, and the maps would be paired with the
    wrong columns: refused."""
    start = target.slots[0]
    if list(reference[start:start + len(word_ids)]) != list(word_ids) or list(reference[:start]) != target.ids[:start]:
        raise ValueError(f"prompt_templates: in {template!r} the reference word {word!r} does not take the place of "
                         f"{{}}; write {{}} as a separate word, e.g. 'a photo of the face of {{}}'")
    return list(range(start, start + len(word_ids)))


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
    encoding is appended to the keys' context) and an attn2 replace at each loss site that computes the identity columns'
    probabilities and the same-Q reference probabilities (detached). The caller's MODEL is never patched."""

    def __init__(self, model, latent_hw: tuple[int, int], loss_sites: str, context_dim: int,
                 adm: Tensor | None = None):
        self.model = model
        self.clone = model.clone()
        self.latent_hw = latent_hw
        self.adm = adm  # SDXL: the U-Net's `y` input [1, adm_channels] (pooled clip_g + size embeddings)
        self.st = SimpleNamespace(values=None, ref=None, tcols=None, rcols=None, records=[], spy=None,
                                  recording=True)
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
                self.forward(x, sigma, torch.zeros(1, 77, context_dim), None, y=self.adm)
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
            # the reference prompt only needs keys (for its maps): appended to the context alone, so the
            # site's replace below sees k = [prompt | reference] and v = prompt values
            r = st.ref.to(device=context.device, dtype=context.dtype)
            return n, torch.cat([context, r], 1), v
        return n, context, v

    def _replace(self, q, k, v, eo):
        st = self.st
        heads = eo["n_heads"]
        t = v.shape[1]
        if st.ref is None or k.shape[1] == t:
            return _sdpa(q, k, v, heads)
        out, probs = attn_core.attention_with_probs(q, k[:, :t], v, heads, st.tcols)
        ref = attn_core.reference_probs(q, k[:, t:], heads, st.rcols) if st.rcols is not None else None
        if st.recording:  # off while gradient checkpointing recomputes a block (the first pass recorded it)
            st.records.append((eo["block"][0], eo["block"][1], eo.get("block_index", 0), probs, ref))
        return out

    def forward(self, x_t: Tensor, sigma: Tensor, c_k: Tensor, c_v: Tensor | None, ref: Tensor | None = None,
                tcols=None, rcols=None, y: Tensor | None = None):
        st = self.st
        st.values, st.ref, st.tcols, st.rcols, st.records = c_v, ref, tcols, rcols, []
        device = self.model.load_device
        to = dict(self.clone.model_options.get("transformer_options", {}))
        sigma = sigma.to(device)
        to["cond_or_uncond"] = [0]
        to["sigmas"] = sigma
        extra = {} if y is None else {"y": y.to(device).expand(x_t.shape[0], -1)}
        try:
            # no autocast: the stand-ins already hold the compute dtype and apply_model casts the inputs to it, and
            # an autocast region would also pull the loss maps' float32 softmax back to low precision
            out = self.clone.model.apply_model(x_t.to(device), sigma, c_crossattn=c_k.to(device),
                                               transformer_options=to, **extra)
            return out, list(st.records)
        finally:
            st.values = st.ref = None
            st.records = []


    @contextlib.contextmanager
    def checkpointing(self, enabled: bool = True):
        """Gradient checkpointing for the duration: every transformer block and res block of the U-Net runs under
        torch.utils.checkpoint (non-reentrant), so its activations are recomputed in backward instead of kept.

        The recomputation runs after `forward` returned, so each wrapped call snapshots this step's K/V/reference
        state and restores it (with attention recording off, so the loss maps are not recorded twice) while the
        block is recomputed. Blocks whose host forward adds residuals in place (0.0.1) run both passes under
        `_OutOfPlaceAdds` (same arithmetic, new tensors), because a recomputation would otherwise overwrite the
        tensors it just saved. Instance attributes are restored on exit (temporary_forwards)."""
        st = self.st

        def make_forward(mod: nn.Module) -> Callable | None:
            if not enabled or type(mod).__name__ not in _CHECKPOINT_CLASSES:
                return None
            inplace = _adds_residual_in_place(type(mod))
            base = types.MethodType(type(mod).forward, mod) if inplace else mod.forward
            return _checkpointed(base, mod.forward, inplace, st)

        with temporary_forwards(self.model.model.diffusion_model, make_forward) as count:
            yield count


_CHECKPOINT_CLASSES = frozenset({"BasicTransformerBlock", "ResBlock"})


class _OutOfPlaceAdds(TorchFunctionMode):
    """`x += n` / `x.add_(n)` become `x = x + n` (for recomputed blocks whose host code adds in place)."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.__iadd__ or func is Tensor.add_:
            return torch.add(*args, **kwargs)
        return func(*args, **kwargs)


def _checkpointed(base, plain, inplace: bool, st):
    def call(a, k):
        if inplace:
            with _OutOfPlaceAdds():
                return base(*a, **k)
        return base(*a, **k)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return plain(*args, **kwargs)
        snapshot = (st.values, st.ref, st.tcols, st.rcols)
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                return call(a, k)
            live = (st.values, st.ref, st.tcols, st.rcols, st.recording)
            st.values, st.ref, st.tcols, st.rcols = snapshot
            st.recording = False
            try:
                return call(a, k)
            finally:
                st.values, st.ref, st.tcols, st.rcols, st.recording = live

        return _checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


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
        identity = _Trigger(trigger, vectors_per_token, initializer)
        with torch.no_grad():
            for template, t in zip(settings.templates, ref_texts):
                self.ref_conds.append(clip.encode_from_tokens(clip.tokenize(t)).float().cpu().clone())
                # SDXL's y: the same rule as SeFi Apply Identity (prompt_encoding.initializer_conditioning)
                _, pooled = initializer_conditioning(clip, template.replace("{}", trigger), [identity])
                self.adm.append(adm_input(model, pooled, res))
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
        sigma = self.sigmas[t].to(device)
        x0d = self.model.model.process_latent_in(x0.to(device))
        noise = noise.to(device)
        x_t = self.ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0d)
        ref = self.ref_conds[j].expand(b, -1, -1) if capture else None
        tcols, rcols = columns[j] if capture else (None, None)
        denoised, records = self.unet.forward(x_t, sigma, c_k, c_v, ref, tcols, rcols, y=self.adm[j])
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
            return losses.reference_attention_loss([r[3] for r in records], [r[4] for r in records],
                                                   reduction=s.attention_reduction)
        grids = [attn_core.mask_to_grid(m.to(r[3].device), r[3].shape[2], self.latent_hw) for r in records]
        return losses.mask_attention_loss([r[3] for r in records], grids, mode=s.mask_loss_mode)

    def __call__(self, tokens: dict[str, Tensor], rng: torch.Generator, step: int):
        s = self.settings
        j, x0, m, t, noise = self._draw(rng, s.batch_size)
        capture = s.attention_loss != "off" and s.attention_weight > 0
        columns = self.columns if s.attention_loss == "reference" else self.id_columns
        diff, records, m = self._forward(tokens, j, x0, m, t, noise, capture, columns)
        parts = {"diffusion": float(diff.detach()), "t": float(t.float().mean())}
        terms = {"diffusion": diff}
        if capture:
            att = self._attention_loss(records, m)
            parts["attention"] = float(att.detach())
            terms["attention"] = s.attention_weight * att
        return sum(terms.values()), parts, terms

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
