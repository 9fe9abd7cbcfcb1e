"""The people of a batch: one sub-folder of photos per person, their photos checked, what is already trained
skipped, where a cut-off run resumes, and the results table at the end. Used by both engines
(batch/http_engine.py, batch/ray_engine.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHECKPOINT_SUFFIX = ".sefi-train"  # nodes/train_policies.py's; read here without importing the pack


class UsageError(Exception):
    """Bad arguments or folders; the message says what to give instead."""


class CannotResume(Exception):
    """A person's checkpoint cannot be continued with these settings; the person fails, the checkpoint stays."""


@dataclass
class Person:
    name: str
    folder: Path
    photos: list[Path] = field(default_factory=list)


@dataclass
class Result:
    person: str
    status: str  # trained | skipped | failed
    seconds: float = 0.0
    message: str = ""
    server: str = ""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ people


def find_people(people_dir: Path) -> list[Person]:
    if not people_dir.is_dir():
        raise UsageError(f"{people_dir} is not a folder: give a folder with one sub-folder of photos per person")
    people = []
    for folder in sorted(p for p in people_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        people.append(Person(folder.name, folder, photos))
    if not people:
        raise UsageError(f"{people_dir} has no sub-folders: put each person's photos in a folder named after them "
                         f"({people_dir}/alice/1.jpg, {people_dir}/bob/1.jpg, …)")
    return people


def existing_identity(out_dir: Path, name: str) -> tuple[bool, str]:
    """(valid, note): whether --out already holds a loadable identity for `name`."""
    path = out_dir / f"{name}.safetensors"
    if not path.exists():
        return False, ""
    from sefi_core.identity import load_identity
    try:
        load_identity(path)
    except Exception as exc:  # IdentityFileError and anything a damaged file raises
        return False, f"existing {path.name} is not valid ({exc}); training it again"
    return True, f"{path.name} already present and valid"


def checkpoint_step(out_dir: Path, name: str) -> int | None:
    """The step of --out/checkpoints/<name>.sefi-train, or None when there is none that reads."""
    path = out_dir / "checkpoints" / f"{name}{CHECKPOINT_SUFFIX}"
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            return int((f.metadata() or {})["sefi.step"])
    except Exception:  # not a checkpoint (or damaged): training starts over and replaces it
        return None


def resume_plan(out_dir: Path, name: str, steps: int) -> tuple[str, str]:
    """(resume_from, note) for a person's run: its own checkpoint in --out/checkpoints whenever there is one to
    continue — a run cut off at any step, also after its last checkpoint but before its identity was saved, is
    never trained again from step 0 — else ("", ""). A checkpoint of a longer run (beyond `steps`) raises
    CannotResume rather than being replaced."""
    step = checkpoint_step(out_dir, name)
    if step is None:
        return "", ""
    if step > steps:
        raise CannotResume(f"its checkpoint {out_dir / 'checkpoints' / (name + CHECKPOINT_SUFFIX)} is at step {step}, "
                           f"beyond --steps {steps}: give --steps {step} or more to continue it, or delete the "
                           "checkpoint to train this person again from the start")
    if step == steps:
        return name, f"its checkpoint is at the last step ({step}): saving the identity from it"
    return name, f"resuming from its checkpoint at step {step}"


def check_photos(person: Person) -> str:
    """'' when every photo opens as an image, else what is wrong."""
    if not person.photos:
        return f"no photos in {person.folder} ({', '.join(IMAGE_EXTENSIONS)})"
    for photo in person.photos:
        try:
            with Image.open(photo) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            return f"photo {photo.name} is not a readable image ({exc}); replace or remove it"
    return ""


def settle_people(people_dir: Path, out_dir: Path) -> tuple[list[Result], list[Person]]:
    """(settled, to train): valid identities are skipped and people with unusable photos fail, before any
    engine starts."""
    results: list[Result] = []
    jobs: list[Person] = []
    for person in find_people(people_dir):
        valid, note = existing_identity(out_dir, person.name)
        if valid:
            results.append(Result(person.name, "skipped", 0.0, note))
            log(f"{person.name}: skipped ({note})")
            continue
        if note:
            log(f"{person.name}: {note}")
        problem = check_photos(person)
        if problem:
            results.append(Result(person.name, "failed", 0.0, problem))
            log(f"{person.name}: failed ({problem})")
            continue
        jobs.append(person)
    log(f"{len(jobs)} to train, {len(results)} settled before training ({out_dir})")
    return results, jobs


def summary_table(results: list[Result]) -> str:
    rows = [("person", "status", "seconds", "server", "message")]
    rows += [(r.person, r.status, f"{r.seconds:.1f}", r.server or "-", r.message) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    counts = {s: sum(1 for r in results if r.status == s) for s in ("trained", "skipped", "failed")}
    lines.append(f"{counts['trained']} trained, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(line.rstrip() for line in lines)
