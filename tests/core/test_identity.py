"""The Identity value object and its .safetensors file: validation, bit-exact round trip, clear load errors."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from sefi_core.identity import (
    FORMAT_VERSION,
    Identity,
    IdentityFileError,
    hash_array,
    hash_image_bytes,
    load_identity,
    save_identity,
)

HASH = hashlib.sha256(b"face.png").hexdigest()


def make(family: str = "sd1", stages: int = 5, n: int = 2, seed: int = 0, **kw) -> Identity:
    g = torch.Generator().manual_seed(seed)
    widths = {"clip_l": 768, "clip_g": 1280} if family == "sdxl" else {"clip_l": 768}
    tokens = {enc: torch.randn(stages, 2, n, c, generator=g) for enc, c in widths.items()}
    args = {"trigger": "sks", "initializer": "person", "training": {"lr": 1e-4, "steps": 600}, "image_hashes": (HASH,)}
    args.update(kw)
    return Identity(family, tokens, **args)


def assert_same(a: Identity, b: Identity) -> None:
    assert (a.family, a.trigger, a.initializer, a.training, a.image_hashes) == (
        b.family, b.trigger, b.initializer, b.training, b.image_hashes,
    )
    assert list(a.tokens) == list(b.tokens)
    for enc in a.tokens:
        assert a.tokens[enc].dtype == b.tokens[enc].dtype == torch.float32
        assert a.tokens[enc].shape == b.tokens[enc].shape
        # bit-exact, including -0.0 and subnormals
        assert torch.equal(a.tokens[enc].view(torch.int32), b.tokens[enc].view(torch.int32))


# --- the value object ---------------------------------------------------------------------------------


def test_properties_and_stage_tokens() -> None:
    ident = make("sdxl", stages=3, n=4)
    assert (ident.stages, ident.vectors_per_token, ident.encoders) == (3, 4, ("clip_l", "clip_g"))
    k, v = ident.stage_tokens("clip_g", 2)
    assert k.shape == v.shape == (4, 1280)
    assert torch.equal(k, ident.tokens["clip_g"][2, 0]) and torch.equal(v, ident.tokens["clip_g"][2, 1])


def test_fallback_is_mean_over_stages_and_kv() -> None:
    ident = make(stages=3, n=2)
    expected = ident.tokens["clip_l"].reshape(6, 2, 768).mean(0)
    assert torch.allclose(ident.fallback("clip_l"), expected)
    assert ident.fallback("clip_l").shape == (2, 768)


def test_constant_identity() -> None:
    vec = torch.full((2, 768), 0.5)
    ident = Identity.constant("sd1", {"clip_l": vec}, stages=4, trigger="sks", initializer="person")
    assert ident.stages == 4 and ident.vectors_per_token == 2
    for s in range(4):
        k, v = ident.stage_tokens("clip_l", s)
        assert torch.equal(k, vec) and torch.equal(v, vec)
    assert torch.equal(ident.fallback("clip_l"), vec)


def test_tokens_are_private_copies() -> None:
    source = torch.zeros(1, 2, 1, 768, requires_grad=True)
    ident = Identity("sd1", {"clip_l": source}, "sks", "person")
    with torch.no_grad():
        source += 1
    assert ident.tokens["clip_l"].abs().sum() == 0
    assert not ident.tokens["clip_l"].requires_grad
    with pytest.raises(TypeError):
        ident.tokens["clip_l"] = source  # type: ignore[index]
    with pytest.raises(AttributeError):
        ident.trigger = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda a: a.update(family="sd3"), "unknown model family 'sd3'"),
        (lambda a: a["tokens"].pop("clip_g"), r"needs tokens for exactly \['clip_l', 'clip_g'\]"),
        (lambda a: a["tokens"].update(clip_t5=torch.zeros(5, 2, 2, 768)), "needs tokens for exactly"),
        (lambda a: a["tokens"].update(clip_g=torch.zeros(5, 2, 2, 768)), r"\[S, 2, n, 1280\]"),
        (lambda a: a["tokens"].update(clip_l=torch.zeros(5, 3, 2, 768)), r"\[S, 2, n, 768\]"),
        (lambda a: a["tokens"].update(clip_l=torch.zeros(5, 2, 2, 768, dtype=torch.float64)), r"float32.*\.float\(\)"),
        (lambda a: a["tokens"].update(clip_l=torch.zeros(5, 2, 2, 768).tolist()), "must be a torch.Tensor"),
        (lambda a: a["tokens"].update(clip_l=torch.zeros(4, 2, 2, 768)), "same stages S and vectors per token n"),
        (lambda a: a["tokens"].update(clip_l=torch.zeros(5, 2, 3, 768)), "same stages S and vectors per token n"),
        (lambda a: a["tokens"].update(clip_l=torch.zeros(11, 2, 2, 768)), "11 stages; an identity has 1 to 10"),
        (lambda a: a["tokens"].update(clip_l=torch.zeros(5, 2, 0, 768)), "0 vectors per token"),
        (lambda a: a["tokens"]["clip_g"].__setitem__((0, 0, 0, slice(0, 3)), float("nan")), "3 non-finite"),
        (lambda a: a.update(trigger="two words"), "single word"),
        (lambda a: a.update(trigger=""), "non-empty"),
        (lambda a: a.update(initializer="a person"), "initializer must be a single word"),
        (lambda a: a.update(training={"x": object()}), "JSON-serialisable"),
        (lambda a: a.update(training={"x": float("nan")}), "JSON-serialisable"),
        (lambda a: a.update(image_hashes=("abc",)), "sha256 hex"),
        (lambda a: a.update(image_hashes=(HASH.upper(),)), "sha256 hex"),
    ],
)
def test_invalid_identities_are_refused(change: Callable[[dict], object], fragment: str) -> None:
    args = {
        "family": "sdxl",
        "tokens": {"clip_l": torch.zeros(5, 2, 2, 768), "clip_g": torch.zeros(5, 2, 2, 1280)},
        "trigger": "sks",
        "initializer": "person",
    }
    change(args)
    with pytest.raises(ValueError, match=fragment):
        Identity(**args)


def test_bad_encoder_and_stage_arguments() -> None:
    ident = make(stages=5)
    with pytest.raises(ValueError, match="not 'clip_g'"):
        ident.stage_tokens("clip_g", 0)
    with pytest.raises(ValueError, match="from 0 to 4"):
        ident.stage_tokens("clip_l", 5)
    with pytest.raises(ValueError, match="not 'clip_g'"):
        ident.fallback("clip_g")


# --- hashes -------------------------------------------------------------------------------------------


def test_hash_helpers() -> None:
    assert hash_image_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    img = np.random.default_rng(0).random((4, 5, 3), dtype=np.float32)
    assert hash_array(img) == hash_array(torch.from_numpy(img))
    assert hash_array(img) == hash_array(img.copy())
    assert hash_array(img) != hash_array(img.reshape(5, 4, 3))
    assert hash_array(img) != hash_array(img.astype(np.float64))
    assert hash_array(img[:, ::-1]) == hash_array(np.ascontiguousarray(img[:, ::-1]))
    Identity.constant("sd1", {"clip_l": torch.zeros(1, 768)}, stages=1, trigger="x", initializer="person",
                      image_hashes=[hash_array(img)])


# --- file format --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize(("stages", "n"), [(1, 1), (5, 1), (10, 3)])
def test_round_trip_is_bit_exact(tmp_path: Path, family: str, stages: int, n: int) -> None:
    ident = make(family, stages=stages, n=n)
    special = torch.tensor([-0.0, 1e-45, -3.4e38, 3.4e38, 1.17e-38])
    ident.tokens["clip_l"].view(-1)[: len(special)] = special  # exercise sign of zero and subnormals
    path = save_identity(ident, tmp_path / "me.safetensors")
    assert_same(load_identity(path), ident)


def test_file_layout_and_metadata(tmp_path: Path) -> None:
    ident = make("sdxl", stages=5, n=2)
    path = save_identity(ident, tmp_path / "me.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
    assert keys == {"sefi.clip_l.k", "sefi.clip_l.v", "clip_l", "sefi.clip_g.k", "sefi.clip_g.v", "clip_g"}
    assert shapes["sefi.clip_g.v"] == [5, 2, 1280] and shapes["clip_l"] == [2, 768] and shapes["clip_g"] == [2, 1280]
    assert meta["sefi.format_version"] == FORMAT_VERSION == "1"
    assert (meta["sefi.family"], meta["sefi.stages"], meta["sefi.vectors_per_token"]) == ("sdxl", "5", "2")
    assert (meta["sefi.trigger"], meta["sefi.initializer"]) == ("sks", "person")
    assert json.loads(meta["sefi.training"]) == {"lr": 1e-4, "steps": 600}
    assert json.loads(meta["sefi.image_hashes"]) == [HASH]
    assert "sks" in meta["modelspec.title"]


def test_stock_embedding_keys_hold_the_fallback(tmp_path: Path) -> None:
    # What ComfyUI's load_embed picks for `embedding:name` (embed_key clip_l / clip_g).
    ident = make("sdxl", n=3)
    loaded = safetensors.torch.load_file(save_identity(ident, tmp_path / "me.safetensors"))
    assert torch.equal(loaded["clip_l"], ident.fallback("clip_l"))
    assert torch.equal(loaded["clip_g"], ident.fallback("clip_g"))
    assert torch.equal(loaded["sefi.clip_g.k"], ident.tokens["clip_g"][:, 0])


def test_save_requires_safetensors_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        save_identity(make(), tmp_path / "me.pt")


def test_failed_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_identity(make(seed=1), tmp_path / "me.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("serializer exploded")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(RuntimeError, match="serializer exploded"):
        save_identity(make(seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["me.safetensors"]


def test_save_overwrites(tmp_path: Path) -> None:
    path = save_identity(make(seed=1), tmp_path / "me.safetensors")
    second = make(seed=2, trigger="ohwx")
    save_identity(second, path)
    assert_same(load_identity(path), second)


# --- load errors ---------------------------------------------------------------------------------------


def _parts(tmp_path: Path, family: str = "sd1") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a valid file, to be broken one way at a time."""
    path = save_identity(make(family, stages=5, n=2), tmp_path / "good.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, path, metadata)
    return path


def _load_error(path: Path) -> str:
    with pytest.raises(IdentityFileError) as info:
        load_identity(path)
    assert info.value.path == path and info.value.problem and info.value.fix
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _load_error(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_tiny_file_is_not_safetensors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    message = _load_error(path)
    assert f"only {len(content)} bytes: not a safetensors file" in message


def test_truncated_tensor_data(tmp_path: Path) -> None:
    path = save_identity(make(), tmp_path / "me.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    message = _load_error(path)
    assert "truncated" in message and "copy or download it again" in message


def test_truncated_header(tmp_path: Path) -> None:
    path = save_identity(make(), tmp_path / "me.safetensors")
    path.write_bytes(path.read_bytes()[:50])
    assert "truncated: its header needs" in _load_error(path)


def test_corrupt_header(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    junk = b"{not json at all"
    path.write_bytes(struct.pack("<Q", len(junk)) + junk)
    assert "header is corrupt" in _load_error(path)


def test_torch_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "embedding.pt"
    torch.save({"clip_l": torch.zeros(1, 768)}, path)
    message = _load_error(path)
    assert "not a safetensors file" in message and ".pt/.bin textual-inversion embedding" in message


def test_plain_textual_inversion_embedding(tmp_path: Path) -> None:
    path = _write(tmp_path, {"clip_l": torch.zeros(2, 768)}, None)
    message = _load_error(path)
    assert "plain textual-inversion embedding, not a SeFi identity" in message
    assert "embedding:<name>" in message


def test_stripped_metadata(tmp_path: Path) -> None:
    tensors, _ = _parts(tmp_path)
    assert "SeFi tensors but no sefi.* metadata" in _load_error(_write(tmp_path, tensors, None))


def test_unrelated_safetensors(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model.weight": torch.zeros(2, 2)}, {"format": "pt"})
    assert "no SeFi metadata" in _load_error(path)


def test_newer_format_is_refused_not_misread(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    meta["sefi.format_version"] = "2"
    message = _load_error(_write(tmp_path, tensors, meta))
    assert "identity format 2, newer than this SeFi-IDE reads (1)" in message and "update the SeFi-IDE" in message


def test_garbage_format_version(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    meta["sefi.format_version"] = "1.0-beta"
    assert "unknown identity format version '1.0-beta'" in _load_error(_write(tmp_path, tensors, meta))


def test_unknown_family(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    meta["sefi.family"] = "flux"
    assert "sefi.family is 'flux'" in _load_error(_write(tmp_path, tensors, meta))


@pytest.mark.parametrize(("key", "value"), [("sefi.stages", "11"), ("sefi.stages", "0"), ("sefi.stages", "five"),
                                            ("sefi.vectors_per_token", "-1")])
def test_sizes_out_of_range(tmp_path: Path, key: str, value: str) -> None:
    tensors, meta = _parts(tmp_path)
    meta[key] = value
    message = _load_error(_write(tmp_path, tensors, meta))
    assert f"metadata {key} is '{value}'; expected an integer from 1 to" in message


@pytest.mark.parametrize("key", ["sefi.stages", "sefi.vectors_per_token"])
@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "\uff15"])  # superscript two, Arabic-Indic three, fullwidth five
def test_non_ascii_digits_in_sizes_name_file_and_key(tmp_path: Path, key: str, value: str) -> None:
    """str.isdigit() accepts these but int() may not (or reads them as another number): a clear file error."""
    tensors, meta = _parts(tmp_path)
    meta[key] = value
    path = _write(tmp_path, tensors, meta)
    message = _load_error(path)
    assert str(path) in message and f"metadata {key} is {value!r}; expected an integer from 1 to" in message


def test_superscript_format_version_is_a_clear_error(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    meta["sefi.format_version"] = "\u00b2"
    path = _write(tmp_path, tensors, meta)
    message = _load_error(path)
    assert str(path) in message and "unknown identity format version '\u00b2'" in message


def test_family_mismatch_sdxl_tensors_sd1_metadata(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path, "sdxl")
    meta["sefi.family"] = "sd1"
    message = _load_error(_write(tmp_path, tensors, meta))
    assert "metadata says family 'sd1'" in message and "clip_g" in message


def test_family_mismatch_sd1_tensors_sdxl_metadata(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path, "sd1")
    meta["sefi.family"] = "sdxl"
    assert "metadata says family 'sdxl'" in _load_error(_write(tmp_path, tensors, meta))


def test_family_mismatch_by_width(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    tensors = {k: torch.zeros(*v.shape[:-1], 1280) for k, v in tensors.items()}
    message = _load_error(_write(tmp_path, tensors, meta))
    assert "1280 wide" in message and "family mismatch" in message and "768" in message


def test_missing_key(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    del tensors["sefi.clip_l.v"]
    assert "missing tensor key(s) ['sefi.clip_l.v']" in _load_error(_write(tmp_path, tensors, meta))


def test_missing_fallback_key(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    del tensors["clip_l"]
    assert "missing tensor key(s) ['clip_l']" in _load_error(_write(tmp_path, tensors, meta))


def test_unexpected_key(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    tensors["emb_params"] = torch.zeros(1, 768)
    assert "unexpected tensor key(s) ['emb_params']" in _load_error(_write(tmp_path, tensors, meta))


def test_wrong_shape_names_key_expected_and_got(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    tensors["sefi.clip_l.k"] = tensors["sefi.clip_l.k"][:4]
    message = _load_error(_write(tmp_path, tensors, meta))
    assert "tensor 'sefi.clip_l.k' has shape [4, 2, 768], expected [5, 2, 768]" in message


def test_wrong_fallback_shape(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    tensors["clip_l"] = torch.zeros(768)
    assert "tensor 'clip_l' has shape [768], expected [2, 768]" in _load_error(_write(tmp_path, tensors, meta))


def test_wrong_dtype(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    tensors["sefi.clip_l.v"] = tensors["sefi.clip_l.v"].half()
    assert "tensor 'sefi.clip_l.v' has dtype F16, expected F32" in _load_error(_write(tmp_path, tensors, meta))


def test_non_finite_values_name_key_and_count(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    tensors["sefi.clip_l.v"][1, 0, :2] = float("nan")
    tensors["sefi.clip_l.v"][2, 1, 5] = float("inf")
    message = _load_error(_write(tmp_path, tensors, meta))
    assert "tensor 'sefi.clip_l.v' has 3 non-finite value(s)" in message and "retrain" in message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("sefi.trigger", "two words", "single word"),
        ("sefi.initializer", "", "initializer"),
        ("sefi.training", "{broken", "sefi.training is not valid JSON"),
        ("sefi.training", "[1, 2]", "sefi.training must be a JSON dict"),
        ("sefi.image_hashes", '["nothex"]', "sha256 hex"),
    ],
)
def test_bad_descriptive_metadata(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    tensors, meta = _parts(tmp_path)
    meta[key] = value
    assert fragment in _load_error(_write(tmp_path, tensors, meta))


def test_missing_trigger_metadata(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    del meta["sefi.trigger"]
    assert "non-empty" in _load_error(_write(tmp_path, tensors, meta))


def test_other_tools_metadata_is_ignored(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)
    meta["modelspec.author"] = "someone"
    assert load_identity(_write(tmp_path, tensors, meta)).trigger == "sks"


def test_error_is_a_value_error_with_readable_message(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.safetensors: the file has only 0 bytes"):
        load_identity(path)


def test_random_bytes_after_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"abcd")
    assert "not a safetensors file (no JSON header)" in _load_error(path)


def test_header_length_that_looks_like_pickle_magic_still_loads(tmp_path: Path) -> None:
    # A safetensors file starts with its little-endian header length, which can read b"\x80\x03" and such.
    tensors, meta = _parts(tmp_path)
    for pad in range(0, 2048, 8):
        path = _write(tmp_path, tensors, {**meta, "note": "x" * pad})
        if path.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            break
    else:
        pytest.fail("no padding produced a pickle-like prefix")
    assert load_identity(path).trigger == "sks"


# --- token scale -----------------------------------------------------------------------------------------

CLIP_L_NORM = 0.014 * 768**0.5  # CLIP-L's word embeddings: components of std ~0.014


def test_recorded_embedding_norms_round_trip(tmp_path: Path) -> None:
    ident = make("sdxl", embedding_norms={"clip_l": CLIP_L_NORM, "clip_g": 0.5})
    path = save_identity(ident, tmp_path / "me.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["sefi.embedding_norms"]) == {"clip_l": CLIP_L_NORM, "clip_g": 0.5}
    assert dict(load_identity(path).embedding_norms) == {"clip_l": CLIP_L_NORM, "clip_g": 0.5}


def test_blown_up_tokens_cannot_become_an_identity() -> None:
    """A diverged run's finite but enormous tokens (~1e30) are refused when the identity is built to be saved."""
    tokens = torch.full((5, 2, 1, 768), 0.014)
    tokens[3, 1, 0, :] = 1e30
    with pytest.raises(ValueError, match=r"identity 'sks': its tokens have blown up: clip_l vectors are up to "
                                         r"2\.77e\+31 long.*lower learning_rate"):
        Identity("sd1", {"clip_l": tokens}, "sks", "person", embedding_norms={"clip_l": CLIP_L_NORM})
    tokens[3, 1, 0, :] = 0.014 * 100  # a token that grew to 100 times a word's length is still an identity
    Identity("sd1", {"clip_l": tokens}, "sks", "person", embedding_norms={"clip_l": CLIP_L_NORM})


def test_loading_refuses_tokens_beyond_the_recorded_scale(tmp_path: Path) -> None:
    tensors, meta = _parts(tmp_path)  # make() draws tokens of std 1: ~28 long
    meta["sefi.embedding_norms"] = json.dumps({"clip_l": 1.0})
    assert load_identity(_write(tmp_path, tensors, meta)).embedding_norms["clip_l"] == 1.0
    tensors["sefi.clip_l.k"][4, 1] = 3e29
    message = _load_error(_write(tmp_path, tensors, meta))
    assert "its tokens have blown up: clip_l vectors are up to 8.31e+30 long, 8.31e+30 times" in message
    assert "To fix: training diverged" in message and "lower learning_rate" in message


@pytest.mark.parametrize("value", ['{"clip_l": 0}', '{"clip_l": "big"}', '[0.4]', '{broken'])
def test_bad_embedding_norm_metadata(tmp_path: Path, value: str) -> None:
    tensors, meta = _parts(tmp_path)
    meta["sefi.embedding_norms"] = value
    assert "sefi.embedding_norms" in _load_error(_write(tmp_path, tensors, meta))
