"""Whether a node's file output is still what the node wrote: the value of its IS_CHANGED.

The hosts cache a node's outputs and run it again only when its inputs or its IS_CHANGED value differ from the
last run's. A trainer without IS_CHANGED whose identity file was deleted (or replaced) since answered a re-queue
from that cache: "success", and no file. With this, the value stays the one of the run that wrote the file as long
as the file is unchanged (a re-queue is still answered from the cache: nothing is trained twice), and becomes a
new one when the file is gone or differs (the node runs again: it retrains, or refuses a file it did not write).

The value must equal, for an unchanged file, what IS_CHANGED returned *before* the run that wrote it (the host
compares with that one), so each write remembers the value from before it. What this process did not write is
left to the host's own caching (an empty value). Files are compared by size and modification time.
"""
from __future__ import annotations

import threading
from pathlib import Path

_lock = threading.Lock()
_written: dict[str, tuple[str, str]] = {}
"""file -> (its fingerprint right after this process wrote it, the change value from before that run)."""
_last_file_of_node: dict[str, str] = {}
"""node id -> the file its last run wrote (for a node whose name input is linked: IS_CHANGED sees no value)."""


def fingerprint(path: Path) -> str:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "absent"
    return f"{stat.st_size} bytes, modified {stat.st_mtime_ns}"


def change_value(path: Path | None, node_id: str | None = None) -> str:
    """What IS_CHANGED returns for a node whose output is `path` (or, when None, the file node `node_id` last
    wrote)."""
    with _lock:
        key = str(path) if path is not None else _last_file_of_node.get(str(node_id))
        record = _written.get(key) if key is not None else None
    if record is None:
        return ""
    after, before = record
    now = fingerprint(Path(key))
    return before if now == after else f"{key} changed since this node wrote it: {now} (was {after})"


def remember(path: Path, before: str, node_id: str | None = None) -> None:
    """After a run wrote `path`: `before` is change_value's answer from before that run."""
    with _lock:
        _written[str(path)] = (fingerprint(path), before)
        if node_id is not None:
            _last_file_of_node[str(node_id)] = str(path)
