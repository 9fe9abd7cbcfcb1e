"""insightface backend: SCRFD detector, 5 points, 106 landmarks and ArcFace-512 identity from a model pack.

Quirks fenced here (nothing else in the pack imports insightface):
- ``FaceAnalysis(name, root)`` downloads a missing pack from GitHub at once (impossible offline) and, without
  ``root=``, writes ``~/.insightface``. We always pass ``root=`` and check the pack's .onnx files *first*.
- Packs live in ``<root>/models/<pack>/*.onnx``; ComfyUI's root is ``models/insightface``. The release zips
  often unpack as ``<pack>/<pack>/*.onnx``, which FaceAnalysis reports as ``assert 'detection' in self.models``.
- insightface wants BGR images (OpenCV order); the pack hands us RGB.
- The detector runs at a fixed input size (640); a face filling the whole frame can be missed, so a miss is
  retried once on a copy padded with gray.
- Providers: CUDAExecutionProvider only when onnxruntime offers it and the requested device is CUDA.
- Licence: the buffalo_l / antelopev2 weights are for non-commercial research use only (see docs/faces.md).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceBackendUnavailable
from ..records import Face

log = logging.getLogger(__name__)

NAME = "insightface"
DESCRIPTOR_KIND = "insightface-arcface-512"
LANDMARKS_KIND = "insightface-106"

#: The .onnx files of the packs ComfyUI face nodes use.
KNOWN_PACKS: dict[str, tuple[str, ...]] = {
    "antelopev2": ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"),
    "buffalo_l": ("1k3d68.onnx", "2d106det.onnx", "det_10g.onnx", "genderage.onnx", "w600k_r50.onnx"),
}
#: The detector of each known pack: FaceAnalysis cannot start without it.
DETECTOR_FILES: dict[str, str] = {"antelopev2": "scrfd_10g_bnkps.onnx", "buffalo_l": "det_10g.onnx"}
DEFAULT_PACK = "antelopev2"
DET_SIZE = 640
PAD_RETRY_FRACTION = 0.25


def install_hint() -> str:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"pip install insightface onnxruntime into the Python that runs ComfyUI ({sys.executable}, Python "
        f"{version}); use onnxruntime-gpu instead of onnxruntime for CUDA, never both. On Windows, if pip tries to "
        "compile insightface, install a prebuilt insightface wheel for this Python version. Or pick the 'dlib' "
        "backend, which needs no model download"
    )


def insightface_importable() -> bool:
    """Whether ``insightface`` and ``onnxruntime`` can be imported, checked without importing them."""
    return all(importlib.util.find_spec(name) is not None for name in ("insightface", "onnxruntime"))


def _onnx_names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.glob("*.onnx") if p.is_file())
    except OSError:
        return []


@dataclass(frozen=True)
class PackLocation:
    """A usable pack: ``root`` is what FaceAnalysis gets as ``root=`` (the pack is ``root/models/<pack>``)."""

    root: Path
    pack: str
    pack_dir: Path
    onnx_files: tuple[str, ...]


def _usable(pack: str, folder: Path) -> tuple[str, ...] | None:
    names = _onnx_names(folder)
    if not names:
        return None
    detector = DETECTOR_FILES.get(pack)
    if detector is not None and detector not in names:
        return None
    return tuple(names)


def find_insightface_pack(pack: str, roots: Iterable[str | Path]) -> PackLocation | None:
    """The first root holding ``<root>/models/<pack>/*.onnx`` (with the pack's detector), else None.

    A root may also be the ``models`` folder itself (``.../insightface/models``); FaceAnalysis then gets its
    parent. Never imports insightface.
    """
    for raw in roots:
        root = Path(raw).expanduser()
        candidates = [(root, root / "models" / pack)]
        if root.name == "models":  # the caller passed .../insightface/models itself
            candidates.append((root.parent, root / pack))
        for fa_root, pack_dir in candidates:
            names = _usable(pack, pack_dir)
            if names:
                return PackLocation(root=fa_root, pack=pack, pack_dir=pack_dir, onnx_files=names)
    return None


def diagnose_insightface_pack(pack: str, roots: Sequence[str | Path]) -> str:
    """Explain why ``pack`` was not found in ``roots`` and exactly what to create or move."""
    roots = [Path(r).expanduser() for r in roots]
    expected = KNOWN_PACKS.get(pack)
    files = ", ".join(expected) if expected else "the pack's .onnx files (at least its detector)"
    if not roots:
        return (
            f"insightface model pack '{pack}' not found: no insightface model folder was given. In ComfyUI that "
            f"is ComfyUI/models/insightface; create ComfyUI/models/insightface/models/{pack}/ holding {files}."
        )
    problems: list[str] = []
    for root in roots:
        pack_dir = root / "models" / pack
        nested = pack_dir / pack
        if _onnx_names(nested) and not _onnx_names(pack_dir):
            problems.append(
                f"{pack_dir} contains a nested folder {nested} with the .onnx files (the release zip unpacks into "
                f"an extra '{pack}' folder). Move the .onnx files from {nested} up into {pack_dir} and delete the "
                "empty inner folder."
            )
            continue
        names = _onnx_names(pack_dir)
        if names:
            detector = DETECTOR_FILES.get(pack, "")
            problems.append(
                f"{pack_dir} has {', '.join(names)} but not the detector {detector}; the pack is incomplete. "
                f"Re-extract {pack}.zip so the folder holds {files}."
            )
            continue
        zipped = root / "models" / f"{pack}.zip"
        if zipped.is_file():
            problems.append(f"{zipped} is still zipped: extract it so that {pack_dir} holds {files}.")
            continue
        flat = root / pack
        if _onnx_names(flat) and root.name != "models":
            problems.append(
                f"The pack is in {flat}, one level too high: move that folder to {pack_dir} "
                f"(insightface looks in <insightface folder>/models/<pack>)."
            )
            continue
        loose = [n for n in _onnx_names(root / "models") if expected and n in expected]
        if loose:
            problems.append(
                f"{root / 'models'} holds {', '.join(loose)} directly: move them into {pack_dir}."
            )
            continue
    searched = ", ".join(str(r / "models" / pack) for r in roots)
    first = roots[0] / "models" / pack
    message = f"insightface model pack '{pack}' not found (looked in {searched})."
    if problems:
        message += " " + " ".join(problems)
    else:
        message += (
            f" It cannot be downloaded automatically here. On a machine with internet, get {pack}.zip from the "
            f"insightface GitHub releases (v0.7) and extract it so that {first} holds {files}."
        )
    message += " Or use the 'dlib' backend, which works offline."
    return message


def locate_insightface_pack(pack: str, roots: Sequence[str | Path]) -> PackLocation:
    """Like :func:`find_insightface_pack`, but raises an actionable :class:`FaceBackendUnavailable`."""
    found = find_insightface_pack(pack, roots)
    if found is None:
        raise FaceBackendUnavailable(diagnose_insightface_pack(pack, roots))
    return found


def _available_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    try:
        return list(onnxruntime.get_available_providers())
    except Exception:  # a broken GPU build can fail here; CPU still works
        return []


def choose_providers(device: str = "cpu") -> tuple[list[str], int]:
    """onnxruntime providers and insightface ``ctx_id`` for a torch-style device string ("cpu", "cuda",
    "cuda:1"): CUDA only when requested *and* onnxruntime offers it, else CPU (ctx_id -1)."""
    device = str(device or "cpu").lower()
    if device.startswith("cuda") and "CUDAExecutionProvider" in _available_providers():
        index = int(device.split(":", 1)[1]) if ":" in device and device.split(":", 1)[1].isdigit() else 0
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], index
    return ["CPUExecutionProvider"], -1


_apps: dict[tuple, Any] = {}
_apps_lock = threading.Lock()


def _create_app(root: Path, pack: str, providers: list[str], ctx_id: int, det_size: int) -> Any:
    """Build and prepare a FaceAnalysis (the only place insightface is imported)."""
    try:
        from insightface.app import FaceAnalysis
    except ImportError as exc:
        raise FaceBackendUnavailable(f"The insightface backend needs insightface: {install_hint()}. ({exc})") from exc
    kwargs: dict[str, Any] = {"providers": providers}
    if ctx_id > 0:
        kwargs["provider_options"] = [{"device_id": ctx_id}, {}]
    app = FaceAnalysis(
        name=pack,
        root=str(root),
        allowed_modules=["detection", "landmark_2d_106", "recognition"],
        **kwargs,
    )
    app.prepare(ctx_id=ctx_id, det_size=(det_size, det_size))
    return app


def _get_app(location: PackLocation, providers: list[str], ctx_id: int, det_size: int) -> Any:
    key = (str(location.root.resolve()), location.pack, tuple(providers), ctx_id, det_size)
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            try:
                app = _create_app(location.root, location.pack, providers, ctx_id, det_size)
            except FaceBackendUnavailable:
                raise
            except Exception as exc:
                if "CUDAExecutionProvider" not in providers:
                    raise
                # CUDA/cuDNN mismatches of onnxruntime-gpu are common; the CPU still gives the same faces.
                log.warning("insightface on CUDA failed (%s); falling back to the CPU provider", exc)
                app = _create_app(location.root, location.pack, ["CPUExecutionProvider"], -1, det_size)
            _apps[key] = app
        return app


def _to_face(raw: Any, descriptors: bool) -> Face:
    landmarks = getattr(raw, "landmark_2d_106", None)
    embedding = getattr(raw, "embedding", None) if descriptors else None
    return Face(
        bbox=tuple(float(v) for v in np.asarray(raw.bbox, dtype=np.float64)[:4]),  # type: ignore[arg-type]
        score=float(getattr(raw, "det_score", 1.0)),
        kps=np.asarray(raw.kps, dtype=np.float32),
        landmarks=None if landmarks is None else np.asarray(landmarks, dtype=np.float32),
        landmarks_kind=None if landmarks is None else LANDMARKS_KIND,
        descriptor=None if embedding is None else np.asarray(embedding, dtype=np.float32),
        descriptor_kind=None if embedding is None else DESCRIPTOR_KIND,
        backend=NAME,
    )


class InsightFaceBackend:
    """insightface FaceAnalysis on a local pack. Checks the pack on construction; loads it on first detect."""

    name = NAME

    def __init__(
        self,
        roots: Sequence[str | Path],
        pack: str = DEFAULT_PACK,
        device: str = "cpu",
        det_size: int = DET_SIZE,
    ) -> None:
        if not insightface_importable():
            raise FaceBackendUnavailable(
                f"The insightface backend needs insightface and onnxruntime: {install_hint()}."
            )
        self.location = locate_insightface_pack(pack, roots)
        self.providers, self.ctx_id = choose_providers(device)
        self.det_size = int(det_size)
        self.name = f"{NAME}:{pack}"

    def detect(self, image: np.ndarray, descriptors: bool = True) -> list[Face]:
        """Faces in an ``[H, W, 3]`` uint8 RGB image (converted to BGR for insightface)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"insightface backend expects [H, W, 3] uint8 RGB, got {image.dtype} {image.shape}")
        app = _get_app(self.location, self.providers, self.ctx_id, self.det_size)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        raw = app.get(bgr)
        if raw:
            return [_to_face(r, descriptors) for r in raw]
        height, width = bgr.shape[:2]
        pad = max(1, int(round(max(height, width) * PAD_RETRY_FRACTION)))
        padded = np.full((height + 2 * pad, width + 2 * pad, 3), 128, dtype=np.uint8)
        padded[pad : pad + height, pad : pad + width] = bgr
        return [_to_face(r, descriptors).shifted(-pad, -pad) for r in app.get(padded)]
