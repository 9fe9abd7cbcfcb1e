"""SeFiTrainIdentity refuses a batch of several people's photos unless the user opts in (issue: an identity trained
on two people is neither of them). Real photos, the offline dlib backend's descriptors."""
from __future__ import annotations

import logging

import pytest


def _train(host, sd15, images, **kw):
    model, clip, vae = sd15
    args = dict(name="one_person", trigger="sks", initializer="person", steps=1, learning_rate=0.0, stages=1,
                vectors_per_token=1, parametrisation="direct tokens", kv_split=True, attention_loss="off",
                attention_weight=0.003, loss_sites="quarter", masked_diffusion_loss=False,
                prompt_templates="a photo of the face of {}", flip_augmentation=False, scale_augmentation=False,
                seed=0, resolution=64, batch_size=1, checkpoint_every=0, resume_from="", overwrite=True)
    args.update(kw)
    return host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=images, **args)


def test_photos_of_two_people_are_refused_before_any_work(host, sd15, face_photo):
    images = [face_photo("obama_1.jpg", 400), face_photo("biden_1.jpg", 400)]
    with pytest.raises(ValueError, match=r"more than one person: image 1 .*allow_multiple_people") as err:
        _train(host, (None, None, None), images)  # nothing may touch a model before this refusal
    assert "which_face" in str(err.value)


def test_all_faces_of_a_group_photo_are_refused(host, sd15, face_photo):
    crops = host.run("SeFiFaceMask", image=face_photo("two_people.jpg"), backend="dlib", which_face="all",
                     face_index=0, mask_shape="ellipse", grow=0, feather=0, crop_size=160, crop_margin=0.25,
                     on_no_face="skip", insightface_pack="antelopev2")[1]
    assert crops.shape[0] == 2
    with pytest.raises(ValueError, match="more than one person"):
        _train(host, sd15, crops)


def test_a_raw_group_photo_is_refused_too(host, sd15, face_photo):
    """two_people.jpg given straight to the trainer (no SeFi Face Mask in front) trained both faces into one."""
    with pytest.raises(ValueError, match=r"more than one person: image 0 shows 2 people.*which_face=largest"):
        _train(host, (None, None, None), [face_photo("two_people.jpg")])


def test_one_person_trains_and_the_opt_in_trains_a_mixed_batch(host, sd15, pack, face_photo, caplog):
    same = [face_photo("obama_1.jpg", 400), face_photo("obama_2.jpg", 400)]
    photos = pack.glue("training_photos")
    assert photos.different_people(photos.survey(same)) == []
    assert _train(host, sd15, same)[0].training["steps_done"] == 1
    mixed = [face_photo("obama_1.jpg", 400), face_photo("biden_1.jpg", 400)]
    with caplog.at_level(logging.WARNING, logger="sefi"):
        identity = _train(host, sd15, mixed, allow_multiple_people=True)[0]
    assert identity.training["steps_done"] == 1
    assert "allow_multiple_people" in caplog.text and "image 1" in caplog.text
