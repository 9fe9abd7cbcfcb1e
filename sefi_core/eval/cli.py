"""`python -m sefi_core.eval`: the identity score's command line (the usage is in sefi_core/eval/__init__.py)."""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..atomic import atomic_write_bytes, atomic_write_text
from ..console import tolerant_console
from ..faces import FaceBackendUnavailable, resolve_backend_name
from ..faces.backends import insightface_backend
from .face_identity import BACKENDS, REFERENCE_MODES, evaluate
from .inputs import EvalInputError, collect_image_files, load_image_file, read_prompts
from .prompt_fidelity import load_clip_scorer
from .report import format_number, render_report


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
    tolerant_console()  # a file or person name the console cannot show must not stop the run
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
            print(f"mean similarity {format_number(mean, 'none')} is below --min-similarity {args.min_similarity}",
                  file=sys.stderr)
            return 1
    return 0
