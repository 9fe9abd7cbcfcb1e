"""Pure token functions that splice identity vectors into a prompt (comfyui-host.md A8).

Two steps, so that the host's own tokenizer handles all prompt syntax (weights, escapes, chunking):

1. `plan_placeholders` rewrites the text: every whole-word trigger becomes n copies of a placeholder word
   (a rare word that CLIP tokenizes as exactly one token, distinct per identity). The glue then tokenizes the
   rewritten text and looks up each placeholder's token id.
2. `splice_vectors` swaps those token ids for the identity's vectors in the host's token chunks.

Host token format: a list of chunks (77 elements each); an element is `(token, weight)` or
`(token, weight, word_id)`, and `token` is an int id or, for embeddings, a 1-D tensor [C].
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = [
    "ENCODER_TOKEN_KEYS",
    "MAX_VECTORS_PER_TOKEN",
    "PLACEHOLDER_WORDS",
    "Placeholder",
    "Slot",
    "TokenChunks",
    "check_trigger",
    "check_trigger_apart_from_templates",
    "find_positions",
    "plan_placeholders",
    "splice_vectors",
]

TokenChunks = Sequence[Sequence[tuple[Any, ...]]]
"""One encoder's tokens as the host returns them: chunks of (token, weight[, word_id]) tuples."""

ENCODER_TOKEN_KEYS = {"clip_l": "l", "clip_g": "g"}
"""Identity encoder name -> key of that encoder's chunks in the host's tokenize() dict."""

MAX_VECTORS_PER_TOKEN = 75
"""A CLIP chunk holds 77 tokens, two of them start/end; more vectors than that cannot stay together."""

PLACEHOLDER_WORDS = (
    "tzky", "ncbd", "wawx", "nmwx", "nlwx", "ssnhq", "rctid", "kprc",
    "nyrd", "bsgo", "httr", "wftv", "eccc", "ttino", "sleg", "kkkk",
)  # fmt: skip
"""Rare words that are one token each in the CLIP vocabulary (shared by clip_l and clip_g), ordered by
preference. Their embeddings never reach the model (the vectors replace them), so only uniqueness matters.
Common DreamBooth triggers ('sks', 'ohwx') are deliberately absent."""

_SYNTAX_CHARS = "()[]{}:,\\"
_EMBEDDING_PREFIX = "embedding:"


@dataclass(frozen=True)
class Placeholder:
    """How one identity's trigger was rewritten: each of its `occurrences` became `vectors` copies of `word`."""

    trigger: str
    word: str
    vectors: int
    occurrences: int


class Slot(NamedTuple):
    """A token position holding identity vector number `vector` (0..n-1): `chunks[chunk][index]`."""

    chunk: int
    index: int
    vector: int


def check_trigger(trigger: object) -> str:
    """Return `trigger` if it can be found as one word in a ComfyUI prompt, else raise ValueError saying why.

    Whitespace would make it several words; ComfyUI's prompt-syntax characters ()[]{}:,\\ would be parsed as
    weights, escapes or the `embedding:` prefix instead of being part of the word.
    """
    if not isinstance(trigger, str) or not trigger:
        raise ValueError(f"the trigger must be a non-empty word, got {trigger!r}")
    if any(c.isspace() for c in trigger):
        raise ValueError(f"the trigger {trigger!r} must be a single word without spaces, e.g. 'sks'")
    bad = sorted({c for c in trigger if c in _SYNTAX_CHARS})
    if bad:
        raise ValueError(
            f"the trigger {trigger!r} contains prompt-syntax character(s) {' '.join(bad)}; "
            "pick a trigger without them, e.g. 'sks'"
        )
    return trigger


def check_trigger_apart_from_templates(trigger: str, templates: Sequence[str]) -> None:
    """Refuse a trigger that is also a word of a training prompt template outside its '{}': every occurrence
    would become the identity (trigger 'a' in 'a photo of the face of {}'), and the training prompt would no
    longer line up with its reference prompt."""
    pattern = _trigger_pattern([check_trigger(trigger)])
    for template in templates:
        if pattern.search(template.replace("{}", " ")):
            raise ValueError(f"the trigger {trigger!r} is also a word of the training prompt {template!r}, where "
                             f"every {trigger!r} would become the identity; pick a trigger that is in none of the "
                             f"prompt templates (a rare made-up word such as 'sks')")


def quote_excerpt(text: str, at: int, width: int = 80) -> str:
    """At most `width` characters of `text` around position `at`, quoted, with '…' where it was cut: long prompts
    must not flood an error message."""
    start = max(0, min(at - width // 2, len(text) - width))
    part = text[start:start + width]
    return f"{'…' if start > 0 else ''}{part!r}{'…' if start + width < len(text) else ''}"


def _trigger_pattern(triggers: Sequence[str]) -> re.Pattern[str]:
    """Whole-word, case-sensitive match of any trigger (longest first), not part of `embedding:name`.

    Letters, digits, '_' and '-' continue a word, so 'sks' does not match inside 'sks2' or 'sks-style'.
    """
    alternatives = "|".join(re.escape(t) for t in sorted(triggers, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?<!{re.escape(_EMBEDDING_PREFIX)})(?:{alternatives})(?![\w-])")


def plan_placeholders(text: str, triggers: Mapping[str, int]) -> tuple[str, tuple[Placeholder, ...]]:
    """Replace each trigger word (trigger -> vectors per token n) by n copies of its own placeholder word.

    Surrounding prompt syntax is kept, so '(sks:1.2)' becomes '(tzky tzky:1.2)' for n = 2. Placeholders
    are taken in order from PLACEHOLDER_WORDS, skipping any that already appear in the text (CLIP lowercases,
    so the check ignores case). Raises ValueError if a trigger is missing or the words run out.
    """
    for trigger, n in triggers.items():
        check_trigger(trigger)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_VECTORS_PER_TOKEN:
            raise ValueError(f"vectors per token for {trigger!r} must be 1..{MAX_VECTORS_PER_TOKEN}, got {n!r}")
    if not triggers:
        return text, ()
    pattern = _trigger_pattern(list(triggers))
    counts = dict.fromkeys(triggers, 0)
    for match in pattern.finditer(text):
        counts[match.group()] += 1
    missing = [t for t, c in counts.items() if c == 0]
    if missing:
        names = ", ".join(repr(t) for t in missing)
        near = text.lower().find(missing[0].lower())  # e.g. 'SKS' or 'sks2': quote around it
        raise ValueError(
            f"the prompt must contain the trigger word {names} as a separate word (case-sensitive), "
            f"e.g. 'a photo of {missing[0]}'; the prompt {'has, near it' if near >= 0 else 'begins'}: "
            f"{quote_excerpt(text, max(near, 0))}"
        )
    lowered = text.lower()
    free = iter(w for w in PLACEHOLDER_WORDS if w not in lowered)
    words: dict[str, str] = {}
    for trigger in triggers:
        word = next(free, None)
        if word is None:
            raise ValueError(
                f"too many identities in one prompt: at most {len(PLACEHOLDER_WORDS)} can be placed "
                "(fewer if the prompt already uses some placeholder words); use fewer identities"
            )
        words[trigger] = word
    rewritten = pattern.sub(lambda m: " ".join([words[m.group()]] * triggers[m.group()]), text)
    plan = tuple(Placeholder(t, words[t], triggers[t], counts[t]) for t in triggers)
    return rewritten, plan


def find_positions(token_chunks: TokenChunks, vectors_per_id: Mapping[int, int]) -> dict[int, list[Slot]]:
    """Where each placeholder token id sits and which identity vector it receives.

    Occurrences are counted across chunks in order and occurrence j gets vector j mod n: each trigger became
    n consecutive placeholders, and counting (rather than looking for runs) stays right when the host breaks
    a run across two chunks or the trigger is written twice in a row. Raises ValueError if an id is absent
    or its count is not a multiple of n (the tokens do not come from the planned text).
    """
    slots: dict[int, list[Slot]] = {token_id: [] for token_id in vectors_per_id}
    for c, chunk in enumerate(token_chunks):
        for i, element in enumerate(chunk):
            token = element[0]
            if isinstance(token, int) and token in slots:
                found = slots[token]
                found.append(Slot(c, i, len(found) % vectors_per_id[token]))
    for token_id, found in slots.items():
        n = vectors_per_id[token_id]
        if not found or len(found) % n:
            raise ValueError(
                f"placeholder token id {token_id} occurs {len(found)} time(s) in the tokens, but every trigger "
                f"occurrence must give exactly {n}; tokenize the text returned by plan_placeholders unchanged"
            )
    return slots


def splice_vectors(
    token_chunks: TokenChunks, placeholder_id_to_vectors: Mapping[int, torch.Tensor]
) -> list[list[tuple[Any, ...]]]:
    """New chunks in which every placeholder id is replaced by its identity vector (a 1-D tensor [C]).

    Weights and word ids stay as they were, chunk lengths do not change, and the input is not modified.
    The vectors are views of the given [n, C] tensors, so gradients flow back to them when training.
    """
    for token_id, vectors in placeholder_id_to_vectors.items():
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] < 1:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise ValueError(f"vectors for placeholder id {token_id} must be a tensor [n, C] with n >= 1, got {shape}")
    slots = find_positions(token_chunks, {t: v.shape[0] for t, v in placeholder_id_to_vectors.items()})
    out = [list(chunk) for chunk in token_chunks]
    for token_id, found in slots.items():
        vectors = placeholder_id_to_vectors[token_id]
        for chunk, index, vector in found:
            element = out[chunk][index]
            out[chunk][index] = (vectors[vector], *element[1:])
    return out
