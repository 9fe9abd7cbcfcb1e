"""Let PyPI's torchvision import beside the CPU-only torch wheel used by the embedded host.

PyPI's torchvision wheels are CUDA builds whose compiled ops do not load next to torch's CPU wheel, so
`import torchvision` dies registering a fake kernel for `torchvision::nms`. ComfyUI imports torchvision in
`comfy.sd` and its server. Defining the two missing ops (with a plain-torch NMS) is enough for everything the
host uses; only the ROI ops stay unavailable. Import this module before anything imports torchvision. It does
nothing when torchvision's own ops load (a user's normal ComfyUI install).
"""
from __future__ import annotations

import importlib.util

import torch


def _torchvision_ops_load() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute access is the probe
        return True
    except (AttributeError, RuntimeError):
        pass
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return True  # nothing to fix
    try:
        import torchvision.extension  # noqa: F401  (loads the compiled ops when they are compatible)
        torch.ops.torchvision.nms  # noqa: B018
        return True
    except (AttributeError, RuntimeError, OSError, ImportError):
        return False


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = scores.argsort(descending=True)
    keep: list[int] = []
    x0, y0, x1, y1 = boxes.unbind(1)
    areas = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)).clamp(min=0)
        h = (torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


_LIBRARY: torch.library.Library | None = None


def install() -> bool:
    """Define the missing ops if needed; returns True when the shim was installed."""
    global _LIBRARY
    if _LIBRARY is not None or _torchvision_ops_load():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms, "CPU")
    lib.impl("qnms", _nms, "CPU")
    _LIBRARY = lib
    return True


install()
