"""The identity score's report: per-image scores, the means, and the report as a table, CSV, JSON or picture."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..faces.images import to_rgb_uint8
from .inputs import named_images
from .prompt_fidelity import PromptFidelity


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
            writer.writerow([s.name, "yes" if s.face_found else "no", s.faces, format_number(s.similarity),
                             format_number(s.distance_mean), format_number(s.distance_min), _yes_no(s.same_person),
                             format_number(s.prompt_fidelity), s.prompt or "", s.note, self.model])
        summary = self.summary()
        writer.writerow(["(mean)", f"{summary['faces_found']}/{summary['images']}", "",
                         format_number(summary["mean_similarity"]), format_number(summary["mean_distance_mean"]),
                         format_number(summary["mean_distance_min"]), f"{summary['same_person_rate']:.3f}",
                         format_number(summary["mean_prompt_fidelity"]), "",
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
            rows.append((s.name, "yes" if s.face_found else "no", format_number(s.similarity, "-"),
                         format_number(s.distance_mean, "-"), format_number(s.distance_min, "-"),
                         _yes_no(s.same_person, "-"), format_number(s.prompt_fidelity, "n/a")))
        summary = self.summary()
        rows.append((f"mean ({summary['faces_found']}/{summary['images']} faces)", "",
                     format_number(summary["mean_similarity"], "-"), format_number(summary["mean_distance_mean"], "-"),
                     format_number(summary["mean_distance_min"], "-"), f"{summary['same_person_rate']:.0%}",
                     format_number(summary["mean_prompt_fidelity"], "n/a")))
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


def format_number(value: float | None, empty: str = "") -> str:
    return empty if value is None else f"{value:.3f}"


def _yes_no(value: bool | None, empty: str = "") -> str:
    return empty if value is None else ("yes" if value else "no")


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
    images = [im for _, im in named_images(images, "image")]
    references = [im for _, im in named_images(references, "reference")] if len(references) else []
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
