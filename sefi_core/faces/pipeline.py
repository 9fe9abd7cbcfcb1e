"""The two entry points the ComfyUI node calls: :func:`detect_faces` and :func:`build_face_outputs`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .align import align_face
from .backends import BACKEND_NAMES, FaceBackend, get_backend
from .backends import insightface_backend
from .errors import NoFaceError
from .images import float_to_uint8, split_batch, to_rgb_float, to_rgb_uint8
from .masks import FOREHEAD_RATIO, face_mask, normalize_mask_shape, union_masks
from .records import Face
from .selection import SELECT_MODES, select_faces, sort_left_to_right

NO_FACE_MODES: tuple[str, ...] = ("skip", "error")


def detect_faces(
    image: Any, backend: str | FaceBackend = "auto", descriptors: bool = True, **backend_options: Any
) -> list[Face]:
    """All faces in one image, left to right. ``image`` may be uint8 or float 0..1 with 1-4 channels, or a
    one-image batch ``[1,H,W,C]`` (see :func:`to_rgb_uint8`); ``backend`` a name for :func:`get_backend`
    (``backend_options`` go there) or a backend object."""
    singles = split_batch(image)
    if len(singles) != 1:
        raise ValueError(f"detect_faces takes one image, got a batch of {len(singles)}: use build_face_outputs")
    engine = get_backend(backend, **backend_options) if isinstance(backend, str) else backend
    return sort_left_to_right(engine.detect(to_rgb_uint8(singles[0]), descriptors=descriptors))


@dataclass(frozen=True)
class FaceMaskOptions:
    """Everything the face-mask node exposes. Validated once here so the node can pass widgets through."""

    backend: str = "auto"
    select: str = "largest"  # "largest" | "index" | "all"
    index: int = 0  # for select="index": 0 = left-most face (by box centre), -1 = right-most
    mask_shape: str = "ellipse"  # "box" | "ellipse" | "landmark_hull" ("landmark hull" accepted)
    grow: int = 0  # px; negative shrinks
    feather: float = 0.0  # px
    crop_size: int = 512
    crop_margin: float = 0.25  # fraction of the tight ArcFace crop added on each side
    on_no_face: str = "skip"  # "skip" (warn, empty mask, no crop) | "error"
    forehead: float = FOREHEAD_RATIO
    descriptors: bool = False  # compute identity descriptors (dlib: ~0.1 s per face)
    insightface_pack: str = insightface_backend.DEFAULT_PACK
    insightface_roots: tuple[str, ...] = ()
    device: str = "cpu"
    dlib_model_dir: str | None = None
    min_score: float | None = None  # dlib HOG score threshold override

    def __post_init__(self) -> None:
        backend = self.backend.strip().lower()
        if backend not in BACKEND_NAMES:
            raise ValueError(f"Unknown backend {self.backend!r}: use one of {', '.join(BACKEND_NAMES)}")
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "mask_shape", normalize_mask_shape(self.mask_shape))
        select = self.select.strip().lower()
        if select not in SELECT_MODES:
            raise ValueError(f"Unknown which_face {self.select!r}: use one of {', '.join(SELECT_MODES)}")
        object.__setattr__(self, "select", select)
        mode = self.on_no_face.strip().lower()
        if mode not in NO_FACE_MODES:
            raise ValueError(f"Unknown on_no_face {self.on_no_face!r}: use one of {', '.join(NO_FACE_MODES)}")
        object.__setattr__(self, "on_no_face", mode)
        if int(self.crop_size) < 8:
            raise ValueError(f"crop_size must be at least 8 px, got {self.crop_size}")
        object.__setattr__(self, "crop_size", int(self.crop_size))
        if self.feather < 0:
            raise ValueError(f"feather must be >= 0 px, got {self.feather}")
        if self.crop_margin <= -0.5:
            raise ValueError(f"crop_margin must be > -0.5, got {self.crop_margin}")
        object.__setattr__(self, "grow", int(self.grow))
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "insightface_roots", tuple(str(r) for r in self.insightface_roots))

    def make_backend(self) -> FaceBackend:
        """The backend these options ask for (models are cached, so this is cheap per call)."""
        return get_backend(
            self.backend,
            insightface_roots=self.insightface_roots,
            insightface_pack=self.insightface_pack,
            device=self.device,
            dlib_model_dir=self.dlib_model_dir,
            min_score=self.min_score,
        )


@dataclass
class FaceOutputs:
    """Per-image masks, per-face crops, and the bookkeeping the node reports.

    ``masks[i]`` is ``[H_i, W_i]`` float32 0..1, the union of image i's selected faces (zeros when none).
    ``crops[k]`` / ``crop_masks[k]`` are ``[S, S, 3]`` / ``[S, S]`` float32 for the k-th selected face;
    ``crop_sources[k] = (image index, face index left to right)``; ``crop_matrices[k]`` is the 2x3 image->crop
    transform (invert it with cv2.invertAffineTransform to paste a crop back). ``face_counts[i]`` counts
    *detected* faces, before selection.
    """

    masks: list[np.ndarray]
    crops: list[np.ndarray]
    crop_masks: list[np.ndarray]
    crop_sources: list[tuple[int, int]]
    crop_matrices: list[np.ndarray]
    faces: list[list[Face]]
    selected: list[list[Face]]
    face_counts: list[int]
    images_without_face: list[int]
    warnings: list[str] = field(default_factory=list)
    backend: str = ""
    crop_size: int = 512

    @property
    def total_faces(self) -> int:
        """Faces detected over the whole batch."""
        return int(sum(self.face_counts))

    def crop_batch(self) -> np.ndarray:
        """Crops stacked ``[N, S, S, 3]``; one black crop when there are none (a ComfyUI batch cannot be empty)."""
        if not self.crops:
            return np.zeros((1, self.crop_size, self.crop_size, 3), dtype=np.float32)
        return np.stack(self.crops)

    def crop_mask_batch(self) -> np.ndarray:
        """Crop masks stacked ``[N, S, S]``; one zero mask when there are none."""
        if not self.crop_masks:
            return np.zeros((1, self.crop_size, self.crop_size), dtype=np.float32)
        return np.stack(self.crop_masks)

    def mask_batch(self) -> np.ndarray | list[np.ndarray]:
        """Masks stacked ``[B, H, W]`` when all images share a size, else the list (mixed-size batch)."""
        if len({m.shape for m in self.masks}) == 1:
            return np.stack(self.masks)
        return list(self.masks)


MIN_FACE_PX = 20
"""The smallest face the detectors find: dlib's HOG about 80 px, 20 px with the 2x upsampling small images get."""


def _describe_missing(i: int, faces: list[Face], options: FaceMaskOptions, shape: tuple[int, ...]) -> str:
    if not faces:
        h, w = shape[:2]
        if min(h, w) < MIN_FACE_PX:
            return (f"image {i} is {w}x{h} px: face too small: at least {MIN_FACE_PX} px is needed (use a larger "
                    f"photo or scale it up).")
        return f"image {i}: no face detected."
    return (f"image {i}: {len(faces)} face(s) detected but face_index {options.index} is out of range "
            f"(which_face=index).")


def build_face_outputs(
    images: Any,
    options: FaceMaskOptions | None = None,
    backend: FaceBackend | None = None,
    faces: Sequence[Sequence[Face]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FaceOutputs:
    """Detect, select, mask and crop faces for a batch (``[B,H,W,C]``, one image, or a list of mixed sizes).

    ``backend`` overrides ``options.backend`` (e.g. a cached one); ``faces`` supplies detections per image
    and skips detection. Images without a selected face get an empty mask and no crop plus a warning
    (``on_no_face="skip"``), or raise :class:`NoFaceError` listing them (``"error"``) before any other work.
    ``progress(done, total)`` is called after each image.
    """
    options = options or FaceMaskOptions()
    singles = split_batch(images)
    rgb = [to_rgb_float(im) for im in singles]
    notes: list[str] = []
    if faces is None:
        engine = backend or options.make_backend()
        detected = [
            sort_left_to_right(engine.detect(float_to_uint8(im), descriptors=options.descriptors)) for im in rgb
        ]
        backend_name = engine.name
    else:
        if len(faces) != len(rgb):
            raise ValueError(f"Got detections for {len(faces)} images but {len(rgb)} images")
        detected = [sort_left_to_right(f) for f in faces]
        backend_name = backend.name if backend is not None else "precomputed"

    selected = [select_faces(f, options.select, options.index) for f in detected]
    missing = [i for i, s in enumerate(selected) if not s]
    details = [_describe_missing(i, detected[i], options, rgb[i].shape) for i in missing]
    if missing and options.on_no_face == "error":
        raise NoFaceError(missing, len(rgb), details)
    if missing:
        which = ", ".join(str(i) for i in missing)
        notes.append(
            f"No face used in image(s) {which} of {len(rgb)}: their masks are empty and they have no crop. "
            + " ".join(details)
        )

    masks: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    crop_masks: list[np.ndarray] = []
    sources: list[tuple[int, int]] = []
    matrices: list[np.ndarray] = []
    for i, (image, chosen) in enumerate(zip(rgb, selected, strict=True)):
        size = image.shape[:2]
        per_face = []
        for face in chosen:
            mask = face_mask(face, size, options.mask_shape, options.grow, options.feather, options.forehead)
            per_face.append(mask)
            crop = align_face(image, face, options.crop_size, options.crop_margin, mask=mask)
            crops.append(crop.image)
            crop_masks.append(crop.mask)
            matrices.append(crop.matrix)
            sources.append((i, next(k for k, f in enumerate(detected[i]) if f is face)))
        masks.append(union_masks(per_face, size))
        if progress is not None:
            progress(i + 1, len(rgb))

    return FaceOutputs(
        masks=masks,
        crops=crops,
        crop_masks=crop_masks,
        crop_sources=sources,
        crop_matrices=matrices,
        faces=detected,
        selected=selected,
        face_counts=[len(f) for f in detected],
        images_without_face=missing,
        warnings=notes,
        backend=backend_name,
        crop_size=options.crop_size,
    )
