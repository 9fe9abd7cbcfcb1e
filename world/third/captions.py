"""The third world's captions and requests: the second world's vocabulary (scenes, framings, worded looks) plus names,
view words and two people.

A caption names a random part of what its picture shows, never what the framing and view hide. A roster person is
named in NAMED_RATE of their captions ("a photo of emma on a beach"), otherwise called "a person"; unnamed people
(drawn fresh, outside the held-out margin) are always "a person". The view is named by view words ("in profile
facing left", "in three-quarter view facing right", "from the front"). Two people stand side by side, the first
named on the left ("a portrait photo of emma and a person in a library", "two people" when neither is named); their
looks and views are not named. `pretraining_pair` is the one stream pretraining draws from (world/train.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..captions import FRAMING_OPENERS, SCENE_NOUN, SCENE_PLACE, _attribute_phrases, fit_look
from ..render import EYES, SCENES, Look
from .render import FRAMINGS, FRAMING_LAYOUT, Facts, Identity, place, place_pair, random_look, random_view, \
    visible_look
from .roster import ROSTER, unnamed_identity

NO_PERSON_RATE = 0.12
PAIR_RATE = 0.2            # of the pictures with people
ROSTER_RATE = 0.85         # a pretraining person is a roster person this often, else an unnamed one
NAMED_RATE = 0.8           # a roster person's caption names them this often
VIEW_PHRASE = {"front": "from the front",
               "three-quarter-left": "in three-quarter view facing left",
               "three-quarter-right": "in three-quarter view facing right",
               "profile-left": "in profile facing left",
               "profile-right": "in profile facing right"}


@dataclass(frozen=True)
class Request:
    """What a prompt asks for; None / absent = left to the model. `person` False: a scene without anyone. `name`:
    the person asked for by name (None: "a person"). `pair`: two people, `name` on the left and `partner` (a name
    or None) on the right."""
    scene: str | None = None
    framing: str | None = None
    person: bool = True
    look: dict = field(default_factory=dict)   # any of hair, eyes, glasses, hat, smiling, old
    view: str | None = None
    name: str | None = None
    pair: bool = False
    partner: str | None = None


def _subject(name: str | None, old: bool, pick) -> str:
    if name is not None:
        return f"{'old ' if old else ''}{name}"
    article = pick(("a ", "a ", ""))
    if old:
        return ("an " if article else "") + "old person"
    return f"{article}person"


def prompt(request: Request, subject: str | None = None, rng: np.random.Generator | None = None) -> str:
    """The caption for a request. `subject` replaces the (left) person's words ("sks person" for a trained
    identity, written "a sks person"); with `rng`, openers, articles and phrase order vary as in pretraining."""
    pick = (lambda options: options[int(rng.integers(len(options)))]) if rng is not None else (lambda o: o[0])
    if not request.person:
        return f"a photo of {SCENE_NOUN[request.scene or 'studio']}"
    opener = pick(FRAMING_OPENERS[request.framing])
    old = bool(request.look.get("old"))
    first = f"a {subject}" if subject is not None else _subject(request.name, old and not request.pair, pick)
    if request.pair:
        if subject is None and request.name is None and request.partner is None:
            text = f"{opener} two people"
        else:
            second = request.partner if request.partner is not None else "a person"
            text = f"{opener} {first} and {second}"
        if request.scene is not None:
            text += " " + SCENE_PLACE[request.scene]
        return text
    if subject is not None and old:
        first = f"an old {subject}"
    text = f"{opener} {first}"
    if request.view is not None:
        text += " " + VIEW_PHRASE[request.view]
    phrases = _attribute_phrases(request.look)
    if rng is not None:
        phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    if phrases:
        text += " " + (", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0])
    if request.scene is not None:
        text += ("," if phrases or request.view else "") + " " + SCENE_PLACE[request.scene]
    return text


def _named(person, rng: np.random.Generator) -> str | None:
    return person.name if person.name is not None and rng.random() < NAMED_RATE else None


def mentioned(facts: Facts, rng: np.random.Generator) -> Request:
    """A random part of a picture's facts, as a caption would name it."""
    if not facts.people:
        return Request(scene=facts.scene, person=False)
    scene = facts.scene if rng.random() < 0.85 else None
    first = facts.people[0]
    framing = first.framing if rng.random() < 0.85 else None
    if len(facts.people) == 2:
        return Request(scene=scene, framing=framing, pair=True, name=_named(first, rng),
                       partner=_named(facts.people[1], rng))
    look: dict = {}
    for name in ("hair", "eyes", "glasses", "hat", "smiling"):
        value = getattr(first.look, name)
        # Only what the framing and view show is named: a word with no visible effect teaches nothing.
        if name not in visible_look(first.framing, first.view):
            continue
        if rng.random() < 0.5 and not (name == "hair" and value == "grey") and value is not False:
            look[name] = value
    if first.look.old and rng.random() < 0.6:
        look["old"] = True
    view = first.view if len(FRAMING_LAYOUT[first.framing].views) > 1 and rng.random() < 0.7 else None
    return Request(scene=scene, framing=framing, look=look, view=view, name=_named(first, rng))


def pretraining_person(rng: np.random.Generator) -> tuple[Identity, str | None]:
    """(identity, name) of a pretraining person: a roster person, or an unnamed one outside the held-out margin."""
    if rng.random() < ROSTER_RATE:
        name = str(list(ROSTER)[rng.integers(len(ROSTER))])
        return ROSTER[name], name
    return unnamed_identity(rng), None


def random_facts(rng: np.random.Generator) -> Facts:
    """One pretraining picture: a scene with nobody, one person, or two side by side; never a held-out person."""
    scene = str(list(SCENES)[rng.integers(len(SCENES))])
    if rng.random() < NO_PERSON_RATE:
        return Facts(scene=scene)
    framing = str(FRAMINGS[rng.integers(len(FRAMINGS))])
    if rng.random() < PAIR_RATE:
        people = []
        for _ in range(2):
            identity, name = pretraining_person(rng)
            people.append((identity, random_look(rng), random_view(rng, framing), name))
        return Facts(scene=scene, people=place_pair(rng, people, framing))
    identity, name = pretraining_person(rng)
    return Facts(scene=scene, people=(place(rng, identity, random_look(rng), framing, random_view(rng, framing),
                                            name),))


def pretraining_pair(rng: np.random.Generator) -> tuple[Facts, str]:
    """The pretraining stream's one draw: a picture's facts and its caption."""
    facts = random_facts(rng)
    return facts, prompt(mentioned(facts, rng), rng=rng)


def request_look(request: Request, rng: np.random.Generator) -> Look:
    """A random look that satisfies the request's worded attributes (the second world's rule)."""
    return fit_look(request.look, random_look(rng), rng)


def request_facts(request: Request, identity: Identity, rng: np.random.Generator,
                  partner: Identity | None = None) -> Facts:
    """Facts that satisfy a request for a given identity (and the right-hand person's for a pair): training photos,
    reference pictures, and what the reader's tests render."""
    scene = request.scene or str(list(SCENES)[rng.integers(len(SCENES))])
    if not request.person:
        return Facts(scene=scene)
    framing = request.framing or str(FRAMINGS[rng.integers(len(FRAMINGS))])
    if request.pair:
        if partner is None:
            raise ValueError("a request for two people needs the right-hand person's identity (partner=...)")
        people = [(identity, request_look(request, rng), random_view(rng, framing), request.name),
                  (partner, request_look(request, rng), random_view(rng, framing), request.partner)]
        return Facts(scene=scene, people=place_pair(rng, people, framing))
    view = request.view or random_view(rng, framing)
    return Facts(scene=scene, people=(place(rng, identity, request_look(request, rng), framing, view,
                                            request.name),))


__all__ = ["Request", "prompt", "mentioned", "random_facts", "pretraining_pair", "request_facts", "VIEW_PHRASE",
           "EYES"]
