"""The person checks of SeFiTrainIdentity fail closed (issue 32): when the face backend cannot run or fails, the
faces are unknown, not absent, and the run — a fresh one or a resume with new photos — is refused with the
backend's error unless allow_multiple_people opts out (then logged). New photos described by another backend than
the checkpoint's cannot be compared with its person either. A photo in which a working backend finds no face keeps
its documented path (dropped, or kept by its mask and logged)."""
from __future__ import annotations

import logging

import numpy as np
import pytest


from .test_train_safety import _interrupted_run, _refused, _train

RUN = dict(name="facecheck", overwrite=True)


@pytest.fixture
def broken(pack, monkeypatch):
    """Break the face backend one way: it cannot be built, or it fails on the photos."""
    faces = pack.core("faces")

    def apply(how: str) -> None:
        def fail(*args, **kwargs):
            raise RuntimeError("the face model file is damaged")
        monkeypatch.setattr(faces, "get_backend" if how == "unavailable" else "detect_faces", fail)
    return apply


@pytest.mark.parametrize("how, where", [("unavailable", "no face backend can run"),
                                        ("fails", "the face backend failed on image 0")])
def test_photos_the_backend_cannot_look_at_are_refused_with_its_error(host, face_photo, broken, how, where):
    broken(how)
    two_people = [face_photo("obama_1.jpg", 160), face_photo("biden_1.jpg", 160)]
    with pytest.raises(ValueError) as info:
        _refused(host, two_people, **RUN)
    message = str(info.value)
    assert f"could not be checked for one person: {where} (RuntimeError: the face model file is damaged)" in message
    assert "set allow_multiple_people to true" in message


def test_the_opt_out_trains_without_the_checks_and_says_so(host, sd15, face_photo, broken, caplog):
    broken("unavailable")
    with caplog.at_level(logging.WARNING, logger="sefi"):
        identity = _train(host, sd15, [face_photo("obama_1.jpg", 160)], allow_multiple_people=True, **RUN)[0]
    assert identity.training["steps_done"] == 1
    assert "could not be checked (no face backend can run" in caplog.text and "allow_multiple_people" in caplog.text


def test_a_resume_whose_new_photos_cannot_be_checked_is_refused(host, sd15, pack, face_photo, broken):
    """The live case: a cancelled run resumed under a new name with another person's photo, the backend broken."""
    ckpt = _interrupted_run(host, sd15, face_photo("obama_1.jpg", 160), pack, "facecheck_cut",
                            keep_checkpoint=True)
    before = ckpt.read_bytes()
    broken("fails")
    with pytest.raises(ValueError, match=r"could not be checked for one person: the face backend failed"):
        _refused(host, face_photo("biden_1.jpg", 160), name="facecheck_other", resume_from="facecheck_cut", steps=3,
                 overwrite=True)
    assert ckpt.read_bytes() == before


def _record(sha: str, kind: str, width: int) -> dict:
    return {"sha256": sha, "kind": kind, "descriptor": list(np.full(width, 0.1, dtype=float))}


def test_new_photos_of_another_descriptor_kind_cannot_pass_as_the_same_person(pack, caplog):
    photos = pack.glue("training_photos")
    before = [_record("a" * 64, "dlib-resnet-128", 128)]
    now = [_record("b" * 64, "insightface-arcface-512", 512)]
    with pytest.raises(ValueError, match=r"cannot be compared with the person the checkpoint was trained on: its "
                                         r"photos were described by the dlib-resnet-128 face backend, image 0 "
                                         r"\(insightface-arcface-512\)"):
        photos.compare_with_checkpoint(now, before, False, "cut", "me")
    with caplog.at_level(logging.INFO, logger="sefi"):
        photos.compare_with_checkpoint(now, before, True, "cut", "me")
    assert "cannot be compared with its person" in caplog.text and "they show the same person" not in caplog.text
    # no face detected in the new photo (kept by its mask): the documented path, logged, not refused
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sefi"):
        photos.compare_with_checkpoint([{"sha256": "c" * 64, "kind": None, "descriptor": None}], before, False,
                                       "cut", "me")
    assert "could not be compared with its person (no face descriptor)" in caplog.text
