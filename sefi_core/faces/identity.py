"""Comparing identity descriptors: which distance each descriptor kind uses and where 'same person' ends."""

from __future__ import annotations

import numpy as np

from .records import Face

DLIB_KIND = "dlib-resnet-128"
ARCFACE_KIND = "insightface-arcface-512"

#: Distance below which two descriptors are taken as the same person.
#: dlib: euclidean 0.6, dlib's documented operating point (99.38% on LFW); on ../shared/faces same-person
#: pairs measure well under it and different people above it (see tests/core/test_faces.py).
#: ArcFace: cosine distance 0.6 (= cosine similarity 0.4), a commonly used operating point for insightface's
#: recognition models; not measured here because no insightface model pack can be downloaded offline.
SAME_PERSON_THRESHOLDS: dict[str, float] = {DLIB_KIND: 0.6, ARCFACE_KIND: 0.6}

#: Distance metric per descriptor kind.
METRICS: dict[str, str] = {DLIB_KIND: "euclidean", ARCFACE_KIND: "cosine"}


def _descriptor(value: Face | np.ndarray, kind: str | None) -> tuple[np.ndarray, str | None]:
    if isinstance(value, Face):
        if value.descriptor is None:
            raise ValueError("This face has no descriptor: detect it with descriptors=True")
        return value.descriptor, value.descriptor_kind
    return np.asarray(value, dtype=np.float32).reshape(-1), kind


def descriptor_distance(a: Face | np.ndarray, b: Face | np.ndarray, kind: str | None = None) -> float:
    """Distance between two descriptors (or two faces' descriptors) with the metric their kind calls for:
    euclidean for dlib, cosine distance (1 - cosine similarity) for ArcFace. Refuses to compare different
    kinds, whose numbers mean nothing to each other."""
    va, ka = _descriptor(a, kind)
    vb, kb = _descriptor(b, kind)
    ka = ka or kb
    kb = kb or ka
    if ka != kb:
        raise ValueError(f"Cannot compare a {ka} descriptor with a {kb} descriptor: detect both with one backend")
    if va.shape != vb.shape:
        raise ValueError(f"Descriptor sizes differ: {va.shape} vs {vb.shape}")
    metric = METRICS.get(ka or "", "euclidean")
    if metric == "cosine":
        denom = float(np.linalg.norm(va) * np.linalg.norm(vb))
        if denom == 0.0:
            raise ValueError("Cannot take the cosine distance of a zero descriptor")
        return float(1.0 - np.dot(va, vb) / denom)
    return float(np.linalg.norm(va - vb))


def same_person(a: Face | np.ndarray, b: Face | np.ndarray, kind: str | None = None,
                threshold: float | None = None) -> bool:
    """True when the descriptors are closer than ``threshold`` (default: :data:`SAME_PERSON_THRESHOLDS`)."""
    _, ka = _descriptor(a, kind)
    _, kb = _descriptor(b, kind)
    k = ka or kb
    if threshold is None:
        if k not in SAME_PERSON_THRESHOLDS:
            raise ValueError(f"No default threshold for descriptor kind {k!r}: pass threshold=")
        threshold = SAME_PERSON_THRESHOLDS[k]
    return descriptor_distance(a, b, kind) < threshold
