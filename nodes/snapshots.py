"""Step snapshots of an identity in training: `<name>@<step>.safetensors` beside the identity, in the identity file
format, so SeFi Load Identity lists them and `embedding:<name>@<step>` loads them, and a user keeps the step that
looks best when the last one is not.

A snapshot is written once (atomically, sefi_core.atomic): a resumed run does not rewrite the steps the first run
already saved, and snapshots stay when a run fails later — they are what was good before the failure.
"""
from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

from ..sefi_core.identity import Identity, save_identity

log = logging.getLogger("sefi")

SEPARATOR = "@"
MAX_STEP_DIGITS = 6
"""The trainer's steps widget allows up to 100000: six digits."""


def snapshot_path(folder: Path, name: str, step: int) -> Path:
    return folder / f"{name}{SEPARATOR}{int(step)}.safetensors"


def longest_snapshot_name(name: str) -> str:
    """The longest snapshot file name of `name`, for the file-name length check."""
    return f"{name}{SEPARATOR}{'9' * MAX_STEP_DIGITS}.safetensors"


def snapshot_due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def existing_snapshots(folder: Path, name: str) -> dict[int, Path]:
    """{step: path} of the snapshots of `name` in `folder` (not those of another name that starts the same)."""
    pattern = re.compile(rf"{re.escape(name)}{SEPARATOR}(\d+)\.safetensors")
    found = {}
    for path in folder.glob(f"{glob.escape(name)}{SEPARATOR}*.safetensors"):
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def save_snapshot(identity: Identity, folder: Path, name: str, step: int) -> Path | None:
    """Write the snapshot of `step` unless it exists (a resumed run reaching a step the first run saved); the path
    written, or None."""
    path = snapshot_path(folder, name, step)
    if path.exists():
        log.info("[SeFi] %s: snapshot %s exists (written before the resume); kept", name, path.name)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    save_identity(identity, path)
    log.info("[SeFi] %s: snapshot of step %d saved as %s", name, step, path.name)
    return path


def remove_snapshots(folder: Path, name: str) -> list[Path]:
    """Delete the snapshots of `name` (a fresh run with overwrite replaces an earlier run's), returning them."""
    removed = list(existing_snapshots(folder, name).values())
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.info("[SeFi] %s: removed %d snapshot(s) of an earlier run (overwrite)", name, len(removed))
    return removed
