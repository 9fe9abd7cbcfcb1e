"""SeFiTrainIdentity refuses a name that is an existing identity spelled differently — by case or Unicode form —
before any work, also with overwrite (issue 32: one canonical name per identity). Called without a model: reaching
it would fail otherwise."""
from __future__ import annotations

import unicodedata

import pytest


@pytest.fixture(scope="module")
def photo(face_photo):
    return face_photo("obama_1.jpg", 160)


def _refused(host, photo, **kw):
    args = dict(trigger="sks", steps=1, resolution=64, parametrisation="direct tokens", stages=1, overwrite=False)
    args.update(kw)
    return host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=photo, **args)


@pytest.mark.parametrize("existing, name", [
    ("Lookalike", "lookalike"),
    ("Lookalike", "LOOKALIKE.safetensors"),
    (unicodedata.normalize("NFD", "Renée"), unicodedata.normalize("NFC", "Renée")),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_another_spelling_of_an_existing_identity_is_refused(host, pack, photo, existing, name, overwrite):
    folder = pack.glue("train_policies").identity_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{existing}.safetensors"
    target.write_bytes(b"someone's identity")
    try:
        with pytest.raises(ValueError, match="spelled differently") as info:
            _refused(host, photo, name=name, overwrite=overwrite)
        assert repr(target.name) in str(info.value)
        assert target.read_bytes() == b"someone's identity"
        # the same spelling is not a collision: the ordinary "exists, set overwrite" refusal (or, with overwrite,
        # the model is reached: no model here)
        with pytest.raises((FileExistsError, AttributeError, TypeError, ValueError)) as same:
            _refused(host, photo, name=existing, overwrite=overwrite)
        assert "spelled differently" not in str(same.value)
    finally:
        target.unlink()
