"""The batch trainer never trains over what it cannot read, never lets two spellings of one name write one identity,
and never passes over an input in silence (issue 32). No server and no model: everything here is decided before a
person reaches a worker, in batch/people.py and at the start of each engine's turn."""
from __future__ import annotations

import argparse
import shutil
import unicodedata
from collections import deque
from pathlib import Path

import pytest
import torch

from batch import cli, http_engine, people as batch_people
from sefi_core.identity import Identity, save_identity


def _identity_file(path: Path) -> Path:
    return save_identity(Identity.constant("sd1", {"clip_l": torch.zeros(1, 768)}, stages=1, trigger="sks",
                                           initializer="person"), path)


@pytest.fixture
def people(tmp_path, faces_dir):
    def build(*names: str) -> Path:
        root = tmp_path / "people"
        for name in names:
            (root / name).mkdir(parents=True)
            shutil.copy(faces_dir / "obama_1.jpg", root / name / "1.jpg")
        return root
    return build


def _settle(people_dir: Path, out: Path) -> tuple[dict[str, batch_people.Result], list[str]]:
    out.mkdir(exist_ok=True)
    results, jobs = batch_people.settle_people(people_dir, out)
    return {r.person: r for r in results}, [p.name for p in jobs]


# ----------------------------------------------------------------------------- unreadable is not absent


def test_identities_that_cannot_be_read_are_refused_and_kept(tmp_path, people, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "junk.safetensors").write_bytes(b"junk")
    newer = _identity_file(out / "newer.safetensors")
    data = newer.read_bytes().replace(b'"sefi.format_version":"1"', b'"sefi.format_version":"9"')
    newer.write_bytes(data)
    locked = _identity_file(out / "locked.safetensors")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import sefi_core.identity as identity_module
    real_load = identity_module.load_identity

    def load(path):  # a transient permission error that hides a good file
        if Path(path).name == "locked.safetensors":
            raise PermissionError(13, "Permission denied", str(path))
        return real_load(path)
    monkeypatch.setattr(identity_module, "load_identity", load)

    results, jobs = _settle(people("junk", "newer", "locked", "fresh"), out)
    assert jobs == ["fresh"]
    assert "not a safetensors file" in results["junk"].message
    assert "identity format 9, newer than this SeFi-IDE reads" in results["newer"].message
    assert "PermissionError" in results["locked"].message
    for name in ("junk", "newer", "locked"):
        assert results[name].status == "failed" and "it is kept" in results[name].message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_unreadable_checkpoint_is_not_trained_over(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ann.sefi-train").write_bytes(b"whatever it holds")
    import builtins
    real_open = builtins.open

    def failing_open(path, *a, **kw):
        if str(path).endswith("ann.sefi-train"):
            raise OSError(5, "Input/output error", str(path))
        return real_open(path, *a, **kw)
    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(batch_people.CannotResume, match=r"cannot be read \(OSError.*it is kept"):
        batch_people.resume_plan(out, "ann", 6)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"checkpoint_name": "m.safetensors", "face_backend": "dlib", "resolution": 64,
                                 "timeout": 10.0, **kw})


class _NoServer:
    """A client that fails the test if the engine reaches it."""

    def __getattr__(self, name):
        raise AssertionError(f"the engine talked to the server ({name}) about a person it must not train")


@pytest.mark.parametrize("appeared", ["valid", "unreadable", "lookalike"])
def test_an_identity_that_appears_while_the_batch_runs_is_never_trained_over(tmp_path, people, appeared):
    """settle_people runs before the queue; by a person's turn another run may have written their identity. Both
    engines look again before the trainer (told to overwrite) is started."""
    out = tmp_path / "out"
    _, jobs = _settle(people("ann"), out)
    assert jobs == ["ann"]
    target = out / ("Ann.safetensors" if appeared == "lookalike" else "ann.safetensors")
    if appeared == "unreadable":
        target.write_bytes(b"someone else's half-copied file")
    else:
        _identity_file(target)
    before = target.read_bytes()
    person = batch_people.find_people(tmp_path / "people")[0]
    expected = {"valid": ("skipped", "appeared while this batch ran"), "unreadable": ("failed", "it is kept"),
                "lookalike": ("failed", "spelled differently")}[appeared]

    server = http_engine.Server("http://127.0.0.1:9", _NoServer())
    result = http_engine.train_person(server, person, _args(), {"steps": 2}, out, "server 1")
    assert (result.status, result.server) == (expected[0], "server 1") and expected[1] in result.message

    ray_engine = pytest.importorskip("batch.ray_engine")
    job = object.__new__(ray_engine.RayJob)  # the driver's queue alone: no Ray, no actor
    job.out_dir, job.train_inputs, job.args = out, {"steps": 2}, _args()
    job.workers = {"worker 1": ray_engine.Worker("worker 1", _NoServer())}
    job.idle, job.pending, job.in_flight, job.results = ["worker 1"], deque([ray_engine.Task(person)]), {}, []
    job.total, job.started = 1, 0.0
    job._dispatch()
    assert not job.in_flight and job.idle == ["worker 1"]
    assert [(r.status, r.server) for r in job.results] == [(expected[0], "worker 1")]
    assert expected[1] in job.results[0].message
    assert target.read_bytes() == before


# ----------------------------------------------------------------------------- one canonical name


def test_folders_that_are_one_identity_name_are_refused_before_anything_trains(tmp_path, people):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = people("alice", "alice.safetensors", "Bob", "bob", nfc, "dora.safetensors")
    if len({p.name for p in root.iterdir()}) < 6:
        pytest.skip("this file system folds case or Unicode forms itself")
    (root / nfd).mkdir()  # a second spelling of café, beside the first
    shutil.copy(root / nfc / "1.jpg", root / nfd / "1.jpg")
    results, jobs = _settle(root, tmp_path / "out")
    assert jobs == ["dora"]  # its '.safetensors' is dropped, as the trainer drops it: dora.safetensors, not .s.s
    for folder in ("alice", "alice.safetensors", "Bob", "bob", nfc, nfd):
        assert results[folder].status == "failed" and "are one identity name" in results[folder].message
    assert "alice/, alice.safetensors/" in results["alice"].message


def test_a_person_whose_identity_exists_under_another_spelling_is_refused(tmp_path, people):
    out = tmp_path / "out"
    out.mkdir()
    _identity_file(out / "alice.safetensors")
    _identity_file(out / "bob.safetensors")
    results, jobs = _settle(people("Alice", "bob", "carol"), out)
    assert jobs == ["carol"]
    assert results["bob"].status == "skipped"  # the same spelling is the ordinary resume
    assert results["Alice"].status == "failed" and "'alice.safetensors'" in results["Alice"].message
    assert "rename the folder Alice/" in results["Alice"].message


def test_the_whole_batch_reports_collisions_and_exits_failed(tmp_path, people, capsys):
    out = tmp_path / "out"
    root = people("alice", "alice.safetensors")
    rc = cli.main([str(root), "--out", str(out), "--server", "http://127.0.0.1:9", "--checkpoint", "m"])
    text = capsys.readouterr().out
    assert rc == cli.EXIT_FAILED and "0 trained, 0 skipped, 2 failed" in text, text
    assert text.count("are one identity name") >= 2 and "no usable ComfyUI server" not in text, text
    assert not list(out.glob("*.safetensors"))


# ----------------------------------------------------------------------------- nothing skipped in silence


def test_what_is_not_a_person_or_a_photo_is_logged(tmp_path, people, capsys):
    root = people("ann")
    shutil.copy(root / "ann" / "1.jpg", root / "stray.jpg")
    (root / "...").mkdir()
    shutil.copy(root / "ann" / "1.jpg", root / "..." / "1.jpg")
    (root / "notes.txt").write_text("x")
    (root / "ann" / "2.heic").write_bytes(b"x")
    found = batch_people.find_people(root)
    assert [p.name for p in found] == ["ann"] and [p.name for p in found[0].photos] == ["1.jpg"]
    text = capsys.readouterr().out
    assert "skipping photo" in text and "stray.jpg: it lies directly in" in text
    assert f"skipping folder {root / '...'}: a name starting with '.'" in text
    assert "notes.txt: not a folder" in text
    assert "ann: ignoring 2.heic (not a photo" in text
