"""The U-Net step of training: a private clone of the MODEL whose cross-attentions take keys from the K
encoding and values from the V encoding, record the identity and reference maps at the loss sites, and can
recompute blocks in backward (gradient checkpointing)."""
from __future__ import annotations

import contextlib
import functools
import math
import shutil
import types
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint as _checkpoint

from .frozen import adds_residual_in_place, temporary_forwards
from .. import host
from ...sefi_core import attention as attn_core


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
        self._compiled: set[int] = set()  # ids of the blocks `compiled` wraps, while it is active
        self._indices: dict[tuple, attn_core.ColumnIndex] = {}  # key-column indices by (columns, device)
        self.st = SimpleNamespace(values=None, ref=None, tcols=None, rcols=None, records=[], spy=None)
        self.clone.set_model_attn2_patch(self._patch)
        self.sites = self._discover(context_dim)
        self.loss_keys = select_sites(self.sites, latent_hw, loss_sites)
        for key in self.loss_keys:
            self.clone.set_model_attn2_replace(self._replace, key[0], key[1], key[2])

    def _discover(self, context_dim: int) -> dict[tuple, int]:
        """Run one no-grad forward with a spy to read the cross-attention sites (key -> query count)."""
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
        st.records.append((eo["block"][0], eo["block"][1], eo.get("block_index", 0), probs, ref))
        return out

    def forward(self, x_t: Tensor, sigma: Tensor, c_k: Tensor, c_v: Tensor | None, ref: Tensor | None = None,
                tcols=None, rcols=None, y: Tensor | None = None):
        st = self.st
        device = self.model.load_device
        # the loss sites' key columns as device tensors, built once per prompt: an index made from a list at every
        # site would be a host-to-device copy, and on a GPU each blocking copy waits for all queued work
        st.values, st.ref, st.records = c_v, ref, []
        st.tcols, st.rcols = self._device_index(tcols, device), self._device_index(rcols, device)
        if self._compiled:
            # a new step: the CUDA graphs may reuse the previous step's output memory (whose loss is done with)
            torch.compiler.cudagraph_mark_step_begin()
        to = dict(self.clone.model_options.get("transformer_options", {}))
        sigma = sigma.to(device, non_blocking=True)
        to["cond_or_uncond"] = [0]
        to["sigmas"] = sigma
        extra = {} if y is None else {"y": y.to(device, non_blocking=True).expand(x_t.shape[0], -1)}
        try:
            # no autocast: the stand-ins already hold the compute dtype and apply_model casts the inputs to it, and
            # an autocast region would also pull the loss maps' float32 softmax back to low precision
            out = self.clone.model.apply_model(x_t.to(device, non_blocking=True), sigma,
                                               c_crossattn=c_k.to(device, non_blocking=True),
                                               transformer_options=to, **extra)
            return out, list(st.records)
        finally:
            st.values = st.ref = None
            st.records = []

    def _device_index(self, columns, device) -> attn_core.ColumnIndex | None:
        if columns is None or isinstance(columns, attn_core.ColumnIndex):
            return columns
        key = (tuple(int(c) for c in columns), str(device))
        index = self._indices.get(key)
        if index is None:
            with torch.inference_mode(False):  # saved for backward by index_select: no inference tensor
                index = self._indices[key] = attn_core.column_index(key[0], device)
        return index

    @contextlib.contextmanager
    def checkpointing(self, enabled: bool = True):
        """Gradient checkpointing for the duration: every transformer block and res block of the U-Net runs under
        torch.utils.checkpoint (non-reentrant), so its activations are recomputed in backward instead of kept.

        The recomputation runs after `forward` returned, so each wrapped call snapshots this step's K/V/reference
        state and restores it (with a scratch list for the maps, so the loss maps are not recorded twice) while the
        block is recomputed. Blocks whose host forward adds residuals in place (0.0.1) run both passes under
        `_OutOfPlaceAdds` (same arithmetic, new tensors), because a recomputation would otherwise overwrite the
        tensors it just saved. Instance attributes are restored on exit (temporary_forwards)."""
        st = self.st

        def make_forward(mod: nn.Module) -> Callable | None:
            if not enabled or type(mod).__name__ not in _CHECKPOINT_CLASSES:
                return None
            # a block compiled by `compiled` already runs out of place: checkpoint its compiled forward as it is
            inplace = adds_residual_in_place(type(mod)) and id(mod) not in self._compiled
            base = types.MethodType(type(mod).forward, mod) if inplace else mod.forward
            return _checkpointed(base, mod.forward, inplace, st)

        with temporary_forwards(self.model.model.diffusion_model, make_forward) as count:
            yield count


    @contextlib.contextmanager
    def compiled(self, enabled: bool = True):
        """torch.compile every transformer block and res block of the U-Net for the duration (regional compilation:
        each block is one graph, forward and backward, with this step's K/V patches traced into it).

        Mode: "reduce-overhead" (CUDA graphs: the step is launch-bound there) on CUDA, the default mode elsewhere.
        The blocks' attention is the host's SDPA function meanwhile (host.sdpa_unet_attention). The first step
        compiles (the log says so); later steps reuse the graphs, as long as the shapes stay the same.
        Blocks whose host forward adds residuals in place (0.0.1) are compiled from their class forward under
        `_OutOfPlaceAdds` (same arithmetic, new tensors): an in-place add on a tensor saved for backward is what
        AOTAutograd refuses. Enter it before `checkpointing`, so a recomputed block runs the compiled code too."""
        if not enabled:
            yield 0
            return
        check_compile_available(self.model.load_device)
        mode = compile_mode(self.model.load_device)

        def make_forward(mod: nn.Module) -> Callable | None:
            if type(mod).__name__ not in _CHECKPOINT_CLASSES:
                return None
            self._compiled.add(id(mod))
            if adds_residual_in_place(type(mod)):
                forward = types.MethodType(type(mod).forward, mod)
                return torch.compile(functools.partial(_out_of_place_call, forward), mode=mode, dynamic=False)
            return torch.compile(mod.forward, mode=mode, dynamic=False)

        try:
            # Compiling happens at the first call, so the settings below only need to be in force by then.
            # One code object serves every block of a class, and each block (its own patches and options) needs its
            # own compiled entry: without room for all of them dynamo would quietly run the rest eagerly.
            # The gradient-share steps backpropagate once per loss term through the same graph (retain_graph,
            # sefi_core.grad_share). Donated buffers refuse that outright, and Inductor's in-place reuse of the
            # backward's input buffers silently corrupts it (torch 2.13, both hosts: the second backward's
            # gradient was 6 % off); both are turned off for the compiled blocks.
            with temporary_forwards(self.model.model.diffusion_model, make_forward) as blocks, \
                    torch._dynamo.config.patch(recompile_limit=max(8, 2 * blocks),
                                               accumulated_recompile_limit=max(256, 4 * blocks)), \
                    torch._functorch.config.patch(donated_buffer=False), \
                    torch._inductor.config.patch(inplace_buffers=False), host.sdpa_unet_attention():
                yield blocks
        finally:
            self._compiled.clear()


def compile_mode(device) -> str:
    return "reduce-overhead" if getattr(device, "type", str(device)) == "cuda" else "default"


def check_compile_available(device) -> None:
    """Refuse compile_unet early, with what to install, where torch.compile cannot build code here."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise RuntimeError("compile_unet on a CUDA GPU needs Triton: pip install triton (on Windows: pip install "
                               "triton-windows), or set compile_unet to false")
    elif kind == "cpu":
        if not any(shutil.which(c) for c in ("g++", "clang++", "c++", "cl")):
            raise RuntimeError("compile_unet on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on PATH; "
                               "install one or set compile_unet to false")
    else:
        raise RuntimeError(f"compile_unet is supported on CUDA GPUs and the CPU, not on {kind}; set compile_unet "
                           f"to false")


def _out_of_place_call(forward: Callable, *args, **kwargs):
    with _OutOfPlaceAdds():
        return forward(*args, **kwargs)


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
            live = (st.values, st.ref, st.tcols, st.rcols, st.records)
            st.values, st.ref, st.tcols, st.rcols = snapshot
            # the first pass recorded the maps; a scratch list (not a flag) keeps a compiled block's code the same
            st.records = []
            try:
                return call(a, k)
            finally:
                st.values, st.ref, st.tcols, st.rcols, st.records = live

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
