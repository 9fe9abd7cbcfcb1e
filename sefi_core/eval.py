"""Identity score: how much generated images look like the person in reference photos, and how well they
follow their prompts. Pure core (numpy, PIL, the face core; torch/open_clip only for prompt fidelity).

Per generated image: whether a face was found, the identity distance of its largest face to the reference
set and that distance as a similarity, and (when prompts and a local image-text CLIP model are given) the
prompt fidelity. Averages over the batch. Read docs/evaluation.md for what each number means, the threshold
and how it was calibrated.

Command line (from the repository root)::

    python -m sefi_core.eval --references photos/ --images outputs/ [--prompts prompts.txt]
        [--csv scores.csv] [--json scores.json] [--table table.png] [--backend auto|dlib|insightface]
        [--clip-weights ViT-B-32.bin --clip-model ViT-B-32]

Exit codes: 0 scored; 1 scored, but the mean similarity is below ``--min-similarity``; 2 bad input (the
message says what to give instead); 3 no usable face backend (the message says what to install).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .atomic import atomic_write_bytes, atomic_write_text
from .faces import FaceBackend, FaceBackendUnavailable, detect_faces, get_backend, resolve_backend_name
from .faces.backends import insightface_backend
from .faces.identity import ARCFACE_KIND, DLIB_KIND, METRICS, SAME_PERSON_THRESHOLDS
from .faces.images import split_batch, to_rgb_uint8
from .faces.records import Face

__all__ = [
    "BACKENDS",
    "ClipScorer",
    "EvalInputError",
    "EvalReport",
    "ImageScore",
    "PromptFidelity",
    "REFERENCE_MODES",
    "ReferenceSet",
    "collect_image_files",
    "evaluate",
    "load_clip_scorer",
    "load_image_file",
    "main",
    "pair_separation",
    "read_prompts",
    "render_report",
    "similarity_from_distance",
]

BACKENDS: tuple[str, ...] = ("auto", "dlib", "insightface")
REFERENCE_MODES: tuple[str, ...] = ("mean", "min")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

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
PROMPT_FIDELITY_DEFINITION = ("cosine similarity of the CLIP image and text embeddings (CLIP-T; typically "
                              "0.15-0.35 for ViT-B/32, higher = closer to the prompt)")


class EvalInputError(ValueError):
    """Input the scorer cannot use; the message says what to give instead (CLI exit code 2)."""


# ----------------------------------------------------------------------------------------------------- inputs


def collect_image_files(items: Sequence[str | os.PathLike[str]], what: str = "images") -> list[Path]:
    """Image files from a mix of folders and files: a folder contributes its image files (not recursive),
    sorted by name; files keep the order given. Raises :class:`EvalInputError` for missing paths and when
    nothing is found."""
    if not items:
        raise EvalInputError(f"No {what} given: pass one or more image files or folders")
    files: list[Path] = []
    for raw in items:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise EvalInputError(f"The {what} folder {path} holds no image files "
                                     f"({', '.join(IMAGE_EXTENSIONS)}): point to the folder with the pictures")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise EvalInputError(f"{what}: {path} does not exist: check the path (folders and image files are "
                                 "accepted)")
    return files


def load_image_file(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as ``[H, W, 3]`` uint8 RGB: EXIF orientation applied, transparency put on gray (as the
    face node does), 16-bit and palette images converted."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode in ("PA",) else "RGB")
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EvalInputError(f"{path} is not a readable image ({exc}): remove it or replace it with a PNG/JPEG "
                             "file") from exc
    return to_rgb_uint8(array)


def read_prompts(path: str | os.PathLike[str], n_images: int) -> list[str]:
    """Prompts from a text file, one per line in the order of the images; a file with a single prompt applies
    it to every image. Blank lines are ignored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalInputError(f"--prompts: {path} does not exist: give a text file with one prompt per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return split_prompts(lines, n_images, source=str(path))


def split_prompts(lines: Sequence[str] | str, n_images: int, source: str = "prompts") -> list[str]:
    """One prompt per image from ``lines`` (or a multi-line string): N lines for N images, or one line for
    all of them."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise EvalInputError(f"{source} holds no prompt: write one prompt per line, in the order of the images")
    if len(prompts) == 1:
        return prompts * n_images
    if len(prompts) != n_images:
        raise EvalInputError(f"{source} has {len(prompts)} prompts for {n_images} images: give one prompt per "
                             "image, in the order of the images (files within a folder are sorted by name), or a "
                             "single prompt for all of them")
    return prompts


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


@dataclass
class ImageScore:
    """One generated image. Distances and similarity are None when no face was found."""

    name: str
    face_found: bool
    faces: int
    distance_mean: float | None = None
    distance_min: float | None = None
    similarity: float | None = None
    same_person: bool | None = None
    prompt: str | None = None
    prompt_fidelity: float | None = None
    bbox: tuple[float, float, float, float] | None = None
    note: str = ""


@dataclass
class PromptFidelity:
    available: bool
    model: str | None = None
    reason: str = ""
    definition: str = PROMPT_FIDELITY_DEFINITION


@dataclass
class EvalReport:
    backend: str
    descriptor_kind: str
    model: str
    metric: str
    threshold: float
    reference_mode: str
    references: list[dict[str, Any]]
    images: list[ImageScore]
    prompt_fidelity: PromptFidelity
    similarity_definition: str = ""

    # -------------------------------------------------------------------------------------------- summary
    @property
    def scored(self) -> list[ImageScore]:
        return [s for s in self.images if s.face_found]

    @property
    def face_rate(self) -> float:
        return len(self.scored) / len(self.images) if self.images else 0.0

    @property
    def mean_similarity(self) -> float | None:
        """Mean identity similarity over the images in which a face was found (None when there is none)."""
        values = [s.similarity for s in self.scored if s.similarity is not None]
        return float(np.mean(values)) if values else None

    @property
    def mean_similarity_all(self) -> float:
        """Mean identity similarity over all images, an image without a face counting as 0."""
        if not self.images:
            return 0.0
        return float(sum((s.similarity or 0.0) for s in self.images) / len(self.images))

    def _mean(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.images if getattr(s, attr) is not None]
        return float(np.mean(values)) if values else None

    @property
    def match_rate(self) -> float:
        """Share of all images whose face is the same person by the threshold."""
        return sum(1 for s in self.images if s.same_person) / len(self.images) if self.images else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "images": len(self.images),
            "faces_found": len(self.scored),
            "face_rate": self.face_rate,
            "mean_similarity": self.mean_similarity,
            "mean_similarity_all": self.mean_similarity_all,
            "mean_distance_mean": self._mean("distance_mean"),
            "mean_distance_min": self._mean("distance_min"),
            "same_person_rate": self.match_rate,
            "mean_prompt_fidelity": self._mean("prompt_fidelity"),
        }

    # -------------------------------------------------------------------------------------------- formats
    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.model,
            "descriptor": self.descriptor_kind,
            "metric": self.metric,
            "threshold": self.threshold,
            "similarity": self.similarity_definition,
            "reference_mode": self.reference_mode,
            "references": self.references,
            "images": [asdict(s) for s in self.images],
            "summary": self.summary(),
            "prompt_fidelity": asdict(self.prompt_fidelity),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    CSV_COLUMNS = ("image", "face_found", "faces", "similarity", "distance_mean", "distance_min", "same_person",
                   "prompt_fidelity", "prompt", "note")

    def to_csv(self) -> str:
        """One row per image, then a ``(mean)`` row; the model is named in the last column of every row."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*self.CSV_COLUMNS, "model"])
        for s in self.images:
            writer.writerow([s.name, "yes" if s.face_found else "no", s.faces, _num(s.similarity),
                             _num(s.distance_mean), _num(s.distance_min), _yes_no(s.same_person),
                             _num(s.prompt_fidelity), s.prompt or "", s.note, self.model])
        summary = self.summary()
        writer.writerow(["(mean)", f"{summary['faces_found']}/{summary['images']}", "",
                         _num(summary["mean_similarity"]), _num(summary["mean_distance_mean"]),
                         _num(summary["mean_distance_min"]), f"{summary['same_person_rate']:.3f}",
                         _num(summary["mean_prompt_fidelity"]), "",
                         "" if self.prompt_fidelity.available
                         else f"prompt fidelity n/a: {self.prompt_fidelity.reason}",
                         self.model])
        return buffer.getvalue()

    def to_table(self) -> str:
        """A plain-text table for a terminal or the node's STRING output."""
        lines = [
            f"SeFi identity score: backend {self.backend}, model {self.model}",
            f"  similarity = {self.similarity_definition}",
            f"  same person = {self.metric} distance below {self.threshold:g}; reference = "
            + ("the mean descriptor of the references" if self.reference_mode == "mean"
               else "the closest single reference"),
        ]
        with_face = sum(1 for r in self.references if r["face_found"])
        lines.append(f"  references: {len(self.references)} image(s), {with_face} with a face"
                     + (f"; no face in: {', '.join(r['name'] for r in self.references if not r['face_found'])}"
                        if with_face < len(self.references) else ""))
        rows = [("image", "face", "similarity", "dist(mean)", "dist(min)", "same", "prompt fid.")]
        for s in self.images:
            rows.append((s.name, "yes" if s.face_found else "no", _num(s.similarity, "-"), _num(s.distance_mean, "-"),
                         _num(s.distance_min, "-"), _yes_no(s.same_person, "-"), _num(s.prompt_fidelity, "n/a")))
        summary = self.summary()
        rows.append((f"mean ({summary['faces_found']}/{summary['images']} faces)", "",
                     _num(summary["mean_similarity"], "-"), _num(summary["mean_distance_mean"], "-"),
                     _num(summary["mean_distance_min"], "-"), f"{summary['same_person_rate']:.0%}",
                     _num(summary["mean_prompt_fidelity"], "n/a")))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        widths[0] = min(widths[0], 40)
        for k, row in enumerate(rows):
            cells = [str(row[0])[:40].ljust(widths[0])]
            cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            if k == len(rows) - 1:
                lines.append("  ".join("-" * w for w in widths))
            lines.append("  ".join(cells).rstrip())
        notes = [f"{s.name}: {s.note}" for s in self.images if s.note]
        lines.extend(f"note: {n}" for n in notes)
        if self.prompt_fidelity.available:
            lines.append(f"prompt fidelity: {self.prompt_fidelity.model}; {self.prompt_fidelity.definition}")
        else:
            lines.append(f"prompt fidelity: not available ({self.prompt_fidelity.reason})")
        return "\n".join(lines)


def _num(value: float | None, empty: str = "") -> str:
    return empty if value is None else f"{value:.3f}"


def _yes_no(value: bool | None, empty: str = "") -> str:
    return empty if value is None else ("yes" if value else "no")


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
    images = _named(images, "image")
    references = _named(references, "reference")
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


def _named(items: Any, prefix: str) -> list[tuple[str, np.ndarray]]:
    if isinstance(items, (list, tuple)) and items and all(
            isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) for it in items):
        return [(name, to_rgb_uint8(image)) for name, image in items]
    if isinstance(items, (list, tuple)) and not items:
        return []
    return [(f"{prefix} {i}", to_rgb_uint8(im)) for i, im in enumerate(split_batch(items))]


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


# ------------------------------------------------------------------------------------------- prompt fidelity


class ClipScorer:
    """An open_clip image-text model loaded from a local weights file (never downloaded).

    ``arch`` is an open_clip architecture name (``ViT-B-32``, ``ViT-L-14`` …); ``config`` an optional open_clip
    model-config JSON for architectures open_clip does not know (its file name, without ``.json``, becomes the
    architecture name).
    """

    def __init__(self, arch: str, weights: str | os.PathLike[str], config: str | os.PathLike[str] | None = None,
                 device: str = "cpu") -> None:
        import open_clip  # deferred: optional, and slow to import
        import torch

        weights = Path(weights).expanduser()
        if config is not None:
            config = Path(config).expanduser()
            if not config.is_file():
                raise EvalInputError(f"--clip-config: {config} does not exist: give an open_clip model config JSON")
            open_clip.add_model_config(str(config))
            arch = config.stem
        # A tag such as 'openai' would make open_clip download; only an existing file is ever passed.
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
        model.eval()
        self.torch = torch
        self.model, self.preprocess = model, preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device
        self.name = f"open_clip {arch} ({weights.name})"

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str], batch: int = 16) -> list[float]:
        """Cosine similarity of each image with its prompt."""
        torch = self.torch
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(images), batch):
                ims = images[start:start + batch]
                pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in ims]).to(self.device)
                tokens = self.tokenizer(list(prompts[start:start + batch])).to(self.device)
                a = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
                b = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
                out.extend((a * b).sum(-1).tolist())
        return out


_scorers: dict[tuple, ClipScorer] = {}


CLI_OPTION_NAMES = {"weights": "--clip-weights", "model": "--clip-model"}
"""How messages name the weights file and the architecture; the ComfyUI node passes its widget names instead."""


def _load_failure(exc: BaseException) -> str:
    """Why a weights file did not load, in one line, without passing on advice to weaken safety (torch suggests
    re-running torch.load with weights_only=False, which would run any code a pickle holds)."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text:
        return ("the file is not plain weights that can be loaded safely (it holds pickled objects); use a "
                ".safetensors or plain state-dict file from a source you trust")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


def load_clip_scorer(weights: str | os.PathLike[str] | None, arch: str = "ViT-B-32",
                     config: str | os.PathLike[str] | None = None,
                     device: str = "cpu", names: dict[str, str] | None = None) -> tuple[ClipScorer | None, str]:
    """``(scorer, "")``, or ``(None, reason)`` when no image-text model can be used here. A weights path that
    does not exist is bad input (:class:`EvalInputError`); a missing package is a reason, not an error. The
    last scorer is cached. ``names``: how to call the weights/model options in messages (CLI flags by default)."""
    names = {**CLI_OPTION_NAMES, **(names or {})}
    w, m = names["weights"], names["model"]
    if weights is None or not str(weights).strip():
        return None, (f"no image-text CLIP model given (set {w} to a local open_clip weights file, "
                      "e.g. ViT-B-32 'openai'; nothing is downloaded)")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise EvalInputError(f"{w}: {path} is not a file. Give a local open_clip weights file "
                             f"(.bin/.pt/.safetensors) for the architecture named by {m}; tags like 'openai' "
                             "are not accepted because they would download")
    key = (str(path.resolve()), arch, None if config is None else str(config), device)
    if key in _scorers:
        return _scorers[key], ""
    try:
        import open_clip  # noqa: F401
    except ImportError as exc:
        return None, f"open_clip is not installed (pip install open-clip-torch): {exc}"
    except Exception as exc:  # e.g. a torchvision build that does not match torch
        return None, f"open_clip could not be imported: {type(exc).__name__}: {exc}"
    try:
        scorer = ClipScorer(arch, path, config, device)
    except EvalInputError:
        raise
    except Exception as exc:
        raise EvalInputError(f"Could not load {path} as open_clip '{arch}' ({_load_failure(exc)}). Check "
                             f"that {m} names the architecture these weights belong to") from exc
    _scorers.clear()
    _scorers[key] = scorer
    return scorer, ""


# --------------------------------------------------------------------------------------------------- picture

_BG, _TEXT, _GOOD, _BAD, _MUTED = (255, 255, 255), (20, 20, 20), (30, 140, 60), (200, 40, 40), (120, 120, 120)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _thumb(image: np.ndarray, side: int, bbox: tuple[float, float, float, float] | None = None,
           color: tuple[int, int, int] = _GOOD) -> Image.Image:
    im = Image.fromarray(to_rgb_uint8(image))
    scale = side / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    if bbox is not None:
        x0, y0, x1, y1 = (v * scale for v in bbox)
        ImageDraw.Draw(im).rectangle((x0, y0, x1, y1), outline=color, width=2)
    return im


def _face_thumb(image: np.ndarray, bbox: tuple[float, float, float, float], side: int) -> Image.Image:
    """The face box, grown by half its size on each side, as a square thumbnail (black outside the image)."""
    im = Image.fromarray(to_rgb_uint8(image))
    x0, y0, x1, y1 = bbox
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    box = tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half))
    return im.crop(box).resize((side, side), Image.BILINEAR)


def render_report(report: EvalReport, images: Sequence[Any], references: Sequence[Any] = (),
                  thumb: int = 96, width: int = 720) -> np.ndarray:
    """The report as an RGB uint8 picture ``[H, W, 3]``: a header with the model, the reference thumbnails,
    then one row per image (thumbnail with the scored face boxed green for the same person, red otherwise, a
    close-up of that face, its numbers and a similarity bar) and the means."""
    images = [im for _, im in _named(images, "image")]
    references = [im for _, im in _named(references, "reference")] if len(references) else []
    font, small = _font(15), _font(12)
    ref_side = thumb // 2 + 16
    header_h = 58 + (ref_side + 8 if references else 0)
    row_h = thumb + 8
    height = header_h + row_h * len(report.images) + 40
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), f"SeFi identity score - {report.backend}", fill=_TEXT, font=font)
    draw.text((8, 26), report.model, fill=_MUTED, font=small)
    draw.text((8, 41), f"same person: {report.metric} distance < {report.threshold:g}; reference = "
              f"{report.reference_mode}", fill=_MUTED, font=small)
    x = 8
    for ref, info in zip(references, report.references, strict=False):  # no thumbnails when none are given
        t = _thumb(ref, ref_side)
        if x + t.width > width - 8:
            break
        canvas.paste(t, (x, 58))
        if not info["face_found"]:
            draw.line((x, 58, x + t.width, 58 + t.height), fill=_BAD, width=2)
        x += t.width + 6
    y = header_h
    tx = 2 * thumb + 24
    bar_x, bar_w = tx + 300, 160
    for s, im in zip(report.images, images, strict=True):
        color = _GOOD if s.same_person else _BAD
        canvas.paste(_thumb(im, thumb, s.bbox, color), (8, y))
        if s.bbox is not None:
            canvas.paste(_face_thumb(im, s.bbox, thumb), (thumb + 14, y))
        draw.text((tx, y + 4), s.name[:40], fill=_TEXT, font=font)
        if s.face_found:
            draw.text((tx, y + 26), f"similarity {s.similarity:.3f}", fill=color, font=font)
            draw.text((tx, y + 48), f"distance {s.distance_mean:.3f} (mean) {s.distance_min:.3f} (min)",
                      fill=_MUTED, font=small)
            draw.rectangle((bar_x, y + 28, bar_x + bar_w, y + 42), outline=_MUTED)
            draw.rectangle((bar_x, y + 28, bar_x + round(bar_w * max(0.0, min(1.0, s.similarity))), y + 42),
                           fill=color)
        else:
            draw.text((tx, y + 26), "no face found", fill=_BAD, font=font)
        if s.prompt_fidelity is not None:
            draw.text((tx, y + 64), f"prompt fidelity {s.prompt_fidelity:.3f}", fill=_TEXT, font=small)
        if s.prompt:
            draw.text((tx, y + 80), s.prompt[:90], fill=_MUTED, font=small)
        y += row_h
    summary = report.summary()
    mean = summary["mean_similarity"]
    text = (f"mean similarity {mean:.3f}" if mean is not None else "mean similarity -") + (
        f"   faces {summary['faces_found']}/{summary['images']}   same person {summary['same_person_rate']:.0%}")
    if summary["mean_prompt_fidelity"] is not None:
        text += f"   prompt fidelity {summary['mean_prompt_fidelity']:.3f}"
    elif not report.prompt_fidelity.available:
        text += "   prompt fidelity n/a"
    draw.text((8, y + 10), text, fill=_TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sefi_core.eval",
        description="Score generated images against reference photos of a person: face found, identity "
                    "similarity (dlib or insightface ArcFace), and prompt fidelity with a local CLIP model.")
    p.add_argument("--references", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="photos of the person (folders and/or files)")
    p.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="generated images to score (folders are read sorted by file name)")
    p.add_argument("--prompts", metavar="FILE", help="text file, one prompt per image in image order "
                                                     "(or a single prompt for all)")
    p.add_argument("--csv", metavar="FILE", help="write one row per image (and a mean row) here")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON here ('-' = stdout)")
    p.add_argument("--table", metavar="PNG", help="write the report as a picture here")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="face backend: auto = insightface when its pack is installed, else dlib")
    p.add_argument("--reference-mode", choices=REFERENCE_MODES, default="mean",
                   help="mean: distance to the mean reference descriptor (default); min: to the closest reference")
    p.add_argument("--insightface-root", action="append", default=[], metavar="DIR",
                   help="folder holding models/<pack>/*.onnx (ComfyUI: models/insightface); repeatable")
    p.add_argument("--insightface-pack", default=insightface_backend.DEFAULT_PACK,
                   choices=sorted(insightface_backend.KNOWN_PACKS))
    p.add_argument("--clip-weights", metavar="FILE", help="local open_clip weights for prompt fidelity "
                                                          "(nothing is downloaded)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture of --clip-weights")
    p.add_argument("--clip-config", metavar="JSON", help="open_clip model config for an architecture open_clip "
                                                         "does not know")
    p.add_argument("--min-similarity", type=float, metavar="X",
                   help="exit with code 1 when the mean similarity is below X (or no face was found)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FaceBackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


def _run(args: argparse.Namespace) -> int:
    reference_files = collect_image_files(args.references, "references")
    image_files = collect_image_files(args.images, "images")
    references = [(p.name, load_image_file(p)) for p in reference_files]
    images = [(p.name, load_image_file(p)) for p in image_files]
    prompts = read_prompts(args.prompts, len(images)) if args.prompts else None
    scorer, note = None, ""
    if prompts is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, whatever open_clip tries
        scorer, note = load_clip_scorer(args.clip_weights, args.clip_model, args.clip_config)
    elif args.clip_weights:
        note = "no --prompts given"
    roots = list(args.insightface_root) or [str(Path("models") / "insightface")]
    chosen, why = resolve_backend_name(args.backend, roots, args.insightface_pack)
    if args.backend == "auto":
        print(f"face backend: {why}", file=sys.stderr)
    report = evaluate(images, references, backend=chosen, prompts=prompts, scorer=scorer,
                      reference_mode=args.reference_mode, prompt_note=note, insightface_roots=roots,
                      insightface_pack=args.insightface_pack)
    print(report.to_table())
    for target in (args.csv, args.table, None if args.json == "-" else args.json):
        if target:
            Path(target).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if args.csv:
        atomic_write_text(Path(args.csv), report.to_csv())
    if args.json == "-":
        print(report.to_json())
    elif args.json:
        atomic_write_text(Path(args.json), report.to_json() + "\n")
    if args.table:
        buffer = io.BytesIO()
        Image.fromarray(render_report(report, images, references)).save(buffer, format="PNG")
        atomic_write_bytes(Path(args.table), buffer.getvalue())
    if args.min_similarity is not None:
        mean = report.mean_similarity
        if mean is None or math.isnan(mean) or mean < args.min_similarity:
            print(f"mean similarity {_num(mean, 'none')} is below --min-similarity {args.min_similarity}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
