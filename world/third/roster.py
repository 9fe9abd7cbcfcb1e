"""The third world's people: a roster of 200 named people, and held-out people kept away from all of pretraining.

Named people are why an identity can be learned here: captions name them ("a photo of emma on a beach") and never
their traits, so the text space gains a direction per person that moves skin, brow, nose, ear and mark together —
what real Stable Diffusion's captions give it with thousands of celebrities, and what textual inversion and Celeb
Basis rely on. Each name is one CLIP token of a real first name (tests/miniature/test_third_world.py checks it with
the host's own tokenizer). The roster's traits are balanced (each tint on 25 people, each mark on a third).

Held-out people are unnamed and never drawn in pretraining, named or not: every pretraining person is at trait
distance ≥ MARGIN from every held-out one (`trait_distance`: the number of differing discrete traits — brow, nose,
ear, mark — plus the skin-tone difference in units of SKIN_STEP, capped at 1). With MARGIN 2 a pretraining person
differs from each held-out one in at least two discrete traits, or in one and by ≥ SKIN_STEP in skin tone.
Held-out people 0–15 are test people; 16–23 are validation people, on which settings are chosen.
"""
from __future__ import annotations

import numpy as np

from .render import MARKS, TINTS, Identity, random_identity

NAMES = tuple("""
emma liam olivia noah isabella oliver sophia elijah charlotte william amelia benjamin evelyn lucas abigail henry
emily theodore elizabeth alexander sofia mateo ella daniel scarlett michael chloe sebastian aubrey ethan zoey owen
layla samuel nora jacob leah asher audrey aiden claire joseph skylar david lucy julian paisley grayson anna matthew
caroline ezra emilia gabriel samantha isaac maya anthony naomi thomas elena elias ariana charles allison caleb alice
christopher cora ezekiel valentina miles isla isaiah sadie andrew piper joshua lydia nathan alexa nolan julia adrian
vivian santiago sophie aaron madeline christian clara landon hadley roman melanie axel reagan jonathan katherine
robert isabelle jameson natalie everett athena wesley arya jeremiah alexandra leonardo margaret jose ashley bennett
amaya nicholas eliza connor brianna dominic andrea xavier jasmine jace isabel emmett annabelle adam anastasia declan
alyssa micah juliana damian esther evan ariel vincent cecilia myles valerie harrison molly bryson lilly amir
kimberly giovanni lauren diego genevieve jasper elise jason alexis nathaniel lucia george juliette lorenzo sienna
luis callie enzo gracie jonah josie thiago jocelyn zachary daniela calvin rachel braxton catherine ashton joanna
carlos rebecca arthur mariah tyler nicole elliot fiona graham gemma maxwell vanessa juan catalina leila juliet
delaney selena malia michelle angela heidi margot
""".split())

ROSTER_SEED = 20261207
HELD_OUT_SEED = 20261208
HELD_OUT_COUNT = 24        # 0..15 test people, 16..23 validation people
TEST_PEOPLE = range(0, 16)
VALIDATION_PEOPLE = range(16, 24)
SKIN_STEP = 0.15
MARGIN = 2.0
_DISCRETE = ("brow", "nose", "ear", "mark")


def trait_distance(a: Identity, b: Identity) -> float:
    return sum(getattr(a, t) != getattr(b, t) for t in _DISCRETE) + min(1.0, abs(a.skin - b.skin) / SKIN_STEP)


def nearest_distance(identity: Identity, others) -> float:
    return min((trait_distance(identity, o) for o in others), default=float("inf"))


def held_out_identities(count: int = HELD_OUT_COUNT) -> list[Identity]:
    """People never shown in pretraining: evenly spread skin tones, each tint and mark in turn, and at least MARGIN
    apart from each other too (so no held-out person stands in for another)."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    tones = (np.arange(count) + 0.5) / count
    rng.shuffle(tones)
    people: list[Identity] = []
    for i in range(count):
        while True:
            person = Identity(skin=round(float(tones[i]), 4), brow=int(rng.integers(len(TINTS))),
                              nose=int(rng.integers(len(TINTS))), ear=int(rng.integers(len(TINTS))),
                              mark=MARKS[i % len(MARKS)])
            if nearest_distance(person, people) >= MARGIN:
                break
        people.append(person)
    return people


_HELD_OUT = held_out_identities()


def is_kept_out(identity: Identity) -> bool:
    """True when pretraining may show this identity: at least MARGIN from every held-out person."""
    return nearest_distance(identity, _HELD_OUT) >= MARGIN


def roster() -> dict[str, Identity]:
    """name → identity for the 200 named people: balanced tints and marks, skin tones evenly spread, no two alike
    in every discrete trait, every one kept out of the held-out people's margin."""
    rng = np.random.default_rng(ROSTER_SEED)
    n = len(NAMES)
    columns = {t: rng.permutation(np.arange(n) % len(TINTS)) for t in ("brow", "nose", "ear")}
    marks = rng.permutation(np.arange(n) % len(MARKS))
    tones = rng.permutation((np.arange(n) + 0.5) / n)
    people: dict[str, Identity] = {}
    seen: set[tuple] = set()
    for i, name in enumerate(NAMES):
        person = Identity(skin=round(float(tones[i]), 4), brow=int(columns["brow"][i]),
                          nose=int(columns["nose"][i]), ear=int(columns["ear"][i]), mark=MARKS[int(marks[i])])
        # Rare clashes are redrawn (a few tints off balance is cheaper than a held-out person in pretraining).
        while not is_kept_out(person) or _discrete(person) in seen:
            drawn = random_identity(rng)
            person = Identity(skin=person.skin, brow=drawn.brow, nose=drawn.nose, ear=drawn.ear, mark=drawn.mark)
        seen.add(_discrete(person))
        people[name] = person
    return people


def _discrete(identity: Identity) -> tuple:
    return tuple(getattr(identity, t) for t in _DISCRETE)


ROSTER = roster()


def unnamed_identity(rng: np.random.Generator) -> Identity:
    """A pretraining person no caption names: any identity outside the held-out people's margin."""
    while True:
        identity = random_identity(rng)
        if is_kept_out(identity):
            return identity
