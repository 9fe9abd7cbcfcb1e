"""Where a training run's files go and what it may do with them: the identity's name (a plain file name that
fits every file system), the checkpoint folders and the one `resume_from` names, and what a resumed run must keep
(its structure) or may change (logged). SeFiTrainIdentity (nodes/train.py) checks all of it before training."""
from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

from . import host
from .snapshots import longest_snapshot_name
from ..sefi_core.atomic import longest_temp_name, stale_temp_files
from ..sefi_core.train_state import TrainStateFileError, load_train_state
from ..sefi_core.training import TrainSettings

log = logging.getLogger("sefi")

PARAMETRISATIONS = {"self-attention generator": "self_attention", "direct tokens": "direct"}
CHECKPOINT_SUFFIX = ".sefi-train"


def identity_dir() -> Path:
    return Path(host.models_dir()) / host.IDENTITY_FOLDER


def checkpoint_dir() -> Path:
    return identity_dir() / "checkpoints"


MAX_FILE_NAME_BYTES = 255
"""The common file-name limit (ext4, NTFS, APFS, …); every file the trainer writes must fit, temp files included."""
WINDOWS_DEVICES = ("CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", *(f"COM{i}" for i in "0123456789¹²³"),
                   *(f"LPT{i}" for i in "0123456789¹²³"))
"""Names Windows reserves for devices, also with any extension (learn.microsoft.com: "Naming Files, Paths, and
Namespaces")."""
NAME_PUNCTUATION = set("-_. ")
VALID_NAME_HINT = ("a valid name is a plain file name such as 'my_face': letters and digits (any script), '-', '_', "
                   "'.' and spaces between them; not starting with '.', not ending with '.' or a space, not a "
                   "Windows device name (CON, PRN, AUX, NUL, CONIN$, CONOUT$, COM0-COM9, LPT0-LPT9, COM¹-COM³, "
                   "LPT¹-LPT³), no folders")


def produced_file_names(name: str) -> list[str]:
    """Every file name a training run of `name` may create: the identity, its checkpoint, its longest step snapshot,
    and their temp files."""
    finals = [f"{name}.safetensors", f"{name}{CHECKPOINT_SUFFIX}", longest_snapshot_name(name)]
    return finals + [longest_temp_name(f) for f in finals]


def check_name(name: str) -> str:
    """The identity's name, checked completely before any work: a plain file name (no folders, no '..'), valid on
    Windows too (workflows are shared across systems), and short enough that every file it produces — temp files
    included — fits the file-system limit. '.safetensors' is dropped if given."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name is empty; {VALID_NAME_HINT}")
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]

    def bad(what: str) -> ValueError:
        return ValueError(f"name {name[:80]!r}{'…' if len(name) > 80 else ''} {what}; {VALID_NAME_HINT}")

    control = sorted({f"U+{ord(c):04X}" for c in name if ord(c) < 32 or ord(c) == 127})
    if control:
        raise bad(f"contains control characters ({', '.join(control)})")
    if "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
        raise bad(f"must be a plain file name without folders, path separators or '..' (it is saved in "
                  f"{identity_dir()})")
    if name.startswith("."):
        raise bad("must not start with '.' (hidden files)")
    if name != name.strip() or name.endswith("."):
        raise bad("must not start or end with a space, nor end with '.' (Windows cannot open such files)")
    if name.split(".")[0].strip().upper() in WINDOWS_DEVICES:
        raise bad("is a device name on Windows")
    invalid = sorted({c for c in name if c not in NAME_PUNCTUATION and not _letter_or_digit(c)})
    if invalid:
        raise bad(f"contains {' '.join(repr(c) for c in invalid[:8])}")
    longest = max(produced_file_names(name), key=lambda f: len(f.encode("utf-8")))
    excess = len(longest.encode("utf-8")) - MAX_FILE_NAME_BYTES
    if excess > 0:
        raise bad(f"is too long: the files it produces (e.g. {longest[:40]}…) would exceed the "
                  f"{MAX_FILE_NAME_BYTES}-byte file-name limit; shorten it by at least {excess} bytes "
                  f"(UTF-8)")
    return name


def _letter_or_digit(c: str) -> bool:
    """A letter of any script (with its combining marks) or a decimal digit — not ², ½ or other number signs."""
    return unicodedata.category(c)[0] in "LM" or unicodedata.category(c) == "Nd"


def checkpoint_dirs() -> list[Path]:
    """The 'checkpoints' folders of every registered sefi_identities folder (the trainer writes to the first)."""
    dirs = [checkpoint_dir()]
    for folder in host.folder_paths.get_folder_paths(host.IDENTITY_FOLDER):
        d = Path(folder) / "checkpoints"
        if d not in dirs:
            dirs.append(d)
    return dirs


def _checkpoint_names(folders: list[Path]) -> list[str]:
    names = set()
    for d in folders:
        if d.is_dir():
            names.update(p.name[: -len(CHECKPOINT_SUFFIX)] for p in d.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file())
    return sorted(names)


def resolve_checkpoint(resume_from: str) -> Path:
    """The checkpoint `resume_from` names: a name (or relative path) inside the registered sefi_identities
    checkpoint folders. Anything else (absolute paths, '..', drive letters) is refused before the path is looked
    at, so a graph can neither read arbitrary files nor learn whether they exist."""
    value = resume_from.strip()
    folders = checkpoint_dirs()
    where = ", ".join(str(d) for d in folders)
    parts = value.replace("\\", "/").split("/")
    if (os.path.isabs(value) or value.startswith(("/", "\\", "~")) or ":" in value or ".." in parts
            or any(ord(c) < 32 for c in value) or "" in parts):
        raise ValueError(f"resume_from must be the name of a training checkpoint in {where} (e.g. 'my_face', "
                         f"as an interrupted run of name=my_face writes it), not a path elsewhere")
    names = [value] if value.endswith(CHECKPOINT_SUFFIX) else [value + CHECKPOINT_SUFFIX, value]
    for d in folders:
        for n in names:
            c = d.joinpath(*n.split("/"))
            if c.is_file():
                return c
    found = _checkpoint_names(folders)
    listing = f"; checkpoints there: {', '.join(found[:10])}{' …' if len(found) > 10 else ''}" if found else \
        " (there are none)"
    raise FileNotFoundError(f"resume_from={value[:80]!r}: no training checkpoint of that name in {where}{listing}")


def load_checkpoint(path: Path, resume_from: str):
    try:
        return load_train_state(path)
    except TrainStateFileError as e:
        raise ValueError(f"resume_from={resume_from}: {e}. Pick a checkpoint that SeFi Train Identity wrote, or "
                         f"start a new run (resume_from empty)") from e


STRUCTURE = (("parametrisation", "kind"), ("stages", "stages"), ("vectors_per_token", "vectors_per_token"),
             ("kv_split", "kv_split"))
"""Widgets that fix the shape of what is trained: a checkpoint continues only with the same values."""
WIDGET_OF_SETTING = {"lr": "learning_rate", "masked_diffusion": "masked_diffusion_loss", "templates":
                     "prompt_templates", "flip": "flip_augmentation", "scale_augment": "scale_augmentation"}
"""TrainSettings fields whose node widget has another name."""
LABEL_OF_KIND = {v: k for k, v in PARAMETRISATIONS.items()}


def check_resume_structure(state, kind: str, stages: int, vectors_per_token: int, kv_split: bool,
                           resume_from: str) -> None:
    """Refuse to continue a checkpoint with a different structure, listing each differing widget."""
    config = state.generator_config or {}
    here = {"kind": kind, "stages": stages, "vectors_per_token": vectors_per_token, "kv_split": kv_split}
    diffs = []
    for widget, key in STRUCTURE:
        theirs, ours = config.get(key), here[key]
        if theirs != ours:
            show = (lambda v: LABEL_OF_KIND.get(v, v)) if key == "kind" else (lambda v: v)
            diffs.append(f"{widget} is {show(ours)!r} here but {show(theirs)!r} in the checkpoint")
    if diffs:
        raise ValueError(f"resume_from={resume_from}: the checkpoint's structure differs from this node's settings: "
                         f"{'; '.join(diffs)}. Set these widgets to the checkpoint's values to continue it, or "
                         f"start a new run (resume_from empty)")


def log_resume_changes(state, settings: TrainSettings, name: str) -> dict:
    """Settings that may change on resume (steps, learning_rate, loss weights, precision, …) take the node's values;
    each change is logged and returned as {widget: [checkpoint value, now]} for the identity's metadata."""
    now = settings.to_dict()
    changed = {}
    for key in sorted(set(state.settings) | set(now)):
        if key in now and state.settings.get(key, now[key]) != now[key]:
            changed[WIDGET_OF_SETTING.get(key, key)] = [state.settings.get(key), now[key]]
    for widget, (old, new) in changed.items():
        log.info("[SeFi] %s: resuming at step %d with %s %r (the checkpoint had %r)", name, state.step, widget, new,
                 old)
    return changed


def remove_stale_temp_files(paths: list[Path], name: str) -> None:
    """Temp files a crash or kill left behind while writing this name's files (never anything else)."""
    for path in paths:
        for temp in stale_temp_files(path):
            temp.unlink(missing_ok=True)
            log.info("[SeFi] %s: removed %s, left over from an interrupted write", name, temp)
