"""One canonical name per identity: when two identity names are the same identity.

An identity named N is the file `N.safetensors`. Two names are the same identity when they differ only by the
'.safetensors' suffix (the trainer drops it), by case (Windows and macOS file systems hold one file for both) or
by Unicode form (NFC and NFD "café", or full-width letters: different files on Linux, one entry lookalike in
the loader's list). Writing one of them where the other exists either replaces it or puts a lookalike beside it;
both lose an identity, so such a collision is refused before anything trains (the trainer node, batch/).
"""
from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

IDENTITY_SUFFIX = ".safetensors"


class NameCollision(ValueError):
    """Two spellings of one identity name; the message names both and what to do."""


def file_stem(name: str) -> str:
    """The name an identity file gets: `name` without a trailing '.safetensors' (as the trainer writes it)."""
    return name[: -len(IDENTITY_SUFFIX)] if name.endswith(IDENTITY_SUFFIX) else name


def canonical_name(name: str) -> str:
    """The key two names of one identity share: the file stem, Unicode-compatibility-normalised and case-folded
    (NFKC, casefold, NFKC again, since case folding can undo the normal form)."""
    stem = unicodedata.normalize("NFKC", file_stem(name))
    return unicodedata.normalize("NFKC", stem.casefold())


def colliding_groups(names: Iterable[str]) -> list[list[str]]:
    """The groups (two names or more, in the given order) of names that are one identity but are spelled
    differently; [] when every name is its own identity."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(canonical_name(name), []).append(name)
    return [spellings for spellings in groups.values() if len(spellings) > 1]


def lookalike_files(folder: str | os.PathLike[str], name: str) -> list[Path]:
    """The identity files in `folder` that are the identity `name` spelled differently (not `name`'s own file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    key, own = canonical_name(name), f"{file_stem(name)}{IDENTITY_SUFFIX}"
    return sorted(p for p in folder.iterdir()
                  if p.name.lower().endswith(IDENTITY_SUFFIX) and p.name != own
                  and canonical_name(p.name[: -len(IDENTITY_SUFFIX)]) == key)


def identity_file(folder: str | os.PathLike[str], name: str) -> Path:
    """`folder/<name>.safetensors`, the file an identity named `name` is written to; raises NameCollision when
    `folder` already holds the same identity under another spelling (case, Unicode form), which writing this name
    would replace or duplicate. The same spelling is not a collision: overwriting it is the caller's decision."""
    others = lookalike_files(folder, name)
    if others:
        shown = ", ".join(repr(p.name) for p in others[:3])
        raise NameCollision(
            f"the name {file_stem(name)!r} is the identity already saved as {shown} in {Path(folder)}, spelled "
            f"differently (only case or Unicode form differ): on Windows and macOS that is one file, elsewhere two "
            f"entries that look alike in the list. Use exactly that spelling (with overwrite to replace it), or "
            f"pick a name that differs by more")
    return Path(folder) / f"{file_stem(name)}{IDENTITY_SUFFIX}"
