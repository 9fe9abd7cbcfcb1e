"""Atomic file writes: the target path holds either the old file or the complete new one, never a part.

The data goes to a temporary file in the target's own directory (so the final rename never crosses a
filesystem), is flushed and fsynced, and then `os.replace`s the target. Any failure before the rename
removes the temporary file and leaves an existing target untouched.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "longest_temp_name", "stale_temp_files"]

_TEMP_ATTEMPTS = 8
_TOKEN_BYTES = 6  # 12 hex digits


def _temp_name(name: str, token: str) -> str:
    return f".{name}.{token}.tmp"


def longest_temp_name(name: str) -> str:
    """The (longest) name of a temporary file for target `name`, so callers can check file-name limits up front."""
    return _temp_name(name, "0" * 2 * _TOKEN_BYTES)


def stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files that writes of `path` left behind (a crash or kill between create and rename): exactly the
    names this module makes for that target, nothing else in the folder."""
    target = Path(path)
    prefix, suffix = f".{target.name}.", ".tmp"
    hex_len = 2 * _TOKEN_BYTES
    if not target.parent.is_dir():
        return []
    found = []
    for p in target.parent.iterdir():
        n = p.name
        if n.startswith(prefix) and n.endswith(suffix) and len(n) == len(prefix) + hex_len + len(suffix):
            token = n[len(prefix):-len(suffix)]
            if all(c in "0123456789abcdef" for c in token) and p.is_file() and not p.is_symlink():
                found.append(p)
    return sorted(found)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(f)` on a temporary binary file next to `path`, then atomically move it to `path`.

    The new file keeps the permission bits of the file it replaces; a new file gets the process umask's
    default (the temporary file is created with mode 0o666, which the kernel masks). Returns the path.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {target}: the folder {directory} does not exist; create it first")
    fd, temp = _create_temp(directory, target.name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            os.chmod(temp, stat.S_IMODE(target.stat().st_mode))
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace `path` with `data`."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomically replace `path` with `text` (no newline translation, so the bytes are the same on every OS)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """Create an exclusive hidden temp file; os.open with 0o666 lets the umask decide the final mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_TEMP_ATTEMPTS):
        temp = directory / _temp_name(name, secrets.token_hex(_TOKEN_BYTES))
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary file in {directory}")


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself. Best effort: Windows and some filesystems cannot fsync a directory,
    and by now the new file is already complete and in place."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
