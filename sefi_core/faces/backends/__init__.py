"""Face backends behind one small protocol, and the rule that picks one for ``backend="auto"``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import FaceBackendUnavailable
from ..records import Face
from . import dlib_backend, insightface_backend

BACKEND_NAMES: tuple[str, ...] = ("auto", "insightface", "dlib")


@runtime_checkable
class FaceBackend(Protocol):
    """What the pipeline needs from a backend: a name and faces for a uint8 RGB image."""

    name: str

    def detect(self, image: np.ndarray, descriptors: bool = True) -> list[Face]: ...


def resolve_backend_name(
    name: str = "auto",
    insightface_roots: Sequence[str | Path] = (),
    insightface_pack: str = insightface_backend.DEFAULT_PACK,
) -> tuple[str, str]:
    """``(backend, reason)``: ``auto`` means insightface when the package imports and the pack is on disk,
    otherwise dlib. Explicit names pass through."""
    key = name.strip().lower()
    if key not in BACKEND_NAMES:
        raise ValueError(f"Unknown face backend {name!r}: use one of {', '.join(BACKEND_NAMES)}")
    if key != "auto":
        return key, f"{key} requested"
    if not insightface_backend.insightface_importable():
        return "dlib", "auto: insightface/onnxruntime not installed, using dlib"
    if insightface_backend.find_insightface_pack(insightface_pack, insightface_roots) is None:
        return "dlib", f"auto: insightface pack '{insightface_pack}' not found, using dlib"
    return "insightface", f"auto: insightface pack '{insightface_pack}' found"


def get_backend(
    name: str = "auto",
    *,
    insightface_roots: Sequence[str | Path] = (),
    insightface_pack: str = insightface_backend.DEFAULT_PACK,
    device: str = "cpu",
    dlib_model_dir: str | Path | None = None,
    min_score: float | None = None,
) -> FaceBackend:
    """A ready backend. Cheap to call per execution: the models themselves are cached by path/pack."""
    chosen, _ = resolve_backend_name(name, insightface_roots, insightface_pack)
    if chosen == "insightface":
        return insightface_backend.InsightFaceBackend(insightface_roots, insightface_pack, device=device)
    try:
        return dlib_backend.DlibBackend(model_dir=dlib_model_dir, min_score=min_score)
    except FaceBackendUnavailable as exc:
        if name.strip().lower() == "auto":
            raise FaceBackendUnavailable(
                f"No face backend is usable. {str(exc).rstrip('.')}. Alternatively: pip install insightface onnxruntime (or "
                f"onnxruntime-gpu for CUDA, never both) into the same Python, and put the '{insightface_pack}' "
                f"pack's .onnx files in ComfyUI/models/insightface/models/{insightface_pack}/"
            ) from exc
        raise


__all__ = [
    "BACKEND_NAMES",
    "FaceBackend",
    "get_backend",
    "resolve_backend_name",
    "dlib_backend",
    "insightface_backend",
]
