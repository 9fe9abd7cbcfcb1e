"""Scores from the reader: how much of a person's identity a picture keeps, how much of a prompt it obeys.

- identity fidelity: of the wordless traits the picture shows (world/render.VISIBLE_TRAITS), the share recovered —
  skin tone by closeness (1 at the same tone, 0 at SKIN_SCALE apart or more), the discrete traits by equality.
- prompt fidelity: of the things a request asks for (person or not, scene, framing, each worded attribute), the share
  the picture shows as asked. An attribute the picture's framing hides counts as not shown.
"""
from __future__ import annotations

from .captions import Request
from .read import Reading
from .render import Identity

SKIN_SCALE = 0.3
LOOK_ITEMS = ("hair", "eyes", "glasses", "hat", "smiling", "old")


def identity_fidelity(reading: Reading, truth: Identity) -> float | None:
    """0..1, or None when the picture shows no person."""
    if not reading.person:
        return None
    scores = []
    for trait, value in reading.identity.items():
        if trait == "skin":
            scores.append(max(0.0, 1.0 - abs(value - truth.skin) / SKIN_SCALE))
        else:
            scores.append(float(value == getattr(truth, trait)))
    return sum(scores) / len(scores) if scores else 0.0


def asked(request: Request) -> dict[str, object]:
    """Everything the request names, item → expected value."""
    items: dict[str, object] = {"person": request.person}
    if request.scene is not None:
        items["scene"] = request.scene
    if request.person:
        if request.framing is not None:
            items["framing"] = request.framing
        items.update({k: request.look[k] for k in LOOK_ITEMS if k in request.look})
    return items


def shown(reading: Reading, item: str, expected) -> bool:
    if item == "person":
        return reading.person == expected
    if item == "scene":
        return reading.scene == expected
    if item == "framing":
        return reading.framing == expected
    return reading.look.get(item) == expected


def prompt_fidelity(reading: Reading, request: Request) -> float:
    items = asked(request)
    return sum(shown(reading, k, v) for k, v in items.items()) / len(items)
