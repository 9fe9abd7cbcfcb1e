"""What the scorer reads: image files and folders, prompt files, and image batches named for the report."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..faces.images import split_batch, to_rgb_uint8

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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


def named_images(items: Any, prefix: str) -> list[tuple[str, np.ndarray]]:
    if isinstance(items, (list, tuple)) and items and all(
            isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) for it in items):
        return [(name, to_rgb_uint8(image)) for name, image in items]
    if isinstance(items, (list, tuple)) and not items:
        return []
    return [(f"{prefix} {i}", to_rgb_uint8(im)) for i, im in enumerate(split_batch(items))]
