"""Face identity scoring: the largest face of each image against the reference photos' descriptors, as a
distance and a similarity, and the same-person pair separation used to calibrate the threshold."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..faces import FaceBackend, detect_faces, get_backend
from ..faces.identity import ARCFACE_KIND, DLIB_KIND, METRICS, SAME_PERSON_THRESHOLDS
from ..faces.images import to_rgb_uint8
from ..faces.records import Face
from .inputs import EvalInputError, named_images
from .prompt_fidelity import ClipScorer, PromptFidelity
from .report import EvalReport, ImageScore

BACKENDS: tuple[str, ...] = ("auto", "dlib", "insightface")
REFERENCE_MODES: tuple[str, ...] = ("mean", "min")

#: The recognition model behind each descriptor kind, named in every report.
DESCRIPTOR_MODELS: dict[str, str] = {
    DLIB_KIND: "dlib_face_recognition_resnet_model_v1 (dlib ResNet, 128-D, euclidean distance)",
    ARCFACE_KIND: "insightface ArcFace (512-D, cosine)",
}
#: The ArcFace file of each known insightface pack.
ARCFACE_FILES: dict[str, str] = {"antelopev2": "glintr100.onnx", "buffalo_l": "w600k_r50.onnx"}

SIMILARITY_DEFINITIONS: dict[str, str] = {
    DLIB_KIND: "1 - distance / (2 x threshold), clipped to 0..1: 1 = identical descriptors, 0.5 = exactly at "
               "dlib's same-person threshold 0.6, 0 = distance 1.2 or more",
    ARCFACE_KIND: "cosine similarity of the ArcFace embeddings (1 - cosine distance); same person above 0.4",
}


# ----------------------------------------------------------------------------------------------------- scoring


def similarity_from_distance(distance: float, kind: str) -> float:
    """The identity similarity reported for a descriptor distance (see :data:`SIMILARITY_DEFINITIONS`)."""
    if METRICS.get(kind) == "cosine":
        return float(1.0 - distance)
    threshold = SAME_PERSON_THRESHOLDS.get(kind, 0.6)
    return float(min(1.0, max(0.0, 1.0 - distance / (2.0 * threshold))))


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _distance(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    if METRICS.get(kind) == "cosine":
        return float(1.0 - np.dot(_unit(a), _unit(b)))
    return float(np.linalg.norm(a - b))


def _largest(faces: Sequence[Face]) -> Face | None:
    return max(faces, key=lambda f: f.area) if faces else None


@dataclass
class ReferenceSet:
    """Descriptors of the reference photos (the largest face of each) and how a descriptor is compared to them.

    ``mean``: the distance to the mean descriptor (dlib: the plain mean; ArcFace: the mean of the unit-length
    embeddings, compared by cosine, so its length does not matter). ``min``: the smallest distance to any single
    reference. Both are always computed; ``mode`` picks the one that becomes the similarity.
    """

    names: list[str]
    descriptors: np.ndarray  # [N, D]
    kind: str
    without_face: list[str] = field(default_factory=list)
    face_counts: list[int] = field(default_factory=list)

    @property
    def center(self) -> np.ndarray:
        if METRICS.get(self.kind) == "cosine":
            return np.mean([_unit(d) for d in self.descriptors], axis=0)
        return self.descriptors.mean(axis=0)

    def distances(self, descriptor: np.ndarray) -> tuple[float, float]:
        """``(distance to the mean descriptor, smallest distance to any reference)``."""
        to_mean = _distance(descriptor, self.center, self.kind)
        to_any = min(_distance(descriptor, d, self.kind) for d in self.descriptors)
        return to_mean, to_any


def _model_name(backend: FaceBackend, kind: str) -> str:
    """The recognition model behind ``kind`` as this backend runs it (insightface: the pack and its file)."""
    if kind == ARCFACE_KIND:
        pack = getattr(getattr(backend, "location", None), "pack", None)
        if pack:
            onnx = ARCFACE_FILES.get(pack, "its recognition .onnx")
            return f"insightface {pack}/{onnx} (ArcFace, 512-D, cosine)"
    return DESCRIPTOR_MODELS.get(kind, kind)


def _detect(backend: FaceBackend, image: np.ndarray) -> list[Face]:
    faces = detect_faces(image, backend, descriptors=True)
    for f in faces:
        if f.descriptor is None:
            raise EvalInputError(f"The face backend {backend.name} returned a face without an identity "
                                 "descriptor; use the dlib or insightface backend")
    return faces


def build_reference_set(references: Sequence[tuple[str, np.ndarray]], backend: FaceBackend,
                        progress: Callable[[], None] | None = None) -> ReferenceSet:
    """Descriptors of the largest face of each reference image; images without a face are listed and left
    out. Raises :class:`EvalInputError` when no reference has a face."""
    if not references:
        raise EvalInputError("No reference images given: pass photos of the person the images should show")
    names, descriptors, missing, counts = [], [], [], []
    kind = None
    for name, image in references:
        faces = _detect(backend, image)
        counts.append(len(faces))
        face = _largest(faces)
        if progress is not None:
            progress()
        if face is None:
            missing.append(name)
            continue
        if kind is not None and face.descriptor_kind != kind:
            raise EvalInputError(f"Reference {name} gave a {face.descriptor_kind} descriptor, the others {kind}: "
                                 "use one backend for all references")
        kind = face.descriptor_kind
        names.append(name)
        descriptors.append(face.descriptor)
    if not descriptors:
        raise EvalInputError(
            f"No face found in any of the {len(references)} reference image(s) ({', '.join(n for n, _ in references)}"
            "). Give clear photos of the person (frontal, face at least ~80 px wide), or try --backend insightface "
            "(it finds smaller and more turned faces than dlib).")
    return ReferenceSet(names, np.stack(descriptors), str(kind), missing, counts)


def evaluate(
    images: Sequence[tuple[str, Any]] | Any,
    references: Sequence[tuple[str, Any]] | Any,
    backend: str | FaceBackend = "auto",
    prompts: Sequence[str] | None = None,
    scorer: ClipScorer | None = None,
    reference_mode: str = "mean",
    prompt_note: str = "",
    progress: Callable[[int, int], None] | None = None,
    **backend_options: Any,
) -> EvalReport:
    """Score generated ``images`` against ``references``.

    Both are ``(name, image)`` pairs or plain image batches (``[B,H,W,C]`` float 0..1 or uint8, a list of
    images); images are named ``image 0``, ``image 1`` … then. ``backend`` is a name for
    :func:`get_backend` (``backend_options`` go there) or a backend object. The largest face of each image is
    scored. Prompt fidelity needs both ``prompts`` (one per image) and a ``scorer``; otherwise it is reported as
    not available, with ``prompt_note`` (or a default) as the reason. ``progress(done, total)`` runs after each
    detection.
    """
    mode = reference_mode.strip().lower()
    if mode not in REFERENCE_MODES:
        raise EvalInputError(f"reference_mode must be one of {', '.join(REFERENCE_MODES)}, got {reference_mode!r}")
    images = named_images(images, "image")
    references = named_images(references, "reference")
    if not images:
        raise EvalInputError("No images to score: pass the generated images")
    if prompts is not None and len(prompts) != len(images):
        raise EvalInputError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image")
    engine = get_backend(backend, **backend_options) if isinstance(backend, str) else backend
    total, done = len(images) + len(references), [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    refs = build_reference_set(references, engine, tick)
    kind = refs.kind
    threshold = SAME_PERSON_THRESHOLDS.get(kind, 0.6)
    scores: list[ImageScore] = []
    for i, (name, image) in enumerate(images):
        faces = _detect(engine, image)
        tick()
        face = _largest(faces)
        score = ImageScore(name=name, face_found=face is not None, faces=len(faces),
                           prompt=None if prompts is None else prompts[i])
        if face is None:
            score.note = "no face found"
        else:
            if face.descriptor_kind != kind:
                raise EvalInputError(f"{name} gave a {face.descriptor_kind} descriptor but the references "
                                     f"{kind}: use one backend for both")
            to_mean, to_any = refs.distances(face.descriptor)
            chosen = to_mean if mode == "mean" else to_any
            score.distance_mean, score.distance_min = to_mean, to_any
            score.similarity = similarity_from_distance(chosen, kind)
            score.same_person = chosen < threshold
            score.bbox = face.bbox
            if len(faces) > 1:
                score.note = f"{len(faces)} faces; the largest was scored"
        scores.append(score)

    if prompts is None:
        fidelity = PromptFidelity(False, reason=prompt_note or "no prompts given")
    elif scorer is None:
        fidelity = PromptFidelity(False, reason=prompt_note or "no image-text CLIP model given")
    else:
        values = scorer.score([to_rgb_uint8(im) for _, im in images], list(prompts))
        for s, v in zip(scores, values, strict=True):
            s.prompt_fidelity = float(v)
        fidelity = PromptFidelity(True, model=scorer.name)

    references_info = [{"name": name, "face_found": count > 0, "faces": count}
                       for (name, _), count in zip(references, refs.face_counts, strict=True)]
    return EvalReport(
        backend=engine.name, descriptor_kind=kind, model=_model_name(engine, kind),
        metric=METRICS.get(kind, "euclidean"),
        threshold=threshold, reference_mode=mode, references=references_info, images=scores,
        prompt_fidelity=fidelity, similarity_definition=SIMILARITY_DEFINITIONS.get(kind, ""),
    )


# ----------------------------------------------------------------------------------------------- calibration


def pair_separation(labels: Sequence[str], descriptors: Sequence[np.ndarray], kind: str) -> dict[str, Any]:
    """How well the descriptors separate people: every pair's distance, split into same-person and
    different-person pairs, with the largest same-person distance, the smallest different-person distance,
    their margin, the ROC AUC (same-person pairs should be closer) and the midpoint between them."""
    same, different = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            d = _distance(np.asarray(descriptors[i]), np.asarray(descriptors[j]), kind)
            (same if labels[i] == labels[j] else different).append(d)
    if not same or not different:
        raise ValueError("pair_separation needs at least one same-person and one different-person pair")
    s, d = np.asarray(same), np.asarray(different)
    # AUC = P(a different-person pair is farther than a same-person pair), ties count half
    auc = float(((d[None, :] > s[:, None]).sum() + 0.5 * (d[None, :] == s[:, None]).sum()) / (s.size * d.size))
    return {
        "kind": kind, "same_pairs": int(s.size), "different_pairs": int(d.size),
        "max_same": float(s.max()), "mean_same": float(s.mean()),
        "min_different": float(d.min()), "mean_different": float(d.mean()),
        "margin": float(d.min() - s.max()), "midpoint": float((d.min() + s.max()) / 2), "auc": auc,
        "threshold": SAME_PERSON_THRESHOLDS.get(kind),
    }
