"""Identity score of generated images against reference photos (SeFiIdentityScore): a thin wrapper around
sefi_core.eval.evaluate. See docs/evaluation.md for what the numbers mean and how the threshold was measured.

The scoring core is imported on first use, like the face node's: it needs opencv and dlib (or insightface), and
a missing package must become an error on this node, not take the pack down at load time.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from . import host
from .edges import checked_inputs
from .faces import BACKENDS, CATEGORY, INSIGHTFACE_PACKS, detect_cached, face_core, make_backend

log = logging.getLogger(__name__)

REFERENCE_MODES = ("mean", "min")
TEXT_FORMATS = ("table", "json", "csv")


class _CachedBackend:
    """The chosen face backend with detections shared with SeFi Face Mask's cache (same key: backend, image)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.name = engine.name
        location = getattr(engine, "location", None)
        if location is not None:
            self.location = location

    def detect(self, image: np.ndarray, descriptors: bool = True) -> list:
        host.raise_if_interrupted()
        return detect_cached(self.engine, image, descriptors)


CLIP_WEIGHTS_EXAMPLE = "clip/open_clip_vit_b32.safetensors"


def _resolve_clip_weights(value: str) -> str:
    """The weights file clip_weights names inside the models folders ("" when empty). Like resume_from, a path
    elsewhere is refused from its text alone, in the same words whether or not it exists: a graph may neither
    read arbitrary files nor learn which exist."""
    value = value.strip()
    if not value:
        return ""
    if host.relative_parts(value) is None:
        raise ValueError(f"clip_weights must be a path inside ComfyUI's models folder ({host.models_dir()}), "
                         f"relative to it, e.g. {CLIP_WEIGHTS_EXAMPLE}; not a path elsewhere")
    found = host.find_model_file(value)
    if found is None:
        raise ValueError(f"clip_weights={value[:120]!r}: no such file in ComfyUI's models folder "
                         f"({host.models_dir()}) nor, for '<folder>/<file>', in the folders extra_model_paths.yaml "
                         f"registers under <folder>. Put the local open_clip weights of the architecture clip_model "
                         f"names there, e.g. {CLIP_WEIGHTS_EXAMPLE}")
    return found


class SeFiIdentityScore:
    DESCRIPTION = ("Score generated images against reference photos of the person: whether a face was found, the "
                   "identity similarity of the largest face (dlib offline, or insightface ArcFace when its pack is "
                   "installed) and, with prompts and a local open_clip model, the prompt fidelity. Returns a table "
                   "picture, the table as text (or JSON/CSV) and the mean similarity.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images to score (a batch)."}),
                "reference_images": ("IMAGE", {"tooltip": "Photos of the person (e.g. the training photos). "
                                                          "Their descriptors are averaged."}),
                "backend": (list(BACKENDS), {"default": "auto", "tooltip": (
                    "auto: insightface ArcFace when insightface and its pack (models/insightface) are installed, "
                    "else dlib. The report names the model used; numbers of different backends do not compare.")}),
                "reference_mode": (list(REFERENCE_MODES), {"default": "mean", "tooltip": (
                    "mean: distance to the mean descriptor of the references. min: distance to the closest "
                    "single reference (kinder to references that differ a lot).")}),
                "text_format": (list(TEXT_FORMATS), {"default": "table", "tooltip": (
                    "What the report STRING holds: a text table, the full JSON report, or CSV rows.")}),
            },
            "optional": {
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "The prompt of each image, one per line in batch order (or one line for all). Used for prompt "
                    "fidelity when clip_weights is set; without prompts clip_weights has no effect (the report "
                    "says so).")}),
                "clip_weights": ("STRING", {"default": "", "tooltip": (
                    "Local open_clip weights for prompt fidelity: a file in ComfyUI's models folder, relative to it "
                    "(e.g. clip/open_clip_vit_b32.safetensors). Empty = prompt fidelity off. Nothing is "
                    "downloaded.")}),
                "clip_model": ("STRING", {"default": "ViT-B-32", "tooltip": (
                    "open_clip architecture of clip_weights (e.g. ViT-B-32, ViT-L-14).")}),
                "insightface_pack": (list(INSIGHTFACE_PACKS), {"default": "antelopev2", "tooltip": (
                    "The insightface pack in models/insightface/models/<pack> (insightface backend only).")}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING", "FLOAT")
    RETURN_NAMES = ("score_table", "report", "mean_similarity")
    OUTPUT_TOOLTIPS = (
        "The scores as a picture: each image with its scored face boxed (green = same person), a close-up, "
        "similarity and distances, and the means.",
        "The report as a text table, JSON or CSV (text_format); names the model and the threshold used.",
        "Mean identity similarity over the images in which a face was found (0 when none was).",
    )
    FUNCTION = "score"
    CATEGORY = CATEGORY

    def score(self, images, reference_images, backend="auto", reference_mode="mean", text_format="table",
              prompts="", clip_weights="", clip_model="ViT-B-32", insightface_pack="antelopev2"):
        checked_inputs(SeFiIdentityScore, "SeFi Identity Score", dict(
            images=images, reference_images=reference_images, backend=backend, reference_mode=reference_mode,
            text_format=text_format, prompts=prompts, clip_weights=clip_weights, clip_model=clip_model,
            insightface_pack=insightface_pack))
        core = face_core()
        from ..sefi_core import eval as ev

        options = core.FaceMaskOptions(backend=backend, insightface_pack=insightface_pack,
                                       insightface_roots=tuple(host.insightface_roots()),
                                       device=str(host.torch_device()))
        engine = _CachedBackend(make_backend(core, options))
        singles = core.split_batch(images)
        refs = core.split_batch(reference_images)
        prompt_list, note = None, ""
        if str(prompts or "").strip():
            prompt_list = ev.split_prompts(str(prompts), len(singles), source="prompts")
            weights = _resolve_clip_weights(str(clip_weights or ""))
            scorer, note = ev.load_clip_scorer(weights or None, str(clip_model).strip() or "ViT-B-32",
                                               device=str(host.torch_device()),
                                               names={"weights": "clip_weights", "model": "clip_model"})
        else:
            scorer = None
            note = "no prompts given"
            if str(clip_weights or "").strip():  # checked all the same: a wrong path is wrong with prompts too
                _resolve_clip_weights(str(clip_weights))
                note = ("no prompts given, so clip_weights has no effect: prompt fidelity compares each image with "
                        "its prompt; write them in prompts (one per line, in batch order) or clear clip_weights")
                log.warning("SeFi Identity Score: %s", note)

        bar = host.progress_bar(len(singles) + len(refs))
        report = ev.evaluate(singles, refs, backend=engine, prompts=prompt_list, scorer=scorer,
                             reference_mode=reference_mode, prompt_note=note,
                             progress=lambda done, total: bar.update_absolute(done, total))
        picture = ev.render_report(report, singles, refs)
        text = {"table": report.to_table, "json": report.to_json, "csv": report.to_csv}[text_format]()
        mean = report.mean_similarity
        log.info("SeFi Identity Score (%s): mean similarity %s over %d/%d faces", report.model,
                 "-" if mean is None else f"{mean:.3f}", len(report.scored), len(report.images))
        table = torch.from_numpy(picture.astype(np.float32) / 255.0)[None]
        return table, text, float(mean) if mean is not None else 0.0


NODE_CLASS_MAPPINGS = {"SeFiIdentityScore": SeFiIdentityScore}
NODE_DISPLAY_NAME_MAPPINGS = {"SeFiIdentityScore": "SeFi Identity Score"}
