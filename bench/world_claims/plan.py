"""What the claims benchmark trains and asks: the variants of SeFi Train Identity, the prompts that move a trained
identity away from its photo, and the order of the runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from world.captions import Request

TRIGGER = "sks"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    settings: dict = field(default_factory=dict)   # SeFi Train Identity inputs that differ from the node's defaults
    weight: float | None = None                    # λ of the reference attention loss (None: no such loss)


# Every variant goes through the same node with the same steps and the node's learning-rate rule (0 = the
# parametrisation's default); only the method's switches differ.
VARIANTS: tuple[Variant, ...] = (
    Variant("ti", "textual inversion (one token, no stages, no K/V split, no attention loss)",
            dict(parametrisation="direct tokens", stages=1, kv_split=False, attention_loss="off")),
    Variant("sefi", "SeFi-IDE as the paper states it (λ 0.003)", {}, 0.003),
    Variant("no_attention", "SeFi without the attention loss (λ 0)", dict(attention_loss="off"), 0.0),
    Variant("no_kv_split", "SeFi without the K/V split", dict(kv_split=False), 0.003),
    Variant("one_stage", "SeFi with one stage", dict(stages=1), 0.003),
    Variant("mask", "SeFi with the mask attention loss", dict(attention_loss="mask")),
    Variant("lambda_1e-4", "SeFi, λ 1e-4", dict(attention_weight=1e-4), 1e-4),
    Variant("lambda_1e-2", "SeFi, λ 1e-2", dict(attention_weight=1e-2), 1e-2),
    Variant("lambda_5e-2", "SeFi, λ 5e-2", dict(attention_weight=5e-2), 5e-2),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
LAMBDA_SWEEP = tuple(v.name for v in sorted((v for v in VARIANTS if v.weight is not None and v.name in (
    "no_attention", "lambda_1e-4", "sefi", "lambda_1e-2", "lambda_5e-2")), key=lambda v: v.weight))
"""The paper's λ sweep {0, 1e-4, 3e-3, 1e-2, 5e-2} for the reference mode, by λ."""


@dataclass(frozen=True)
class Move:
    """A prompt for the trained identity and what it moves away from the studio close-up it was trained on."""
    request: Request
    moves: tuple[str, ...]   # of "scene", "framing", "attribute"


# The training photo is a close-up in the studio with black hair, brown eyes, no glasses, hat or smile; each
# prompt asks for something else. (Two identities in one prompt cannot be asked: the world draws one person.)
MOVES: tuple[Move, ...] = (
    Move(Request(scene="beach", framing="head-and-shoulders"), ("scene", "framing")),
    Move(Request(scene="forest", framing="close-up"), ("scene",)),
    Move(Request(scene="snow", framing="close-up", look={"glasses": True}), ("scene", "attribute")),
    Move(Request(scene="night", framing="head-and-shoulders", look={"hat": True}), ("scene", "framing", "attribute")),
    Move(Request(scene="city", framing="wide"), ("scene", "framing")),
    Move(Request(scene="library", framing="head-and-shoulders", look={"old": True}),
         ("scene", "framing", "attribute")),
    Move(Request(scene="studio", framing="close-up", look={"hair": "red"}), ("attribute",)),
    Move(Request(scene="studio", framing="close-up", look={"smiling": True}), ("attribute",)),
)
MOVE_KINDS = ("scene", "framing", "attribute")


@dataclass(frozen=True)
class Run:
    variant: str
    person: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}-person{self.person}-seed{self.seed}"


def runs(variants, people, seeds) -> list[Run]:
    """Every (variant, person, seed), seed-major then person then variant: a run stopped part-way has measured
    every variant on the same people."""
    unknown = sorted(set(variants) - set(VARIANT_NAMES))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANT_NAMES)}")
    return [Run(v, p, s) for s in seeds for p in people for v in variants]


def variant(name: str) -> Variant:
    return next(v for v in VARIANTS if v.name == name)
