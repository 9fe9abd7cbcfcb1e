"""The face record every backend returns, so geometry code never sees backend types."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Names of the five alignment points, in the order ``Face.kps`` stores them. "left"/"right" are as seen
#: in the image (image-left eye first), the convention of insightface's ``kps`` and the ArcFace template.
KPS_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


def _as_points(value: object, name: str) -> np.ndarray:
    points = np.asarray(value, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"Face.{name} must be an (N, 2) array of x, y pixel coordinates, got shape {points.shape}")
    return points


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face in image pixel coordinates (x right, y down, origin at the top-left corner).

    ``bbox`` is the detector's box ``(x0, y0, x1, y1)``; it may extend past the image edge for cut-off faces.
    ``kps`` are the five alignment points named in :data:`KPS_NAMES`. ``landmarks`` is the backend's dense set
    (``landmarks_kind`` "dlib-68" or "insightface-106") when it has one. ``descriptor`` is an identity vector
    whose ``descriptor_kind`` ("dlib-resnet-128", "insightface-arcface-512") says how to compare it (see
    :mod:`sefi_core.faces.identity`).
    """

    bbox: tuple[float, float, float, float]
    score: float
    kps: np.ndarray
    landmarks: np.ndarray | None = None
    landmarks_kind: str | None = None
    descriptor: np.ndarray | None = None
    descriptor_kind: str | None = None
    backend: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = (float(v) for v in self.bbox)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"Face.bbox must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {self.bbox}")
        object.__setattr__(self, "bbox", (x0, y0, x1, y1))
        object.__setattr__(self, "score", float(self.score))
        kps = _as_points(self.kps, "kps")
        if kps.shape[0] != 5:
            raise ValueError(f"Face.kps must hold 5 points ({', '.join(KPS_NAMES)}), got {kps.shape[0]}")
        object.__setattr__(self, "kps", kps)
        if self.landmarks is not None:
            object.__setattr__(self, "landmarks", _as_points(self.landmarks, "landmarks"))
            if not self.landmarks_kind:
                raise ValueError("Face.landmarks_kind must name the landmark layout, e.g. 'dlib-68'")
        if self.descriptor is not None:
            object.__setattr__(self, "descriptor", np.asarray(self.descriptor, dtype=np.float32).reshape(-1))
            if not self.descriptor_kind:
                raise ValueError("Face.descriptor_kind must say how the descriptor is compared, e.g. 'dlib-resnet-128'")

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> float:
        """Box area in pixels², the measure behind ``select="largest"``."""
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2.0, (self.bbox[1] + self.bbox[3]) / 2.0)

    @property
    def eye_angle_degrees(self) -> float:
        """Roll of the eye line: 0 when the eyes are level, positive when the right (image) eye is lower."""
        (lx, ly), (rx, ry) = self.kps[0], self.kps[1]
        return float(np.degrees(np.arctan2(ry - ly, rx - lx)))

    def mapped(
        self, scale: float | tuple[float, float], offset: float | tuple[float, float] = 0.0
    ) -> Face:
        """The same face with every point ``p`` replaced by ``p * scale + offset`` (per axis if pairs).

        Maps detections on a resized copy back to the original: for a copy resized by ``s`` use
        ``scale = 1 / s`` and ``offset = 0.5 / s - 0.5`` (pixel centres, as :func:`cv2.resize` places them).
        """
        f = np.broadcast_to(np.asarray(scale, dtype=np.float64), (2,))
        o = np.broadcast_to(np.asarray(offset, dtype=np.float64), (2,))

        def tr(points: np.ndarray) -> np.ndarray:
            return (points.astype(np.float64) * f + o).astype(np.float32)

        corners = tr(np.array([self.bbox[:2], self.bbox[2:]], dtype=np.float64))
        return Face(
            bbox=(float(corners[0, 0]), float(corners[0, 1]), float(corners[1, 0]), float(corners[1, 1])),
            score=self.score,
            kps=tr(self.kps),
            landmarks=None if self.landmarks is None else tr(self.landmarks),
            landmarks_kind=self.landmarks_kind,
            descriptor=self.descriptor,
            descriptor_kind=self.descriptor_kind,
            backend=self.backend,
            extra=dict(self.extra),
        )

    def shifted(self, dx: float, dy: float) -> Face:
        """The same face moved by ``(dx, dy)`` pixels (maps detections on a padded copy back)."""
        return self.mapped(1.0, (dx, dy))
