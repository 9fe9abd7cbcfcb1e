"""Trigger -> placeholder planning and vector splicing on hand-made ComfyUI-style token chunks."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from sefi_core.tokens import (
    MAX_VECTORS_PER_TOKEN,
    PLACEHOLDER_WORDS,
    Placeholder,
    Slot,
    check_trigger,
    check_trigger_apart_from_templates,
    find_positions,
    plan_placeholders,
    splice_vectors,
)

P0, P1 = PLACEHOLDER_WORDS[0], PLACEHOLDER_WORDS[1]
BOS, EOS, PH, PH2 = 49406, 49407, 900, 901


# --- plan_placeholders -------------------------------------------------------------------------------


def test_single_vector_trigger() -> None:
    text, plan = plan_placeholders("a photo of sks, smiling", {"sks": 1})
    assert text == f"a photo of {P0}, smiling"
    assert plan == (Placeholder("sks", P0, 1, 1),)


def test_trigger_expands_to_n_copies_inside_weight_syntax() -> None:
    text, plan = plan_placeholders("portrait of (sks:1.2) in a (garden)", {"sks": 3})
    assert text == f"portrait of ({P0} {P0} {P0}:1.2) in a (garden)"
    assert plan[0].vectors == 3 and plan[0].occurrences == 1


def test_every_occurrence_is_replaced_and_counted() -> None:
    text, plan = plan_placeholders("sks and sks sks's dog", {"sks": 2})
    assert text == f"{P0} {P0} and {P0} {P0} {P0} {P0}'s dog"
    assert plan[0].occurrences == 3


@pytest.mark.parametrize("prompt", ["a photo of sks2", "asks", "sks-style art", "SKS man", "embedding:sks"])
def test_only_whole_case_sensitive_words_match(prompt: str) -> None:
    with pytest.raises(ValueError, match="must contain the trigger word 'sks'"):
        plan_placeholders(prompt, {"sks": 1})


def test_embedding_syntax_is_left_alone_but_plain_trigger_replaced() -> None:
    text, _ = plan_placeholders("embedding:sks next to sks", {"sks": 1})
    assert text == f"embedding:sks next to {P0}"


def test_escaped_parentheses_and_newlines_are_word_boundaries() -> None:
    text, _ = plan_placeholders("\\(sks\\)\nsks", {"sks": 1})
    assert text == f"\\({P0}\\)\n{P0}"


def test_two_identities_get_distinct_placeholders() -> None:
    text, plan = plan_placeholders("anna with annabel and (anna:0.9)", {"anna": 1, "annabel": 2})
    assert text == f"{P0} with {P1} {P1} and ({P0}:0.9)"
    assert [(p.trigger, p.word, p.vectors, p.occurrences) for p in plan] == [
        ("anna", P0, 1, 2),
        ("annabel", P1, 2, 1),
    ]


def test_placeholders_already_in_the_text_are_skipped_ignoring_case() -> None:
    text, plan = plan_placeholders(f"sks near a {P0.upper()} sign", {"sks": 1})
    assert plan[0].word == P1
    assert text == f"{P1} near a {P0.upper()} sign"


def test_missing_trigger_message_names_it_and_shows_the_prompt() -> None:
    with pytest.raises(ValueError) as info:
        plan_placeholders("a photo of sks", {"sks": 1, "ohwx": 1})
    message = str(info.value)
    assert "must contain the trigger word 'ohwx'" in message
    assert "a photo of ohwx" in message and "'a photo of sks'" in message


def test_no_triggers_leaves_text_unchanged() -> None:
    assert plan_placeholders("anything (at:1.1) all", {}) == ("anything (at:1.1) all", ())


def test_running_out_of_placeholders_is_reported() -> None:
    triggers = {f"id{i}": 1 for i in range(len(PLACEHOLDER_WORDS) + 1)}
    with pytest.raises(ValueError, match="too many identities"):
        plan_placeholders(" ".join(triggers), triggers)


@pytest.mark.parametrize("bad_n", [0, MAX_VECTORS_PER_TOKEN + 1, 1.0, True])
def test_bad_vector_counts_are_refused(bad_n: object) -> None:
    with pytest.raises(ValueError, match="vectors per token"):
        plan_placeholders("sks", {"sks": bad_n})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("trigger", "fragment"),
    [("", "non-empty"), ("two words", "single word"), ("a\tb", "single word"), ("sks:1", "prompt-syntax"),
     ("(sks)", "prompt-syntax"), ("s,k", "prompt-syntax"), (None, "non-empty")],
)
def test_bad_triggers_are_refused(trigger: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        check_trigger(trigger)


@pytest.mark.parametrize(("trigger", "template"), [("a", "a photo of the face of {}"), ("face", "the face of {}"),
                                                  ("of", "a photo of {}, close-up"), ("photo", "{} photo")])
def test_a_trigger_that_is_a_word_of_a_template_is_refused(trigger: str, template: str) -> None:
    with pytest.raises(ValueError, match=f"the trigger '{trigger}' is also a word of the training prompt"):
        check_trigger_apart_from_templates(trigger, ["a good photo of {}", template])


@pytest.mark.parametrize("trigger", ["sks", "A", "phot", "faces", "of-x"])  # case-sensitive whole words only
def test_a_trigger_apart_from_the_templates_passes(trigger: str) -> None:
    check_trigger_apart_from_templates(trigger, ["a photo of the face of {}", "a close-up of {}"])


@pytest.mark.parametrize("trigger", ["sks", "<sks>", "my_face", "cat-toy", "Élodie"])
def test_good_triggers_round_trip(trigger: str) -> None:
    assert check_trigger(trigger) == trigger
    text, _ = plan_placeholders(f"a photo of {trigger}.", {trigger: 1})
    assert text == f"a photo of {P0}."


def test_placeholder_words_are_distinct_lowercase_words() -> None:
    assert len(set(PLACEHOLDER_WORDS)) == len(PLACEHOLDER_WORDS)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in PLACEHOLDER_WORDS)
    assert not {"sks", "ohwx"} & set(PLACEHOLDER_WORDS)


def _clip_vocab() -> dict[str, int] | None:
    """CLIP's vocab as shipped with ComfyUI (the COMFYUI_PATH checkout, else the installed package), located
    without importing the package."""
    if os.environ.get("COMFYUI_PATH"):
        package = Path(os.environ["COMFYUI_PATH"]) / "comfy"
    else:
        spec = importlib.util.find_spec("comfy")
        if spec is None or not spec.submodule_search_locations:
            return None
        package = Path(next(iter(spec.submodule_search_locations)))
    vocab = package / "sd1_tokenizer" / "vocab.json"
    return json.loads(vocab.read_text(encoding="utf-8")) if vocab.is_file() else None


def test_placeholder_words_are_single_clip_tokens() -> None:
    vocab = _clip_vocab()
    if vocab is None:
        pytest.skip("no CLIP vocab available")
    # ComfyUI's tokenizer maps a word to one token exactly when "<word></w>" is a vocab entry.
    assert [w for w in PLACEHOLDER_WORDS if f"{w}</w>" not in vocab] == []


# --- splice_vectors / find_positions -----------------------------------------------------------------


def _chunk(ids: list[int], weights: dict[int, float] | None = None, word_ids: bool = False, length: int = 8):
    """A padded chunk [BOS, ids..., EOS, pad...] of `length` elements."""
    weights = weights or {}
    body = [BOS, *ids, EOS] + [EOS] * (length - len(ids) - 2)
    if word_ids:
        return [(t, weights.get(i, 1.0), i if t not in (BOS, EOS) else 0) for i, t in enumerate(body)]
    return [(t, weights.get(i, 1.0)) for i, t in enumerate(body)]


def test_splice_replaces_each_occurrence_with_all_vectors_in_order() -> None:
    chunks = [_chunk([10, PH, PH, 11, PH, PH], weights={2: 1.2})]
    vectors = torch.arange(6.0).reshape(2, 3)
    out = splice_vectors(chunks, {PH: vectors})
    assert len(out[0]) == len(chunks[0]) == 8
    spliced = [(i, e) for i, e in enumerate(out[0]) if isinstance(e[0], torch.Tensor)]
    assert [i for i, _ in spliced] == [2, 3, 5, 6]
    assert [e[0].tolist() for _, e in spliced] == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]
    assert [e[1] for _, e in spliced] == [1.2, 1.0, 1.0, 1.0]
    assert all(e[0].ndim == 1 for _, e in spliced)
    assert [e for e in out[0] if not isinstance(e[0], torch.Tensor)] == [chunks[0][i] for i in (0, 1, 4, 7)]


def test_splice_keeps_word_ids_and_does_not_mutate_input() -> None:
    chunks = [_chunk([10, PH, 11], word_ids=True)]
    before = copy.deepcopy(chunks)
    out = splice_vectors(chunks, {PH: torch.ones(1, 4)})
    assert chunks == before
    assert out[0][2][1:] == chunks[0][2][1:] and len(out[0][2]) == 3
    assert out is not chunks and out[0] is not chunks[0]


def test_run_split_across_chunks_still_gets_vectors_in_order() -> None:
    # The host may break the n copies of one trigger over a chunk boundary.
    chunks = [_chunk([10, 11, 12, 13, PH]), _chunk([PH, PH, 14])]
    slots = find_positions(chunks, {PH: 3})
    assert slots == {PH: [Slot(0, 5, 0), Slot(1, 1, 1), Slot(1, 2, 2)]}
    out = splice_vectors(chunks, {PH: torch.eye(3)})
    assert out[0][5][0].tolist() == [1, 0, 0]
    assert out[1][1][0].tolist() == [0, 1, 0]
    assert out[1][2][0].tolist() == [0, 0, 1]


def test_two_placeholders_each_get_their_own_vectors() -> None:
    chunks = [_chunk([PH, 10, PH2, PH2], weights={3: 0.8, 4: 0.8})]
    out = splice_vectors(chunks, {PH: torch.zeros(1, 4), PH2: torch.stack([torch.ones(4), 2 * torch.ones(4)])})
    assert out[0][1][0].tolist() == [0.0] * 4
    assert [out[0][i][0].tolist() for i in (3, 4)] == [[1.0] * 4, [2.0] * 4]
    assert [out[0][i][1] for i in (3, 4)] == [0.8, 0.8]


def test_existing_tensor_elements_are_kept() -> None:
    existing = torch.full((4,), 7.0)
    chunks = [[(BOS, 1.0), (existing, 1.0), (PH, 1.0), (EOS, 1.0)]]
    out = splice_vectors(chunks, {PH: torch.ones(1, 4)})
    assert out[0][1][0] is existing
    assert out[0][2][0].tolist() == [1.0] * 4


def test_gradients_flow_to_the_identity_vectors() -> None:
    vectors = torch.zeros(2, 3, requires_grad=True)
    out = splice_vectors([_chunk([PH, PH])], {PH: vectors})
    (out[0][1][0].sum() * 2 + out[0][2][0].sum()).backward()
    assert vectors.grad.tolist() == [[2.0] * 3, [1.0] * 3]


def test_positions_for_several_ids() -> None:
    chunks = [_chunk([PH, PH2, PH])]
    assert find_positions(chunks, {PH: 1, PH2: 1}) == {PH: [Slot(0, 1, 0), Slot(0, 3, 0)], PH2: [Slot(0, 2, 0)]}


def test_incomplete_run_is_an_error() -> None:
    with pytest.raises(ValueError, match="occurs 3 time"):
        find_positions([_chunk([PH, PH, PH])], {PH: 2})


def test_absent_placeholder_is_an_error() -> None:
    with pytest.raises(ValueError, match="occurs 0 time"):
        splice_vectors([_chunk([10])], {PH: torch.ones(1, 4)})


@pytest.mark.parametrize("vectors", [torch.ones(4), torch.ones(0, 4), torch.ones(1, 1, 4), [[1.0]]])
def test_vectors_must_be_n_by_c(vectors: object) -> None:
    with pytest.raises(ValueError, match=r"must be a tensor \[n, C\]"):
        splice_vectors([_chunk([PH])], {PH: vectors})  # type: ignore[dict-item]


def test_plan_then_splice_end_to_end_with_a_toy_tokenizer() -> None:
    text, plan = plan_placeholders("a (sks:1.1) and ohwx", {"sks": 2, "ohwx": 1})
    ids = {plan[0].word: PH, plan[1].word: PH2}
    # Toy tokenizer: weights are parsed off, every word is one token.
    words = text.replace("(", " ").replace(")", " ").split()
    elements = []
    for w in words:
        word, _, weight = w.partition(":")
        elements.append((ids.get(word, 5), float(weight) if weight else 1.0))
    chunks = [[(BOS, 1.0), *elements, (EOS, 1.0)]]
    out = splice_vectors(chunks, {PH: torch.eye(2), PH2: torch.full((1, 2), 3.0)})
    got = [(e[0].tolist(), e[1]) for e in out[0] if isinstance(e[0], torch.Tensor)]
    assert got == [([1.0, 0.0], 1.0), ([0.0, 1.0], 1.1), ([3.0, 3.0], 1.0)]
