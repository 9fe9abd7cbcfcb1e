"""Captions from the world's closed vocabulary, and the requests that prompts make of a picture.

Captions read like real ones ("a photo of a person with red hair on a beach", "a close-up photo of the face of a
person"), name a random part of what the picture shows — never a worded look its framing hides — (unnamed things
are random draws, so the model learns each word's effect on its own), and include the reference prompt's words ("a photo of the face of person"). About one
picture in seven shows no person at all, so the word "person" carries information: it marks where the person is.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .render import (FRAMINGS, Facts, HORIZONS, SCENES, VISIBLE_LOOK, WORDED_HAIR, EYES, Person, held_out_identities,
                     place, pretraining_identity, random_look)

SCENE_NOUN = {"studio": "an empty studio", "beach": "a beach", "forest": "a forest", "snow": "a snowy field",
              "city": "a city street", "night": "the night sky", "library": "a library"}
SCENE_PLACE = {"studio": "in a studio", "beach": "on a beach", "forest": "in a forest", "snow": "in the snow",
               "city": "on a city street", "night": "at night", "library": "in a library"}
FRAMING_OPENERS = {
    "close-up": ("a close-up photo of the face of", "a photo of the face of", "the face of"),
    "head-and-shoulders": ("a portrait photo of", "a head and shoulders photo of"),
    "wide": ("a full-length photo of", "a wide photo of"),
    None: ("a photo of", "a picture of"),
}
NO_PERSON_RATE = 0.15


@dataclass(frozen=True)
class Request:
    """What a prompt asks for; None / absent = left to the model. `person` False = a scene without anyone."""
    scene: str | None = None
    framing: str | None = None
    person: bool = True
    look: dict = field(default_factory=dict)   # any of hair, eyes, glasses, hat, smiling, old


def _attribute_phrases(look: dict) -> list[str]:
    phrases = []
    if "hair" in look and look["hair"] != "grey":
        phrases.append(f"with {look['hair']} hair")
    if "eyes" in look:
        phrases.append(f"with {look['eyes']} eyes")
    if look.get("glasses"):
        phrases.append("wearing glasses")
    if look.get("hat"):
        phrases.append("wearing a hat")
    if look.get("smiling"):
        phrases.append("smiling")
    return phrases


def prompt(request: Request, subject: str = "person", rng: np.random.Generator | None = None) -> str:
    """The caption for a request. `subject` is the words that name the person ("person", or "sks person" for a
    trained identity). With `rng`, the opener and article vary as in pretraining; without, the first form is used."""
    pick = (lambda options: options[int(rng.integers(len(options)))]) if rng is not None else (lambda o: o[0])
    if not request.person:
        return f"a photo of {SCENE_NOUN[request.scene or 'studio']}"
    opener = pick(FRAMING_OPENERS[request.framing])
    old = "old " if request.look.get("old") else ""
    article = pick(("a ", "a ", "")) if subject == "person" else "a "
    if old and article == "a ":
        article = "an "
    words = [f"{opener} {article}{old}{subject}"]
    phrases = _attribute_phrases(request.look)
    if rng is not None:
        phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    text = words[0]
    if phrases:
        text += " " + (", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0])
    if request.scene is not None:
        text += ("," if phrases else "") + " " + SCENE_PLACE[request.scene]
    return text


def mentioned(facts: Facts, rng: np.random.Generator) -> Request:
    """A random part of a picture's facts, as a caption would name it."""
    if facts.person is None:
        return Request(scene=facts.scene, person=False)
    p = facts.person
    look: dict = {}
    for name in ("hair", "eyes", "glasses", "hat", "smiling"):
        value = getattr(p.look, name)
        # Only what the framing shows is named: a word whose effect is invisible in a third of its captions (eyes
        # or a smile in a wide shot) is a weaker signal than this U-Net's two-hour budget can pick up.
        if name not in VISIBLE_LOOK[p.framing]:
            continue
        if rng.random() < 0.5 and not (name == "hair" and value == "grey") and value is not False:
            look[name] = value
    if p.look.old and rng.random() < 0.6:
        look["old"] = True
    return Request(scene=facts.scene if rng.random() < 0.85 else None,
                   framing=p.framing if rng.random() < 0.85 else None, look=look)


def random_facts(rng: np.random.Generator, held_out=None) -> Facts:
    """One pretraining picture: a random scene, and (mostly) a random person who is never a held-out one."""
    held_out = held_out_identities() if held_out is None else held_out
    scene = str(rng.choice(list(SCENES)))
    horizon = int(rng.choice(HORIZONS))
    if rng.random() < NO_PERSON_RATE:
        return Facts(scene=scene, horizon=horizon, person=None)
    framing = str(rng.choice(FRAMINGS))
    person = place(rng, pretraining_identity(rng, held_out), random_look(rng), framing)
    return Facts(scene=scene, horizon=horizon, person=person)


def training_pair(rng: np.random.Generator, held_out=None) -> tuple[Facts, str]:
    facts = random_facts(rng, held_out)
    return facts, prompt(mentioned(facts, rng), rng=rng)


def fit_look(requested: dict, drawn, rng: np.random.Generator):
    """A drawn random Look with the requested worded attributes set (old ⇒ grey hair; a named hair colour is not
    grey, and a drawn grey without "old" is redrawn) — both worlds' rule."""
    fixed = dict(requested)
    if "hair" in fixed:
        fixed.setdefault("old", False)      # a named hair colour is not grey
    look = replace(drawn, **fixed)
    if look.old:
        return replace(look, hair="grey")
    if look.hair == "grey":
        return replace(look, hair=str(rng.choice(WORDED_HAIR)))
    return look


def request_facts(request: Request, identity, rng: np.random.Generator) -> Facts:
    """Facts that satisfy a request for a given identity (for training photos and reference pictures)."""
    look = fit_look(request.look, random_look(rng), rng)
    scene = request.scene or str(rng.choice(list(SCENES)))
    if not request.person:
        return Facts(scene=scene, horizon=int(rng.choice(HORIZONS)), person=None)
    framing = request.framing or str(rng.choice(FRAMINGS))
    return Facts(scene=scene, horizon=int(rng.choice(HORIZONS)), person=place(rng, identity, look, framing))


__all__ = ["Request", "prompt", "mentioned", "random_facts", "training_pair", "request_facts", "SCENE_PLACE",
           "EYES", "Person"]
