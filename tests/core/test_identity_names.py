"""One canonical name per identity (sefi_core.identity_names): names that differ only by the '.safetensors'
suffix, case or Unicode form are one identity, and a folder holding one spelling refuses the other (issue 32)."""
from __future__ import annotations

import unicodedata

import pytest

from sefi_core.identity_names import (NameCollision, canonical_name, colliding_groups, file_stem, identity_file,
                                      lookalike_files)

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


@pytest.mark.parametrize("a, b", [("alice", "alice.safetensors"), ("alice", "ALICE"), (NFC, NFD),
                                  ("alice", "\uff41lice"), ("Straße", "STRASSE")])
def test_spellings_of_one_identity_share_a_canonical_name(a, b):
    assert a != b and canonical_name(a) == canonical_name(b)


@pytest.mark.parametrize("a, b", [("alice", "alice2"), ("alice", "alice.SAFETENSORS"), ("anne", "anné"),
                                  ("alice", "alice@100")])
def test_different_names_stay_different(a, b):
    assert canonical_name(a) != canonical_name(b)


def test_file_stem_drops_only_the_suffix_the_trainer_drops():
    assert file_stem("alice.safetensors") == "alice" and file_stem("alice.SAFETENSORS") == "alice.SAFETENSORS"
    assert file_stem("a.safetensors.safetensors") == "a.safetensors"


def test_colliding_groups_keep_the_order_given():
    assert colliding_groups(["bob", "Alice", "carol", "alice.safetensors", NFC, NFD]) == [
        ["Alice", "alice.safetensors"], [NFC, NFD]]
    assert colliding_groups(["a", "b"]) == []


def test_a_folder_with_one_spelling_refuses_another(tmp_path):
    (tmp_path / "alice.safetensors").write_bytes(b"x")
    (tmp_path / "alice@100.safetensors").write_bytes(b"x")  # a step snapshot is another name
    (tmp_path / "bob.txt").write_bytes(b"x")
    assert identity_file(tmp_path, "alice") == identity_file(tmp_path, "alice.safetensors") == (
        tmp_path / "alice.safetensors")  # the same spelling: overwriting it is the caller's decision
    assert identity_file(tmp_path, "bob") == tmp_path / "bob.safetensors"
    for other in ("Alice", "ALICE.safetensors", "\uff41lice"):
        with pytest.raises(NameCollision, match=r"'alice.safetensors' in .*spelled differently.*exactly that"):
            identity_file(tmp_path, other)
    assert lookalike_files(tmp_path / "missing", "alice") == []


def test_nfc_and_nfd_files_are_one_identity(tmp_path):
    (tmp_path / f"{NFD}.safetensors").write_bytes(b"x")
    if [p.name for p in tmp_path.iterdir()] != [f"{NFD}.safetensors"]:
        pytest.skip("this file system normalises names itself")
    with pytest.raises(NameCollision):
        identity_file(tmp_path, NFC)
    assert identity_file(tmp_path, NFD) == tmp_path / f"{NFD}.safetensors"
