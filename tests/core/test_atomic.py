"""Atomic writes: the target is either the old file or the complete new one, and no temp file is left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sefi_core import atomic
from sefi_core.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_new_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    assert atomic_write_bytes(target, b"\x00\x01payload") == target
    assert target.read_bytes() == b"\x00\x01payload"
    assert _names(tmp_path) == ["out.bin"]


def test_callback_may_write_in_pieces(tmp_path: Path) -> None:
    target = tmp_path / "pieces.bin"
    atomic_write(target, lambda f: [f.write(bytes([i])) for i in range(5)])
    assert target.read_bytes() == bytes(range(5))


def test_text_is_utf8_without_newline_translation(tmp_path: Path) -> None:
    target = tmp_path / "t.json"
    atomic_write_text(target, "é\nx\r\n")
    assert target.read_bytes() == "é\nx\r\n".encode()


def test_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.bin"]


def test_failing_writer_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_fail(f) -> None:
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


def test_failing_rename_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def refuse(src, dst) -> None:
        raise PermissionError("file in use")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


def test_failure_without_previous_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _names(tmp_path) == []


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        atomic_write_bytes(tmp_path / "nope" / "out.bin", b"x")


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_keeps_mode_of_replaced_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_new_file_follows_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o640
