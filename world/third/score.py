"""Scores from the third world's reader, counting only what each picture's view shows; a rejected picture scores 0.

- identity fidelity: of the wordless traits the person's framing and view show (render.visible_traits), the share
  recovered — skin tone by closeness (1 at the same tone, 0 at SKIN_SCALE apart or more), tints and the mark by
  equality; a one-cheek view scores whether that cheek carries the mark (the far cheek is hidden, so not counted).
- chance: the same score for a random person's traits against the truth (`chance_fidelity`): the level an identity
  must beat to have been learned at all. ≤ 25 % in every framing and view (tests check it; docs/world.md states it).
- prompt fidelity: of the things a request asks for (person or not, one or two people, scene, framing, view, each
  worded attribute), the share the picture shows as asked; what the view hides counts as not shown.
"""
from __future__ import annotations

from .captions import Request
from .read import PersonReading, Reading
from .render import FRAMING_LAYOUT, FRAMINGS, MARKS, TINTS, Identity, visible_traits

SKIN_SCALE = 0.15
SKIN_RIGHT = SKIN_SCALE / 2      # a skin tone within this counts as "drawn right" for the gates' trait rates
LOOK_ITEMS = ("hair", "eyes", "glasses", "hat", "smiling", "old")


def trait_score(trait: str, value, truth: Identity) -> float:
    if trait == "skin":
        return max(0.0, 1.0 - abs(value - truth.skin) / SKIN_SCALE)
    if trait.startswith("mark_"):
        return float(value == (truth.mark == trait[len("mark_"):]))
    return float(value == getattr(truth, trait))


def trait_right(trait: str, value, truth: Identity) -> bool:
    if trait == "skin":
        return abs(value - truth.skin) <= SKIN_RIGHT
    return trait_score(trait, value, truth) == 1.0


def person_fidelity(person: PersonReading, truth: Identity) -> float:
    scores = [trait_score(t, v, truth) for t, v in person.identity.items()]
    return sum(scores) / len(scores)


def identity_fidelity(reading: Reading, truth: Identity, which: int = 0) -> float | None:
    """0..1 for person `which` (0 = the left or only one); 0 when the picture is rejected; None when nobody is
    there to score."""
    if reading.rejected:
        return 0.0
    if len(reading.people) <= which:
        return None
    return person_fidelity(reading.people[which], truth)


def traits_right(reading: Reading, truth: Identity, which: int = 0) -> tuple[int, int]:
    """(traits drawn right, traits shown) for person `which`; a rejected picture or a missing person shows the
    traits its request asked for as all wrong, so `total` is 0 only when nothing could be counted."""
    if reading.rejected or len(reading.people) <= which:
        return 0, 0
    person = reading.people[which]
    return sum(trait_right(t, v, truth) for t, v in person.identity.items()), len(person.identity)


def _trait_chance(trait: str) -> float:
    if trait == "skin":
        # E[max(0, 1 − |a − b| / s)] for two tones uniform on [0, 1]: s − s²/3 (s ≤ 1).
        return SKIN_SCALE - SKIN_SCALE ** 2 / 3
    if trait in ("brow", "nose", "ear"):
        return 1.0 / len(TINTS)
    if trait == "mark":
        return 1.0 / len(MARKS)
    p = 1.0 / len(MARKS)            # one cheek: both carry the mark there, or neither does
    return p * p + (1 - p) * (1 - p)


def chance_fidelity(framing: str, view: str) -> float:
    """The identity fidelity of a random person's traits against the truth, in this framing and view."""
    traits = visible_traits(framing, view)
    return sum(_trait_chance(t) for t in traits) / len(traits)


def chance_table() -> dict[tuple[str, str], float]:
    return {(f, v): chance_fidelity(f, v) for f in FRAMINGS for v in FRAMING_LAYOUT[f].views}


def asked(request: Request) -> dict[str, object]:
    """Everything the request names, item → expected value."""
    items: dict[str, object] = {"person": request.person}
    if request.person:
        items["people"] = 2 if request.pair else 1
    if request.scene is not None:
        items["scene"] = request.scene
    if request.person:
        if request.framing is not None:
            items["framing"] = request.framing
        if request.view is not None and not request.pair:
            items["view"] = request.view
        if not request.pair:
            items.update({k: request.look[k] for k in LOOK_ITEMS if k in request.look})
    return items


def shown(reading: Reading, item: str, expected) -> bool:
    if reading.rejected:
        return False
    if item == "person":
        return reading.person == expected
    if item == "people":
        return len(reading.people) == expected
    if item == "scene":
        return reading.scene == expected
    if not reading.people:
        return False
    first = reading.people[0]
    if item == "framing":
        return first.framing == expected
    if item == "view":
        return first.view == expected
    return first.look.get(item) == expected


def prompt_fidelity(reading: Reading, request: Request) -> float:
    items = asked(request)
    return sum(shown(reading, k, v) for k, v in items.items()) / len(items)
