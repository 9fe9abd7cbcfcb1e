"""Aligned square face crops: a similarity transform from the 5 points onto the ArcFace template.

The ArcFace template (insightface's ``arcface_dst`` for 112x112) is the layout identity encoders expect;
``margin`` shrinks it towards the centre so the crop shows more of the head (margin 0 = the tight ArcFace
crop; 0.25 adds a quarter of the tight crop's size on every side, close to an FFHQ-style head crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .records import Face

#: ArcFace 5-point template on a 112x112 crop: image-left eye, image-right eye, nose tip, mouth corners.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def template_points(size: int, margin: float = 0.0) -> np.ndarray:
    """Where the 5 points land in an ``size`` x ``size`` crop for a given ``margin`` (fraction of the tight
    ArcFace crop added on each side)."""
    if size < 8:
        raise ValueError(f"Crop size must be at least 8 px, got {size}")
    if margin <= -0.5:
        raise ValueError(f"Crop margin must be greater than -0.5, got {margin}")
    unit = ARCFACE_TEMPLATE_112 / 112.0
    return (unit + margin) / (1.0 + 2.0 * margin) * float(size)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation (no reflection) mapping ``src`` onto ``dst``
    (Umeyama 1991), as a 2x3 matrix for :func:`cv2.warpAffine`."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = float((sc**2).sum() / len(src))
    if var_s < 1e-12:
        raise ValueError("Cannot align: the face's 5 points coincide")
    cov = dc.T @ sc / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / var_s)
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - scale * rot @ mu_s
    return matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to ``(N, 2)`` points."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def _warp(image: np.ndarray, matrix: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    # warpAffine samples without a low-pass filter: shrink first (INTER_AREA) when the crop is much smaller
    # than the face, so large photos do not alias.
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    m = matrix.copy()
    src = image
    if scale < 0.5:
        k = 2.0 * scale
        h, w = image.shape[:2]
        new_w, new_h = max(1, int(round(w * k))), max(1, int(round(h * k)))
        src = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        m[:, 0] *= w / new_w
        m[:, 1] *= h / new_h
    return cv2.warpAffine(
        src, m, (size, size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


@dataclass(frozen=True)
class AlignedCrop:
    """A face crop, its mask, and the image->crop matrix (use it to map any point into the crop)."""

    image: np.ndarray  # [S, S, 3] float32 0..1
    mask: np.ndarray  # [S, S] float32 0..1
    matrix: np.ndarray  # 2x3 image -> crop


def alignment_matrix(face: Face, size: int, margin: float = 0.0) -> np.ndarray:
    """Image -> crop matrix that puts the face's 5 points on the template (eye line horizontal)."""
    return similarity_transform(face.kps, template_points(size, margin))


def align_face(
    image: np.ndarray, face: Face, size: int = 512, margin: float = 0.25, mask: np.ndarray | None = None
) -> AlignedCrop:
    """Cut an ``size`` x ``size`` aligned crop of ``face`` from a float RGB ``image`` (areas outside the image
    are black) and warp ``mask`` (full image size) with the same transform (outside = 0)."""
    matrix = alignment_matrix(face, size, margin)
    crop = _warp(np.asarray(image, dtype=np.float32), matrix, size, cv2.INTER_LINEAR)
    if mask is None:
        crop_mask = np.zeros((size, size), dtype=np.float32)
    else:
        crop_mask = _warp(np.asarray(mask, dtype=np.float32), matrix, size, cv2.INTER_LINEAR)
    return AlignedCrop(
        image=np.clip(crop, 0.0, 1.0).astype(np.float32),
        mask=np.clip(crop_mask, 0.0, 1.0).astype(np.float32),
        matrix=matrix,
    )
