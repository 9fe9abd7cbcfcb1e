"""Face mask and aligned face crops (SeFiFaceMask): a thin wrapper around sefi_core.faces.build_face_outputs.

The face core is imported on first use, not with this module: it needs opencv (and dlib or insightface), and a
missing package must turn into an error on this node, not take every node of the pack down at load time.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict

import numpy as np
import torch

from . import host
from .edges import checked_inputs

log = logging.getLogger(__name__)

CATEGORY = "SeFi-IDE"
# The widgets' choices. They mirror sefi_core.faces (BACKEND_NAMES, SELECT_MODES, MASK_SHAPES with the UI
# spelling "landmark hull", KNOWN_PACKS, NO_FACE_MODES); a test keeps them in step.
BACKENDS = ("auto", "insightface", "dlib")
WHICH_FACE = ("largest", "index", "all")
MASK_SHAPES = ("box", "ellipse", "landmark hull")
INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l")
NO_FACE = ("skip", "error")
MAX_CROP = 4096
OPENCV_HINT = "pip install opencv-python-headless into the Python that runs ComfyUI, then restart ComfyUI"
# The PyPI distributions that all install the same `cv2` folder (README, Troubleshooting: broken cv2).
OPENCV_VARIANTS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")

host.ensure_model_folder(host.INSIGHTFACE_FOLDER, host.INSIGHTFACE_EXTENSIONS)


def opencv_hint(installed=None) -> str:
    """What to do when `import cv2` fails: install one OpenCV distribution, or, when several share the cv2
    folder (another pack asked for opencv-python next to our headless one), keep exactly one."""
    if installed is None:
        from importlib import metadata
        installed = []
        for name in OPENCV_VARIANTS:
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            installed.append(name)
    if not installed:
        return OPENCV_HINT
    # A contrib build is a superset that another pack may rely on; otherwise headless (no GUI libraries needed).
    keep = next((n for n in installed if "contrib" in n), "opencv-python-headless")
    why = (f"{installed[0]} is installed but cv2 does not import (a broken install or a missing system library)"
           if len(installed) == 1 else
           f"{', '.join(installed)} are all installed; they share one cv2 folder and break each other")
    return (f"{why}. pip uninstall -y {' '.join(installed)}, then pip install {keep} into the Python that runs "
            "ComfyUI, then restart ComfyUI")


def _cv2_imports() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:  # not installed, or a broken mix of OpenCV packages / missing system libraries
        return False
    return True


def face_core():
    """sefi_core.faces, or an error that says which package to install."""
    try:
        from ..sefi_core import faces
    except ImportError as exc:
        hint = opencv_hint() if not _cv2_imports() else ("pip install -r requirements.txt (the pack's folder) into "
                                                         "the Python that runs ComfyUI, then restart ComfyUI")
        raise RuntimeError(f"SeFi-IDE cannot load its face code: {exc}. Fix: {hint}.") from exc
    return faces


# Detections by (backend, image content): re-running the node with another mask shape, grow, feather, crop or
# selection reuses them. Bounded, shared by all node instances (host.run and the executor create new ones).
_CACHE_SIZE = 32
_detections: OrderedDict[tuple, list] = OrderedDict()
_detections_lock = threading.Lock()


def _backend_key(engine) -> tuple:
    """What makes two backend objects give the same faces (name, model files, thresholds, pack folder…)."""
    state = getattr(engine, "__dict__", None)
    if state is None:
        return (type(engine).__qualname__, id(engine))
    return (type(engine).__qualname__, repr(sorted((k, repr(v)) for k, v in state.items())))


def detect_cached(engine, rgb: np.ndarray, descriptors: bool) -> list:
    digest = hashlib.blake2b(np.ascontiguousarray(rgb).tobytes(), digest_size=16).hexdigest()
    key = (_backend_key(engine), bool(descriptors), rgb.shape, digest)
    with _detections_lock:
        if key in _detections:
            _detections.move_to_end(key)
            return list(_detections[key])
    faces = engine.detect(rgb, descriptors=descriptors)
    with _detections_lock:
        _detections[key] = list(faces)
        while len(_detections) > _CACHE_SIZE:
            _detections.popitem(last=False)
    return list(faces)


def make_backend(core, options):
    """options.make_backend(), except that an explicit insightface request reports a missing package *and* a
    missing pack in one message (the pack's message names the exact folder to create)."""
    if options.backend == "insightface":
        from ..sefi_core.faces.backends import insightface_backend
        problems = []
        if not core.insightface_importable():
            problems.append(f"The insightface backend needs insightface and onnxruntime: "
                            f"{insightface_backend.install_hint()}.")
        if core.find_insightface_pack(options.insightface_pack, options.insightface_roots) is None:
            problems.append(core.diagnose_insightface_pack(options.insightface_pack, options.insightface_roots))
        if problems:
            raise core.FaceBackendUnavailable(" ".join(problems))
    return options.make_backend()


class SeFiFaceMask:
    DESCRIPTION = ("Find faces in each image and return a face MASK per image, aligned square face crops with "
                   "their masks, and the number of faces found. Works offline with dlib; uses an insightface "
                   "pack from models/insightface when one is installed (backend 'auto').")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "One image or a batch. Transparent (RGBA) images are put on gray, "
                                           "gray images repeated to RGB."}),
            "backend": (list(BACKENDS), {"default": "auto", "tooltip": (
                "auto: insightface when it is installed and its pack is in models/insightface, else dlib. "
                "dlib: works offline (HOG detector, frontal faces). insightface: finds smaller and more turned "
                "faces; its weights are for non-commercial use only.")}),
            "which_face": (list(WHICH_FACE), {"default": "largest", "tooltip": (
                "largest: the biggest face of each image. index: the face at face_index, counted left to right. "
                "all: every face (one crop each, so there can be more crops than images).")}),
            "face_index": ("INT", {"default": 0, "min": -100, "max": 100, "tooltip": (
                "For which_face = index: 0 = left-most face, 1 = the next one, -1 = right-most. An image without "
                "a face at this index counts as having no face.")}),
            "mask_shape": (list(MASK_SHAPES), {"default": "ellipse", "tooltip": (
                "ellipse: an oval following the head's tilt. box: the face's rectangle. landmark hull: the face "
                "outline from the landmarks. All three include the forehead.")}),
            "grow": ("INT", {"default": 0, "min": -1024, "max": 1024, "step": 1, "tooltip": (
                "Pixels to grow the mask by (negative shrinks it), before feathering.")}),
            "feather": ("INT", {"default": 0, "min": 0, "max": 512, "step": 1, "tooltip": (
                "Soft edge radius in pixels: the mask fades from 1 to 0 over about this distance either side of "
                "its edge. 0 = hard edge.")}),
            "crop_size": ("INT", {"default": 512, "min": 64, "max": MAX_CROP, "step": 8, "tooltip": (
                "Side in pixels of the square face crops.")}),
            "crop_margin": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": (
                "Room around the face in the crop, as a fraction of a tight face crop on each side: 0 = the tight "
                "ArcFace crop, 0.25 = the whole head.")}),
            "on_no_face": (list(NO_FACE), {"default": "skip", "tooltip": (
                "skip: images without a (selected) face get an empty mask and no crop, and a warning names them. "
                "error: stop the workflow with an error naming those images.")}),
            "insightface_pack": (list(INSIGHTFACE_PACKS), {"default": "antelopev2", "tooltip": (
                "The insightface model pack, in models/insightface/models/<pack>. Used only by the insightface "
                "backend (and by auto when the pack is there).")}),
        }}

    RETURN_TYPES = ("MASK", "IMAGE", "MASK", "INT")
    RETURN_NAMES = ("mask", "face_crops", "crop_masks", "face_count")
    OUTPUT_TOOLTIPS = (
        "The face mask of each image, same size as the image ([B,H,W]); with which_face = all, the union of "
        "its faces. All zeros for images without a face.",
        "Aligned square face crops (eyes level), one per selected face, left to right within each image. One "
        "black crop when no face was found, so the nodes after it still run.",
        "The mask of each crop, warped with it (all zeros for the black placeholder crop).",
        "Faces detected in the whole batch, before which_face picks (0 = none found).",
    )
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image, backend="auto", which_face="largest", face_index=0, mask_shape="ellipse", grow=0,
            feather=0, crop_size=512, crop_margin=0.25, on_no_face="skip", insightface_pack="antelopev2"):
        checked_inputs(SeFiFaceMask, "SeFi Face Mask", dict(
            image=image, backend=backend, which_face=which_face, face_index=face_index, mask_shape=mask_shape,
            grow=grow, feather=feather, crop_size=crop_size, crop_margin=crop_margin, on_no_face=on_no_face,
            insightface_pack=insightface_pack))
        core = face_core()
        options = core.FaceMaskOptions(
            backend=backend, select=which_face, index=face_index, mask_shape=mask_shape, grow=grow,
            feather=float(feather), crop_size=crop_size, crop_margin=crop_margin, on_no_face=on_no_face,
            insightface_pack=insightface_pack, insightface_roots=tuple(host.insightface_roots()),
            device=str(host.torch_device()))
        singles = core.split_batch(image)
        if not singles:
            raise ValueError("SeFi Face Mask got an empty image batch.")
        sizes = sorted({tuple(im.shape[:2]) for im in singles})
        if len(sizes) > 1:  # only possible from Python: a ComfyUI IMAGE batch has one size
            raise ValueError(f"SeFi Face Mask got images of different sizes {sizes}; one MASK batch needs one "
                             "size. Scale them to one size first (e.g. ImageScale) or run them separately.")
        engine = make_backend(core, options)

        progress = host.progress_bar(len(singles))
        faces = []
        for single in singles:
            host.raise_if_interrupted()
            faces.append(detect_cached(engine, core.to_rgb_uint8(single), options.descriptors))
            progress.update(1)
        out = core.build_face_outputs(singles, options, backend=engine, faces=faces)
        for note in out.warnings:
            log.warning("SeFi Face Mask (%s): %s", out.backend, note)

        return (torch.from_numpy(np.stack(out.masks)), torch.from_numpy(out.crop_batch()),
                torch.from_numpy(out.crop_mask_batch()), out.total_faces)


NODE_CLASS_MAPPINGS = {"SeFiFaceMask": SeFiFaceMask}
NODE_DISPLAY_NAME_MAPPINGS = {"SeFiFaceMask": "SeFi Face Mask"}
