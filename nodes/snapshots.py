"""Step snapshots of an identity in training: `<name>@<step>.safetensors` beside the identity, in the identity file
format, so SeFi Load Identity lists them and `embedding:<name>@<step>` loads them, and a user keeps the step that
looks best when the last one is not.

Snapshots belong to one run, provably: each records the run's id (`training.run_id`, also in the run's checkpoint
and in the identity), a resumed run keeps its id, and snapshots of another run are never kept beside this run's:
- while snapshots of another run of that name lie in the identity folder (an `overwrite`, or a resume the user
  allowed to replace them), this run writes its own to `checkpoints/<name>.snapshots/` instead, and only when it
  succeeds are the other run's removed and its own moved into place: a run that fails or is cancelled leaves the
  earlier run's snapshots as they were;
- a resumed run rewrites the snapshot of every step it trains again, and removes this run's snapshots of steps
  beyond its checkpoint (a part killed before its checkpoint wrote them): no stale step survives a resume.
Every file is written atomically (sefi_core.atomic).
"""
from __future__ import annotations

import glob
import json
import logging
import re
import secrets
import shutil
from pathlib import Path

import safetensors

from ..sefi_core.identity import Identity, save_identity

log = logging.getLogger("sefi")

SEPARATOR = "@"
MAX_STEP_DIGITS = 6
"""The trainer's steps widget allows up to 100000: six digits."""
STAGING_SUFFIX = ".snapshots"


def new_run_id() -> str:
    """A fresh run's id: 12 hex digits, random (two runs of one name never share one)."""
    return secrets.token_hex(6)


def snapshot_path(folder: Path, name: str, step: int) -> Path:
    return folder / f"{name}{SEPARATOR}{int(step)}.safetensors"


def longest_snapshot_name(name: str) -> str:
    """The longest snapshot file name of `name`, for the file-name length check."""
    return f"{name}{SEPARATOR}{'9' * MAX_STEP_DIGITS}.safetensors"


def existing_snapshots(folder: Path, name: str) -> dict[int, Path]:
    """{step: path} of the snapshots of `name` in `folder` (not those of another name that starts the same)."""
    pattern = re.compile(rf"{re.escape(name)}{SEPARATOR}(\d+)\.safetensors")
    found = {}
    for path in folder.glob(f"{glob.escape(name)}{SEPARATOR}*.safetensors"):
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def run_of(path: Path) -> str | None:
    """The run id a snapshot records; None for one without (an earlier version's) or one that cannot be read —
    either way not provably this run's."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            training = json.loads((f.metadata() or {}).get("sefi.training", "{}"))
    except Exception:  # a damaged or foreign file: not ours, whatever it is
        return None
    run_id = training.get("run_id") if isinstance(training, dict) else None
    return run_id if isinstance(run_id, str) else None


class RunSnapshots:
    """The step snapshots of the run `run_id` of `name`: `folder` is the identity folder, `staging` where they wait
    while another run's snapshots are still in `folder`."""

    def __init__(self, folder: Path, staging: Path, name: str, run_id: str):
        self.folder, self.staging, self.name, self.run_id = folder, staging, name, run_id
        self.staged = False

    def foreign(self) -> dict[int, Path]:
        """{step: path} of the snapshots of `name` in the identity folder that another run wrote."""
        return {step: path for step, path in existing_snapshots(self.folder, self.name).items()
                if run_of(path) != self.run_id}

    def begin(self, resumed_at: int | None) -> None:
        """Before the first step: drop what cannot belong to this run from here on — this run's snapshots beyond the
        checkpoint it resumes from (`resumed_at`; None = a fresh run, which has none), anything staged by another
        run (one abandoned for this one) — and choose where this run's snapshots go."""
        first = 0 if resumed_at is None else int(resumed_at)
        stale = [path for step, path in existing_snapshots(self.folder, self.name).items()
                 if step > first and run_of(path) == self.run_id]
        if self.staging.is_dir():
            ours = existing_snapshots(self.staging, self.name)
            keep = {path for step, path in ours.items() if step <= first and run_of(path) == self.run_id}
            stale += [path for path in self.staging.iterdir() if path not in keep]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if stale:
            log.info("[SeFi] %s: removed %d snapshot file(s) of steps this run trains again or of an abandoned run: "
                     "%s", self.name, len(stale), ", ".join(p.name for p in stale[:5]))
        foreign = self.foreign()
        self.staged = bool(foreign)
        if self.staged:
            log.info("[SeFi] %s: %d snapshot(s) of another run of this name stay until this run succeeds; this run's "
                     "are written to %s meanwhile", self.name, len(foreign), self.staging)

    def save(self, identity: Identity, step: int) -> Path:
        """Write (or rewrite: a resumed run trains the step again) the snapshot of `step`."""
        folder = self.staging if self.staged else self.folder
        folder.mkdir(parents=True, exist_ok=True)
        path = snapshot_path(folder, self.name, step)
        save_identity(identity, path)
        log.info("[SeFi] %s: snapshot of step %d saved as %s", self.name, step, path)
        return path

    def finish(self) -> None:
        """Once the run has succeeded (its identity saved): the other run's snapshots go, this run's take their
        place."""
        retired = list(self.foreign().values())
        for path in retired:
            path.unlink(missing_ok=True)
        if retired:
            log.info("[SeFi] %s: removed %d snapshot(s) of the earlier run (replaced by this run's)", self.name,
                     len(retired))
        if self.staging.is_dir():
            for step, path in existing_snapshots(self.staging, self.name).items():
                path.replace(snapshot_path(self.folder, self.name, step))
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staged = False
