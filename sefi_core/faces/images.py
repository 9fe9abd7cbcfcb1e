"""Image plumbing between ComfyUI-style float tensors and the uint8 RGB arrays detectors want.

A ComfyUI IMAGE is a float tensor ``[B, H, W, C]`` in 0..1 with C = 3 (sometimes 1 or 4); a batch of mixed
sizes arrives as a list of such tensors. Nothing here imports torch: tensors are converted by duck typing
(``.detach().cpu()``), so the core works with numpy arrays too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Gray level (0..1) that transparent pixels are composited onto. Detectors are trained on opaque photos and
#: the RGB under alpha = 0 is arbitrary (often black or leftover colour), so a neutral gray adds no edges.
ALPHA_BACKGROUND = 0.5


def _to_numpy(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):  # a torch tensor; bfloat16/float16 go through float32
        tensor = image.detach().cpu()
        if getattr(tensor, "is_floating_point", lambda: False)():
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(image)


def split_batch(images: Any) -> list[np.ndarray]:
    """Turn a batch ``[B,H,W,C]``, a single ``[H,W,C]``/``[H,W]`` image, or a list of those into single images.

    A list may mix sizes (ComfyUI's way of passing images that cannot be stacked).
    """
    if isinstance(images, (list, tuple)):
        out: list[np.ndarray] = []
        for item in images:
            out.extend(split_batch(item))
        return out
    array = _to_numpy(images)
    if array.ndim == 4:
        return [array[i] for i in range(array.shape[0])]
    if array.ndim in (2, 3):
        return [array]
    raise ValueError(
        f"Expected an image [H,W,C], a batch [B,H,W,C] or a list of those, got an array of shape {array.shape}"
    )


def to_rgb_float(image: Any) -> np.ndarray:
    """Return ``[H, W, 3]`` float32 RGB in 0..1 from gray, gray+alpha, RGB or RGBA input.

    Accepts float arrays in 0..1 (values outside are clipped, NaN becomes 0) or uint8/uint16 arrays.
    Alpha is composited onto :data:`ALPHA_BACKGROUND` gray; gray is repeated into three channels.
    """
    array = _to_numpy(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"Expected an image [H,W,C] with C in 1..4 (gray, gray+alpha, RGB, RGBA), got shape {array.shape}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"Image has no pixels (shape {array.shape})")
    if array.dtype == np.uint8:
        data = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        data = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        data = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        data = np.clip(data, 0.0, 1.0)
    elif array.dtype == np.bool_:
        data = array.astype(np.float32)
    else:
        raise TypeError(f"Unsupported image dtype {array.dtype}: pass float 0..1 (a ComfyUI IMAGE) or uint8")
    channels = data.shape[2]
    if channels in (2, 4):
        alpha = data[:, :, -1:]
        data = data[:, :, :-1] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
    if data.shape[2] == 1:
        data = np.repeat(data, 3, axis=2)
    return np.ascontiguousarray(data, dtype=np.float32)


def float_to_uint8(image: np.ndarray) -> np.ndarray:
    """Round float 0..1 pixels to uint8 (what dlib and insightface consume)."""
    return np.ascontiguousarray(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8))


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Return ``[H, W, 3]`` uint8 RGB from any input :func:`to_rgb_float` accepts."""
    array = _to_numpy(image)
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array)
    return float_to_uint8(to_rgb_float(array))


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """Repeat a ``[H, W]`` or ``[H, W, 1]`` gray image into three channels, keeping its dtype."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] != 1:
        raise ValueError(f"Expected a gray image [H,W] or [H,W,1], got shape {array.shape}")
    return np.repeat(array, 3, axis=2)


def image_sizes(images: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """``(height, width)`` of each image."""
    return [(int(im.shape[0]), int(im.shape[1])) for im in images]
