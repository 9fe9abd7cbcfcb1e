"""What a resumed run is compared with (issue 20): the checkpoint's photos (another person's photos mixed identities
without a word), its initializer (SDXL's pooled y is rebuilt from it), and the scale of its tokens (a diverged run's
finite ~1e30 tokens became a silent black picture)."""
from __future__ import annotations

import json
import logging

import pytest
from safetensors import safe_open

from .test_train_safety import _interrupted_run, _refused, _train


@pytest.fixture(scope="module")
def obama(face_photo):
    return face_photo("obama_1.jpg", 400)  # the size the one-person tests use: descriptors are reliable there


def _photo_hash(pack, image) -> str:
    return pack.glue("training_photos").photo_hash(image[0])


def test_resume_with_another_persons_photos_is_refused(host, sd15, pack, obama, face_photo, caplog):
    """Train imgchg on obama_1, cancel; resume it under another name with biden_1: refused (it also got around the
    one-person check). With allow_multiple_people it trains, says so, and the identity lists both photos."""
    biden = face_photo("biden_1.jpg", 400)
    ckpt = _interrupted_run(host, sd15, obama, pack, "imgchg", keep_checkpoint=True)
    with pytest.raises(ValueError, match=r"resume_from=imgchg: the photos are not of the person the checkpoint was "
                                         r"trained on: image 0 \(distance 0\.\d+\).*allow_multiple_people"):
        _refused(host, biden, name="other", resume_from="imgchg", steps=3)
    assert ckpt.is_file()
    with caplog.at_level(logging.INFO, logger="sefi"):
        identity = _train(host, sd15, biden, name="other", resume_from="imgchg", steps=3, overwrite=True,
                          allow_multiple_people=True, keep_checkpoint=True)[0]
    # one verdict: another person, never "the same person" beside it
    assert "resuming imgchg with other photos: 1 new, 1 of the checkpoint's no longer given; photos of another " \
           "person (image 0" in caplog.text
    assert "the same person" not in caplog.text
    old, new = _photo_hash(pack, obama), _photo_hash(pack, biden)
    assert identity.image_hashes == (old, new)
    assert identity.training["changed_on_resume"]["photos"] == {"checkpoint": [old], "now": [new]}


def test_resume_with_other_photos_of_the_same_person_is_logged_and_recorded(host, sd15, pack, obama, face_photo,
                                                                             caplog):
    again = face_photo("obama_2.jpg", 400)
    _interrupted_run(host, sd15, obama, pack, "samechg")
    with caplog.at_level(logging.INFO, logger="sefi"):
        identity = _train(host, sd15, again, name="samechg", resume_from="samechg", steps=3, initializer="man")[0]
    assert "resuming samechg with other photos: 1 new, 1 of the checkpoint's no longer given; they show the same " \
           "person" in caplog.text
    old, new = _photo_hash(pack, obama), _photo_hash(pack, again)
    assert identity.image_hashes == (old, new)
    changed = identity.training["changed_on_resume"]
    assert changed["photos"] == {"checkpoint": [old], "now": [new]}
    # the initializer builds SDXL's pooled y at every step: a change is detected, logged and recorded like the others
    assert changed["initializer"] == ["person", "man"]
    assert "resuming at step 1 with initializer 'man' (the checkpoint had 'person')" in caplog.text


def test_the_same_photos_change_nothing(host, sd15, pack, obama):
    _interrupted_run(host, sd15, obama, pack, "nochg")
    identity = _train(host, sd15, obama, name="nochg", resume_from="nochg", steps=3)[0]
    assert "photos" not in identity.training["changed_on_resume"]
    assert identity.image_hashes == (_photo_hash(pack, obama),)


def test_tokens_that_blow_up_never_become_a_checkpoint_or_an_identity(host, sd15, pack, obama):
    """lr 1e9, steps 6, checkpoint_every 2: the loss stays finite while the tokens reach ~1e10 and more. The run
    stops at its first checkpoint, says what happened and what to change, and leaves no file that samples black."""
    train = pack.glue("train")
    with pytest.raises(pack.core("training").TrainingDivergedError) as info:
        _train(host, sd15, obama, name="blown", steps=6, checkpoint_every=2, learning_rate=1e9, overwrite=True)
    msg = str(info.value)
    assert "the tokens have blown up: clip_l vectors are up to" in msg and "lower learning_rate (now 1e+09)" in msg
    assert not (train.identity_dir() / "blown.safetensors").exists()
    assert not (train.checkpoint_dir() / "blown.sefi-train").exists()
    # a healthy identity records the text encoder's scale, so loading can check it without the model
    identity = _train(host, sd15, obama, name="scaled", steps=1, overwrite=True)[0]
    with safe_open(str(train.identity_dir() / "scaled.safetensors"), framework="pt") as f:
        norms = json.loads(f.metadata()["sefi.embedding_norms"])
    assert norms == dict(identity.embedding_norms) and norms["clip_l"] == pytest.approx(0.02 * 768**0.5, rel=0.02)


def test_a_checkpoint_holding_blown_up_tokens_is_refused(host, sd15, pack, obama):
    """A checkpoint an earlier version wrote after its run diverged: resuming it is refused, naming resume_from."""
    state_io = pack.core("train_state")
    ckpt = _interrupted_run(host, sd15, obama, pack, "oldblown")
    state = state_io.load_train_state(ckpt)
    state.generator = {k: v * 1e30 for k, v in state.generator.items()}
    state_io.save_train_state(state, ckpt)
    with pytest.raises(ValueError, match=r"resume_from=oldblown: .*the checkpoint \(step 1\) holds tokens that have "
                                         r"blown up.*lower learning_rate"):
        _train(host, sd15, obama, name="oldblown", resume_from="oldblown", steps=3)
    assert not (pack.glue("train").identity_dir() / "oldblown.safetensors").exists()
