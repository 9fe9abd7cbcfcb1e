"""The people of a batch: one sub-folder of photos per person, their photos checked, what is already trained
skipped, where a cut-off run resumes, and the results table at the end. Used by both engines
(batch/http_engine.py, batch/ray_engine.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sefi_core.identity_names import NameCollision, canonical_name, colliding_groups, file_stem, identity_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHECKPOINT_SUFFIX = ".sefi-train"  # nodes/train_policies.py's; read here without importing the pack


class UsageError(Exception):
    """Bad arguments or folders; the message says what to give instead."""


class Unreadable(Exception):
    """An identity file in --out is there but cannot be read; the person is refused and the file kept."""


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
    """One Person per sub-folder, named as the trainer names its identity file (a trailing '.safetensors' of the
    folder name dropped). What is not a person's folder or photo is logged, never passed over in silence."""
    if not people_dir.is_dir():
        raise UsageError(f"{people_dir} is not a folder: give a folder with one sub-folder of photos per person")
    people = []
    for entry in sorted(people_dir.iterdir()):
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_EXTENSIONS:
                log(f"skipping photo {entry}: it lies directly in {people_dir}; put it in its person's folder "
                    f"({people_dir / '<name>' / entry.name})")
            elif not entry.name.startswith("."):
                log(f"skipping {entry}: not a folder (each person is a sub-folder of photos)")
            continue
        if entry.name.startswith("."):
            log(f"skipping folder {entry}: a name starting with '.' is hidden, not a person (an identity name "
                "must not start with '.'); rename it to train that person")
            continue
        photos = []
        for item in sorted(entry.iterdir()):
            if item.is_file() and item.suffix.lower() in IMAGE_EXTENSIONS:
                photos.append(item)
            elif not item.name.startswith("."):
                log(f"{entry.name}: ignoring {item.name} (not a photo: photos are {', '.join(IMAGE_EXTENSIONS)} "
                    "files directly in the person's folder)")
        people.append(Person(file_stem(entry.name), entry, photos))
    if not people:
        raise UsageError(f"{people_dir} has no sub-folders: put each person's photos in a folder named after them "
                         f"({people_dir}/alice/1.jpg, {people_dir}/bob/1.jpg, ...)")
    return people


def name_collisions(people: list[Person], out_dir: Path) -> dict[Path, str]:
    """{person's folder: why it is refused} for every person whose identity name is another person's, or an
    identity's in --out, spelled differently (case, Unicode form, a '.safetensors' suffix:
    sefi_core.identity_names). Both would write one file, or two that look alike, so none of them is trained
    until the folders are renamed."""
    refused = {}
    for group in colliding_groups([p.folder.name for p in people]):
        shown = ", ".join(f"{folder}/" for folder in group)
        for person in (p for p in people if p.folder.name in group):
            refused[person.folder] = (f"the folders {shown} are one identity name ({canonical_name(person.name)!r} "
                                      "once case, Unicode form and a '.safetensors' suffix are set aside): rename "
                                      "all but one of them; none of them is trained until then")
    for person in people:
        if person.folder in refused:
            continue
        try:
            identity_file(out_dir, person.name)
        except NameCollision as exc:
            refused[person.folder] = f"{exc}; rename the folder {person.folder.name}/ to match"
    return refused


def existing_identity(out_dir: Path, name: str) -> tuple[bool, str]:
    """(True, note) when --out holds a loadable identity for `name`, (False, "") when it holds none. A file that
    is there but cannot be read (damaged, a newer format version, a permission or I/O error) raises Unreadable:
    what cannot be read may still be someone's only copy, so it is never trained over."""
    from sefi_core.identity import load_identity
    path = out_dir / f"{name}.safetensors"
    try:
        if not path.exists():
            return False, ""
        load_identity(path)
    except Exception as exc:  # IdentityFileError, OSError, and anything else a file raises
        raise Unreadable(f"{path} exists but cannot be read ({type(exc).__name__}: {exc}); it is kept and this "
                         f"person is not trained: fix or update what the message says, or move the file away to "
                         f"train {name} again") from exc
    return True, f"{path.name} already present and valid"


def checkpoint_step(out_dir: Path, name: str) -> int | None:
    """The step of --out/checkpoints/<name>.sefi-train, or None when there is none that reads."""
    path = out_dir / "checkpoints" / f"{name}{CHECKPOINT_SUFFIX}"
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with open(path, "rb") as f:  # a permission or I/O error is not "no checkpoint": never train over it
            f.read(8)
    except OSError as exc:
        raise CannotResume(f"its checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it is kept: fix "
                           "the error (or move the checkpoint away to train this person from the start)") from exc
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
    """(settled, to train): valid identities are skipped; people whose name collides with another's, whose
    identity file cannot be read, or whose photos are unusable fail, before any engine starts."""
    results: list[Result] = []
    jobs: list[Person] = []
    people = find_people(people_dir)
    collisions = name_collisions(people, out_dir)

    def fail(person: Person, problem: str) -> None:
        results.append(Result(person.name, "failed", 0.0, problem))
        log(f"{person.name}: failed ({problem})")

    for person in people:
        if person.folder in collisions:  # reported by folder: two of them may share the person's name
            results.append(Result(person.folder.name, "failed", 0.0, collisions[person.folder]))
            log(f"{person.folder.name}/: failed ({collisions[person.folder]})")
            continue
        try:
            valid, note = existing_identity(out_dir, person.name)
        except Unreadable as exc:
            fail(person, str(exc))
            continue
        if valid:
            results.append(Result(person.name, "skipped", 0.0, note))
            log(f"{person.name}: skipped ({note})")
            continue
        problem = check_photos(person)
        if problem:
            fail(person, problem)
            continue
        jobs.append(person)
    log(f"{len(jobs)} to train, {len(results)} settled before training ({out_dir})")
    return results, jobs


def settled_since(out_dir: Path, person: Person) -> Result | None:
    """The person checked again just before a worker takes them (settle_people ran before the queue, perhaps
    hours earlier, and the trainer is told to overwrite): an identity that appeared in --out since is skipped when
    it loads, and refused when it does not or is this name spelled differently. None: train them."""
    try:
        identity_file(out_dir, person.name)
        valid, note = existing_identity(out_dir, person.name)
    except (NameCollision, Unreadable) as exc:
        return Result(person.name, "failed", 0.0, str(exc))
    return Result(person.name, "skipped", 0.0, f"{note}: it appeared while this batch ran") if valid else None


def trained_identity(out_dir: Path, name: str) -> str:
    """'' when the identity a worker just saved is in --out and loads, else what is wrong with it."""
    try:
        valid, _ = existing_identity(out_dir, name)
    except Unreadable as exc:
        return f"not valid: {exc}"
    return "" if valid else "missing"


def summary_table(results: list[Result]) -> str:
    rows = [("person", "status", "seconds", "server", "message")]
    rows += [(r.person, r.status, f"{r.seconds:.1f}", r.server or "-", r.message) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    counts = {s: sum(1 for r in results if r.status == s) for s in ("trained", "skipped", "failed")}
    lines.append(f"{counts['trained']} trained, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(line.rstrip() for line in lines)
