"""Encode a prompt with identities spliced in, through the host's own CLIP (tokenizer, weights, chunking).

SeFi needs, per prompt, one encoding per stage combination for keys (K tokens) and one for values (V tokens),
plus a base encoding (what the returned CONDITIONING carries: the identities' lossy single-vector fallback,
which is what a ControlNet and any other reader of the conditioning sees) and an "off" encoding (the trigger
replaced by the initializer word) used outside the node's start/end window.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..sefi_core.identity import FAMILY_ENCODERS, Identity
from ..sefi_core.token_scale import check_token_scale, embedding_norm
from ..sefi_core.tokens import ENCODER_TOKEN_KEYS, plan_placeholders, splice_vectors

TOKEN_KEY_FAMILY = {frozenset({"l"}): "sd1", frozenset({"g", "l"}): "sdxl"}


def clip_family(clip) -> str:
    """'sd1' or 'sdxl' from the encoders the CLIP tokenizes for; anything else is refused with a message."""
    keys = frozenset(clip.tokenize("a")) if clip is not None else frozenset()
    family = TOKEN_KEY_FAMILY.get(keys)
    if family is None:
        raise ValueError(f"SeFi identities work with SD1.x and SDXL text encoders; this CLIP encodes for "
                         f"{sorted(keys) or 'nothing'}. Load an SD1.5 or SDXL checkpoint's CLIP.")
    return family


def check_family(identity: Identity, family: str, slot: str = "identity") -> None:
    if identity.family != family:
        raise ValueError(f"{slot} '{identity.trigger}' was trained for {identity.family.upper()} but the CLIP is "
                         f"{family.upper()}; use the identity with a matching checkpoint, or train one for "
                         f"{family.upper()}.")


def embedding_norms(clip) -> dict[str, float]:
    """{encoder: mean length of its word embeddings} for the CLIP's text encoders: the yardstick of
    sefi_core.token_scale, taken from the model itself (tiny test models and real ones differ in scale)."""
    encoders = clip.cond_stage_model
    return {name: embedding_norm(getattr(encoders, name).transformer.text_model.embeddings.token_embedding.weight)
            for name in FAMILY_ENCODERS[clip_family(clip)]}


def check_identity_scale(identity: Identity, norms: dict[str, float], slot: str = "identity") -> None:
    """Refuse an identity whose tokens are far beyond this CLIP's embedding scale: the text encoder would overflow
    on them and the sampler would return black images without a word."""
    check_token_scale(identity.tokens, norms, f"{slot} '{identity.trigger}'")


@dataclass(frozen=True)
class PromptPlan:
    """A prompt tokenized once with one placeholder word per identity, ready to splice vectors into."""
    tokens: dict
    placeholder_ids: tuple[int, ...]          # per identity
    identities: tuple[Identity, ...]


def word_token_ids(clip, word: str, key: str) -> list[int]:
    """The token ids `word` becomes for encoder `key` (between the start and end tokens)."""
    end_token = clip.tokenize("")[key][0][1][0]
    ids = []
    for token, *_ in clip.tokenize(word)[key][0][1:]:
        if token == end_token:
            break
        ids.append(token)
    return ids


def _placeholder_id(clip, word: str, keys) -> int:
    ids = {key: word_token_ids(clip, word, key) for key in keys}
    first = next(iter(ids.values()))
    if len(first) != 1 or any(v != first for v in ids.values()):
        raise RuntimeError(f"placeholder word {word!r} is not one shared token for this tokenizer ({ids})")
    return first[0]


def _same_identity(a, b) -> bool:
    """One identity reached twice (the same object, or two loads of one file): same trigger and the same tokens."""
    if a is b:
        return True
    return (a.family == b.family and a.trigger == b.trigger and set(a.tokens) == set(b.tokens)
            and all(torch.equal(a.tokens[e], b.tokens[e]) for e in a.tokens))


def check_distinct_triggers(identities: Sequence[Identity], slots: Sequence[str]) -> None:
    """Every identity of a prompt needs its own trigger word; slots[i] names identity i's input in messages."""
    seen: dict[str, tuple[str, Identity]] = {}
    for slot, ident in zip(slots, identities):
        if ident.trigger not in seen:
            seen[ident.trigger] = (slot, ident)
            continue
        first_slot, first = seen[ident.trigger]
        if _same_identity(first, ident):
            raise ValueError(f"{first_slot} and {slot} are the same identity ('{ident.trigger}'): it is connected "
                             f"twice; connect it once, and another identity to {slot} if you meant one")
        raise ValueError(f"{first_slot} and {slot} are two identities with the same trigger word '{ident.trigger}', "
                         f"so a prompt cannot tell them apart. The trigger is stored inside the identity file "
                         f"(renaming the file does not change it): train one of them again with another trigger")


def plan_prompt(clip, text: str, identities: Sequence[Identity], strength: float,
                slots: Sequence[str] | None = None) -> PromptPlan:
    """Tokenize `text` with each identity's trigger rewritten to its placeholder, and scale the weights of
    the identity positions by `strength` (the host's own token-weight rule, as in '(word:1.2)'). `slots`: the
    inputs the identities came from, for messages."""
    check_distinct_triggers(identities, slots or [f"identity {i + 1}" for i in range(len(identities))])
    triggers = {ident.trigger: ident.vectors_per_token for ident in identities}
    rewritten, placeholders = plan_placeholders(text, triggers)
    tokens = clip.tokenize(rewritten)
    ids = tuple(_placeholder_id(clip, p.word, tokens) for p in placeholders)
    if strength != 1.0:
        wanted = set(ids)
        tokens = {key: [[(t, w * strength, *rest) if isinstance(t, int) and t in wanted else (t, w, *rest)
                         for t, w, *rest in chunk] for chunk in chunks] for key, chunks in tokens.items()}
    return PromptPlan(tokens, ids, tuple(identities))


def encode_with_vectors(clip, plan: PromptPlan, vectors: Sequence[dict[str, torch.Tensor]]):
    """Encode the plan with identity i's placeholder replaced by vectors[i][encoder] ([n, C] per encoder).

    Returns (cond [1, L, C], pooled)."""
    tokens = {}
    for encoder, key in ENCODER_TOKEN_KEYS.items():
        if key not in plan.tokens:
            continue
        mapping = {pid: vec[encoder] for pid, vec in zip(plan.placeholder_ids, vectors)}
        tokens[key] = splice_vectors(plan.tokens[key], mapping)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def initializer_text(text: str, identities: Sequence[Identity]) -> str:
    """`text` with every trigger replaced by its identity's initializer word (the prompt without identities).

    A trigger followed by its own initializer ("a photo of sks person") becomes the initializer once ("a photo of
    person"), not "person person"."""
    rewritten, placeholders = plan_placeholders(text, {ident.trigger: 1 for ident in identities})
    by_trigger = {ident.trigger: ident.initializer for ident in identities}
    for p in placeholders:  # placeholder words are unique rare words absent from the prompt, so replace is exact
        word = by_trigger[p.trigger]
        rewritten = re.sub(rf"\b{p.word}\s+(?={re.escape(word)}\b)", "", rewritten, flags=re.IGNORECASE)
        rewritten = rewritten.replace(p.word, word)
    return rewritten


def initializer_conditioning(clip, text: str, identities: Sequence[Identity]):
    """(cond, pooled) of `text` with every trigger replaced by its initializer word.

    Its pooled output is the one rule for SDXL's pooled vector (the U-Net's `y`) wherever an identity is in the
    prompt: SeFi Apply Identity returns it with its conditioning and the trainer builds `y` from it for its
    training prompt, so the model sees at inference the `y` it was trained with. The identity itself reaches the
    U-Net through cross-attention only (docs/method.md)."""
    return clip.encode_from_tokens(clip.tokenize(initializer_text(text, identities)), return_pooled=True)
