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

The package: inputs.py (image files, prompts), face_identity.py (face identity scoring and calibration),
prompt_fidelity.py (CLIP-T with a local open_clip model), report.py (the report in its formats), and the
command line at the edge, cli.py (run as ``python -m sefi_core.eval``).
"""
from __future__ import annotations

from .face_identity import (BACKENDS, REFERENCE_MODES, ReferenceSet, evaluate, pair_separation,
                            similarity_from_distance)
from .inputs import EvalInputError, collect_image_files, load_image_file, read_prompts, split_prompts
from .prompt_fidelity import ClipScorer, PromptFidelity, load_clip_scorer
from .report import EvalReport, ImageScore, render_report

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
    "pair_separation",
    "read_prompts",
    "render_report",
    "similarity_from_distance",
    "split_prompts",
]
