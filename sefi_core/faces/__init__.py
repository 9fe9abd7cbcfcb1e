"""Face detection, selection, masks and aligned crops for the SeFi-IDE face nodes. No ComfyUI imports.

The node calls :func:`build_face_outputs` (or :func:`detect_faces` for one image); everything else is the
pure geometry it is built from, usable and testable on its own. Backends: ``dlib`` (offline, ships its
weights in pip packages) and ``insightface`` (model pack on disk); ``auto`` prefers insightface when its
pack is present. See docs/faces.md for how to choose.
"""

from .align import (
    ARCFACE_TEMPLATE_112,
    AlignedCrop,
    align_face,
    alignment_matrix,
    similarity_transform,
    template_points,
    transform_points,
)
from .backends import BACKEND_NAMES, FaceBackend, get_backend, resolve_backend_name
from .backends.dlib_backend import DlibBackend
from .backends.insightface_backend import (
    KNOWN_PACKS,
    InsightFaceBackend,
    PackLocation,
    choose_providers,
    diagnose_insightface_pack,
    find_insightface_pack,
    insightface_importable,
    locate_insightface_pack,
)
from .errors import FaceBackendUnavailable, FaceError, NoFaceError
from .identity import SAME_PERSON_THRESHOLDS, descriptor_distance, same_person
from .images import ALPHA_BACKGROUND, float_to_uint8, gray_to_rgb, split_batch, to_rgb_float, to_rgb_uint8
from .masks import (
    FOREHEAD_RATIO,
    MASK_SHAPES,
    face_mask,
    face_outline,
    face_shape_mask,
    feather_mask,
    grow_mask,
    normalize_mask_shape,
    union_masks,
)
from .pipeline import NO_FACE_MODES, FaceMaskOptions, FaceOutputs, build_face_outputs, detect_faces
from .records import KPS_NAMES, Face
from .selection import SELECT_MODES, select_faces, sort_left_to_right

__all__ = [
    "ALPHA_BACKGROUND",
    "ARCFACE_TEMPLATE_112",
    "AlignedCrop",
    "BACKEND_NAMES",
    "DlibBackend",
    "FOREHEAD_RATIO",
    "Face",
    "FaceBackend",
    "FaceBackendUnavailable",
    "FaceError",
    "FaceMaskOptions",
    "FaceOutputs",
    "InsightFaceBackend",
    "KNOWN_PACKS",
    "KPS_NAMES",
    "MASK_SHAPES",
    "NO_FACE_MODES",
    "NoFaceError",
    "PackLocation",
    "SAME_PERSON_THRESHOLDS",
    "SELECT_MODES",
    "align_face",
    "alignment_matrix",
    "build_face_outputs",
    "choose_providers",
    "descriptor_distance",
    "detect_faces",
    "diagnose_insightface_pack",
    "face_mask",
    "face_outline",
    "face_shape_mask",
    "feather_mask",
    "find_insightface_pack",
    "float_to_uint8",
    "get_backend",
    "gray_to_rgb",
    "grow_mask",
    "insightface_importable",
    "locate_insightface_pack",
    "normalize_mask_shape",
    "resolve_backend_name",
    "same_person",
    "select_faces",
    "similarity_transform",
    "sort_left_to_right",
    "split_batch",
    "template_points",
    "to_rgb_float",
    "to_rgb_uint8",
    "transform_points",
    "union_masks",
]
