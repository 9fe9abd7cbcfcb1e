"""Prompt fidelity: how well each image follows its prompt, by a local open_clip image-text model (CLIP-T)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .inputs import EvalInputError

PROMPT_FIDELITY_DEFINITION = ("cosine similarity of the CLIP image and text embeddings (CLIP-T; typically "
                              "0.15-0.35 for ViT-B/32, higher = closer to the prompt)")


@dataclass
class PromptFidelity:
    available: bool
    model: str | None = None
    reason: str = ""
    definition: str = PROMPT_FIDELITY_DEFINITION


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
