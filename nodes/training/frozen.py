"""Frozen weights for training through the host's models: ordinary-tensor stand-ins, safe in-place residuals,
widened CLIP linears, the U-Net's compute dtype and the training context that sets all of it up and undoes it.

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
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import host

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in PRECISION_DTYPES.items()}


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


def adds_residual_in_place(cls: type) -> bool:
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
    if not adds_residual_in_place(type(mod)):
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


PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_memory_bytes(device) -> int | None:
    """This run's peak since reset_peak_memory: on CUDA the tensors' peak; on the CPU the process's peak resident
    memory (Linux's VmHWM, which reset_peak_memory set back to the memory in use then). None where no per-run peak
    can be had (the CPU on other systems, or a kernel refusing the reset): getrusage's ru_maxrss is the process's
    lifetime maximum, which after one large run would be recorded for every later identity."""
    if getattr(device, "type", "") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if not _cpu_peak_reset[0]:
        return None
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


_cpu_peak_reset = [False]


def reset_peak_memory(device) -> None:
    """Start this run's peak: CUDA's peak statistics, or on Linux the process's resident-memory high-water mark
    (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    if getattr(device, "type", "") == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PROC_CLEAR_REFS.write_text("5")
        _cpu_peak_reset[0] = True
    except OSError:
        _cpu_peak_reset[0] = False


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
