"""Face masks in image pixels: box, ellipse and landmark hull (with the forehead), grow/shrink, feather.

All three shapes are built from one *face outline*: the convex hull of the dense landmarks (or, without them,
of the detector box and the five points) plus those points mirrored above the eye line, because every
landmark set stops at the eyebrows and a face mask without the forehead is what users complain about.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from .records import Face

MASK_SHAPES: tuple[str, ...] = ("box", "ellipse", "landmark_hull")

#: How far above the eye line the outline reaches, as a multiple of the eye-line-to-chin distance. Faces
#: divide into thirds (hairline-brow, brow-nose, nose-chin); the hairline sits ~0.7x the eye-to-chin
#: distance above the eyes, so 0.7 covers the forehead without taking much hair.
FOREHEAD_RATIO = 0.7

_SHIFT = 4  # sub-pixel bits for cv2 polygon filling


def normalize_mask_shape(shape: str) -> str:
    """Accept UI spellings ("landmark hull", "Landmark-Hull", "hull") and return a :data:`MASK_SHAPES` name."""
    key = shape.strip().lower().replace("-", "_").replace(" ", "_")
    if key in ("hull", "landmarks", "landmark"):
        key = "landmark_hull"
    if key not in MASK_SHAPES:
        raise ValueError(f"Unknown mask shape {shape!r}: use one of {', '.join(MASK_SHAPES)}")
    return key


def _face_frame(face: Face) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eye centre, unit vector along the eye line (image-left to image-right eye) and unit 'up' vector."""
    left, right = face.kps[0].astype(np.float64), face.kps[1].astype(np.float64)
    eye_centre = (left + right) / 2.0
    along = right - left
    norm = float(np.hypot(*along))
    along = np.array([1.0, 0.0]) if norm < 1e-6 else along / norm
    up = np.array([along[1], -along[0]])
    mouth = (face.kps[3] + face.kps[4]).astype(np.float64) / 2.0
    if float(np.dot(mouth - eye_centre, up)) > 0:  # defensive: 'up' must point away from the mouth
        up = -up
    return eye_centre, along, up


def face_outline(face: Face, forehead: float = FOREHEAD_RATIO) -> np.ndarray:
    """Convex polygon ``(N, 2)`` around the face including the forehead, in image pixels.

    Points below the eye line are mirrored above it, scaled by ``forehead / 1.0`` of their depth, so the
    top of the outline sits ``forehead`` x (eye-to-chin distance) above the eyes and follows the jaw's width.
    """
    if face.landmarks is not None and len(face.landmarks) >= 3:
        points = np.concatenate([face.landmarks, face.kps]).astype(np.float64)
    else:  # 5 points only: the detector box stands in for the jaw
        x0, y0, x1, y1 = face.bbox
        box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        points = np.concatenate([box, face.kps.astype(np.float64)])
    eye_centre, along, up = _face_frame(face)
    rel = points - eye_centre
    a = rel @ up  # height above the eye line (negative below)
    b = rel @ along
    below = a < 0
    if forehead > 0 and np.any(below):
        depth = -a[below]
        mirrored = eye_centre + np.outer(b[below], along) + np.outer(depth * forehead, up)
        points = np.concatenate([points, mirrored])
    hull = cv2.convexHull(points.astype(np.float32)).reshape(-1, 2)
    return hull.astype(np.float32)


def _fill_polygon(mask: np.ndarray, polygon: np.ndarray) -> None:
    pts = np.round(np.asarray(polygon, dtype=np.float64) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)


def ellipse_polygon(face: Face, forehead: float = FOREHEAD_RATIO, points: int = 90) -> np.ndarray:
    """Ellipse inscribed in the face outline's bounding box, taken in the face's own frame (so it tilts with
    the head), as an ``(points, 2)`` polygon."""
    outline = face_outline(face, forehead).astype(np.float64)
    eye_centre, along, up = _face_frame(face)
    rel = outline - eye_centre
    a, b = rel @ up, rel @ along
    centre = eye_centre + along * (b.max() + b.min()) / 2.0 + up * (a.max() + a.min()) / 2.0
    half_w, half_h = (b.max() - b.min()) / 2.0, (a.max() - a.min()) / 2.0
    t = np.linspace(0.0, 2.0 * math.pi, points, endpoint=False)
    return (centre + np.outer(half_w * np.cos(t), along) + np.outer(half_h * np.sin(t), up)).astype(np.float32)


def face_shape_mask(
    face: Face, size: tuple[int, int], shape: str = "ellipse", forehead: float = FOREHEAD_RATIO
) -> np.ndarray:
    """Binary float32 mask ``size = (height, width)`` of one face: ``box`` (axis-aligned bounds of the face
    outline), ``ellipse`` (see :func:`ellipse_polygon`) or ``landmark_hull`` (:func:`face_outline`)."""
    kind = normalize_mask_shape(shape)
    height, width = int(size[0]), int(size[1])
    mask = np.zeros((height, width), dtype=np.uint8)
    outline = face_outline(face, forehead)
    if kind == "box":
        x0, y0 = outline.min(axis=0)
        x1, y1 = outline.max(axis=0)
        _fill_polygon(mask, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    elif kind == "ellipse":
        _fill_polygon(mask, ellipse_polygon(face, forehead))
    else:
        _fill_polygon(mask, outline)
    return mask.astype(np.float32)


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate (``pixels`` > 0) or erode (< 0) a mask by ``|pixels|`` px with a round structuring element.

    Uses an exact Euclidean distance transform, so cost does not grow with ``pixels``. The mask is first
    thresholded at 0.5. The image border does not erode (a face cut by the frame keeps its edge).
    """
    pixels = int(pixels)
    binary = np.asarray(mask) >= 0.5
    if pixels == 0:
        return binary.astype(np.float32)
    if pixels > 0:
        if not binary.any():
            return binary.astype(np.float32)
        dist = cv2.distanceTransform((~binary).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return (binary | (dist <= pixels)).astype(np.float32)
    dist = cv2.distanceTransform(binary.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (dist > -pixels).astype(np.float32)


def feather_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soften the mask edge with a Gaussian blur whose kernel spans ``radius`` px each side (sigma = r/3),
    so values ramp from 1 to 0 over about ``2 * radius`` px centred on the original edge."""
    mask = np.asarray(mask, dtype=np.float32)
    if radius <= 0:
        return mask.copy()
    r = int(math.ceil(radius))
    blurred = cv2.GaussianBlur(mask, (2 * r + 1, 2 * r + 1), sigmaX=radius / 3.0, borderType=cv2.BORDER_REPLICATE)
    return np.clip(blurred, 0.0, 1.0)


def face_mask(
    face: Face,
    size: tuple[int, int],
    shape: str = "ellipse",
    grow: int = 0,
    feather: float = 0.0,
    forehead: float = FOREHEAD_RATIO,
) -> np.ndarray:
    """Float32 mask in 0..1 of one face: shape, then grow/shrink by ``grow`` px, then feather."""
    mask = face_shape_mask(face, size, shape, forehead)
    if grow:
        mask = grow_mask(mask, grow)
    return feather_mask(mask, feather)


def union_masks(masks: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Pixel-wise maximum of masks (an all-zero mask of ``size`` when there are none)."""
    out = np.zeros((int(size[0]), int(size[1])), dtype=np.float32)
    for m in masks:
        np.maximum(out, m, out=out)
    return out
