"""The world's renderer: facts (scene, framing, worded look, wordless identity) → a 64 × 64 picture of 8 × 8 cells.

Every picture is an 8 × 8 grid of flat-coloured cells, each 8 × 8 pixels, so the constructed VAE (world/vae.py) maps
it to an 8 × 8 latent exactly. A person is a head block (optional hat row, hair row, face) over clothes; how much of
the face shows depends on the framing. Colours are chosen far apart per role so the reader (world/read.py) can take
any generated picture back to its facts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

GRID = 8           # cells per side
CELL = 8           # pixels per cell side (the VAE's downscale)
SIZE = GRID * CELL

# ---- palette (RGB in 0..1) -------------------------------------------------------------------------------------
SCENES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # name: (upper colour above the horizon, lower colour from the horizon down)
    "studio": ((0.80, 0.80, 0.84), (0.80, 0.80, 0.84)),
    "beach": ((0.35, 0.75, 0.95), (0.95, 0.85, 0.55)),
    "forest": ((0.10, 0.45, 0.15), (0.25, 0.35, 0.10)),
    "snow": ((0.75, 0.85, 0.95), (1.00, 1.00, 1.00)),
    "city": ((0.45, 0.55, 0.75), (0.25, 0.25, 0.28)),
    "night": ((0.05, 0.05, 0.25), (0.02, 0.02, 0.05)),
    "library": ((0.45, 0.05, 0.10), (0.35, 0.20, 0.50)),
}
HORIZONS = (5,)        # first row of the lower colour (one horizon: fewer things to learn on a 2-core budget)
HAIR = {"black": (0.08, 0.06, 0.05), "blonde": (0.98, 0.90, 0.35), "red": (0.85, 0.25, 0.05),
        "grey": (0.62, 0.62, 0.62)}
WORDED_HAIR = ("black", "blonde", "red")      # grey hair is what "old" looks like, never asked for by colour
EYES = {"blue": (0.10, 0.30, 1.00), "green": (0.05, 0.85, 0.25), "brown": (0.45, 0.22, 0.02)}
# Smiling shows teeth: a near-white mouth against the neutral dark one. (The first world used pink vs dark red, a
# change of 0.75 in RGB on one or two cells; its model never learned the word — docs/world.md, "smiling".)
MOUTH = {True: (1.00, 0.95, 0.90), False: (0.45, 0.00, 0.05)}     # smiling, neutral
GLASSES = (0.00, 0.80, 0.80)
HAT = (0.95, 0.55, 0.00)
MARK = (0.60, 0.00, 0.60)
CLOTHES = ((0.20, 0.30, 0.70), (0.70, 0.70, 0.20), (0.85, 0.85, 0.85))
LEGS = (0.15, 0.15, 0.35)
SKIN_LIGHT = np.array((0.98, 0.82, 0.70))
SKIN_DARK = np.array((0.40, 0.24, 0.15))

FRAMINGS = ("close-up", "head-and-shoulders", "wide")
JAWS = ("square", "narrow")
MARKS = ("none", "left", "right")
HAIRLINES = ("high", "low")


def skin_colour(tone: float) -> np.ndarray:
    """Skin along one continuous line, light (0) to dark (1): the identity trait no word names."""
    return (1.0 - tone) * SKIN_LIGHT + tone * SKIN_DARK


# ---- facts -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """The traits of one person that no caption word names: they can only be learned from photos."""
    skin: float          # 0..1 along skin_colour
    jaw: str             # square: the mouth row's corners are skin; narrow: they are background
    mark: str            # a birthmark on the left / right cheek, or none
    hairline: str        # low: the forehead's corners are hair (close-ups only)


@dataclass(frozen=True)
class Look:
    """What captions can name."""
    hair: str            # one of WORDED_HAIR, or "grey" when old
    eyes: str
    glasses: bool
    hat: bool
    smiling: bool
    old: bool


@dataclass(frozen=True)
class Person:
    identity: Identity
    look: Look
    framing: str
    x: int               # column of the head block's left edge
    y: int               # row of the head block's top (the hat row when there is a hat)
    clothes: int         # index into CLOTHES (not named by captions)


@dataclass(frozen=True)
class Facts:
    scene: str
    horizon: int
    person: Person | None


# Role grids per framing, top to bottom, below the optional hat row. Letters: H hair, S skin, E eye, M mouth,
# h hairline corner, g glasses cell, k / r left / right cheek, j jaw corner, C clothes, P legs, . background.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "close-up": ("HHHH", "hSSh", "gEEg", "kSSr", "jMMj", "CCCC"),
    "head-and-shoulders": (".HHH.", ".EgE.", ".kSr.", ".jMj.", "CCCCC", "CCCCC"),
    "wide": ("HH", "SS", "SS", "CC", "CC", "PP"),
}
# Face rows (for the face box and mask) within each layout, and the traits each framing shows.
FACE_ROWS = {"close-up": (1, 5), "head-and-shoulders": (1, 4), "wide": (1, 3)}
FACE_COLS = {"close-up": (0, 4), "head-and-shoulders": (1, 4), "wide": (0, 2)}
VISIBLE_TRAITS = {"close-up": ("skin", "jaw", "mark", "hairline"),
                  "head-and-shoulders": ("skin", "jaw", "mark"),
                  "wide": ("skin",)}
VISIBLE_LOOK = {"close-up": ("hair", "eyes", "glasses", "hat", "smiling"),
                "head-and-shoulders": ("hair", "eyes", "glasses", "hat", "smiling"),
                "wide": ("hair", "hat")}


def block_height(framing: str, hat: bool) -> int:
    return len(LAYOUTS[framing]) + int(hat)


def block_width(framing: str) -> int:
    return len(LAYOUTS[framing][0])


def placements(framing: str, hat: bool) -> list[tuple[int, int]]:
    """Where a head block may stand: people stand on the picture's lower edge, horizontally anywhere that keeps a
    background column beside a narrow block (the framing sets the face's size, the column its place)."""
    w, h = block_width(framing), block_height(framing, hat)
    xs = range(0, GRID - w + 1) if w >= 5 else range(1, GRID - w)
    ys = [GRID - h]
    return [(x, y) for y in ys for x in xs]


def _role_colour(role: str, person: Person, background: np.ndarray) -> np.ndarray | None:
    ident, look = person.identity, person.look
    skin = skin_colour(ident.skin)
    table = {
        "H": np.array(HAIR[look.hair]), "S": skin, "E": np.array(EYES[look.eyes]), "M": np.array(MOUTH[look.smiling]),
        "h": np.array(HAIR[look.hair]) if ident.hairline == "low" else skin,
        "g": np.array(GLASSES) if look.glasses else skin,
        "k": np.array(MARK) if ident.mark == "left" else skin,
        "r": np.array(MARK) if ident.mark == "right" else skin,
        "j": skin if ident.jaw == "square" else background,
        "C": np.array(CLOTHES[person.clothes]), "P": np.array(LEGS),
    }
    return table.get(role)


def background(scene: str, horizon: int, grid: int = GRID) -> np.ndarray:
    """A scene's cells: its upper colour above the horizon row, its lower one from there down (grid × grid × 3)."""
    upper, lower = SCENES[scene]
    cells = np.empty((grid, grid, 3))
    cells[:horizon] = upper
    cells[horizon:] = lower
    return cells


def person_roles(person: Person) -> dict[tuple[int, int], str]:
    """(row, col) → role letter for every cell the person covers (the hat row as 'T')."""
    roles: dict[tuple[int, int], str] = {}
    top = person.y
    if person.look.hat:
        c0, c1 = FACE_COLS[person.framing]
        for c in range(c0, c1):
            roles[(top, person.x + c)] = "T"
        top += 1
    for r, row in enumerate(LAYOUTS[person.framing]):
        for c, role in enumerate(row):
            if role != "." and top + r < GRID:
                roles[(top + r, person.x + c)] = role
    return roles


def render_cells(facts: Facts) -> np.ndarray:
    """The picture as its 8 × 8 × 3 cell colours (float64, 0..1)."""
    cells = background(facts.scene, facts.horizon)
    if facts.person is not None:
        for (r, c), role in person_roles(facts.person).items():
            colour = np.array(HAT) if role == "T" else _role_colour(role, facts.person, cells[r, c].copy())
            cells[r, c] = colour
    return cells


def cells_to_image(cells: np.ndarray) -> np.ndarray:
    """G × G × 3 cells → (8·G) × (8·G) × 3 float32 image (each cell a flat 8 × 8 square)."""
    return np.repeat(np.repeat(cells, CELL, axis=0), CELL, axis=1).astype(np.float32)


def render(facts: Facts) -> np.ndarray:
    return cells_to_image(render_cells(facts))


def face_box(person: Person) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the face in cells, end-exclusive."""
    top = person.y + int(person.look.hat)
    r0, r1 = FACE_ROWS[person.framing]
    c0, c1 = FACE_COLS[person.framing]
    return top + r0, person.x + c0, top + r1, person.x + c1


def face_mask(facts: Facts) -> np.ndarray:
    """64 × 64 float32 mask of the face (1 inside the face box), zeros when there is no person."""
    mask = np.zeros((GRID, GRID), np.float32)
    if facts.person is not None:
        r0, c0, r1, c1 = face_box(facts.person)
        mask[r0:r1, c0:c1] = 1.0
    return np.repeat(np.repeat(mask, CELL, axis=0), CELL, axis=1)


# ---- random draws ----------------------------------------------------------------------------------------------
def random_identity(rng: np.random.Generator) -> Identity:
    return Identity(skin=float(rng.uniform(0.0, 1.0)), jaw=str(rng.choice(JAWS)), mark=str(rng.choice(MARKS)),
                    hairline=str(rng.choice(HAIRLINES)))


def random_look(rng: np.random.Generator) -> Look:
    old = bool(rng.random() < 0.2)
    return Look(hair="grey" if old else str(rng.choice(WORDED_HAIR)), eyes=str(rng.choice(list(EYES))),
                glasses=bool(rng.random() < 0.3), hat=bool(rng.random() < 0.3), smiling=bool(rng.random() < 0.5),
                old=old)


def place(rng: np.random.Generator, identity: Identity, look: Look, framing: str) -> Person:
    x, y = placements(framing, look.hat)[rng.integers(len(placements(framing, look.hat)))]
    return Person(identity=identity, look=look, framing=framing, x=x, y=y, clothes=int(rng.integers(len(CLOTHES))))


def with_look(person: Person, **changes) -> Person:
    """The same person with some worded attributes changed (old ⇒ grey hair), re-placed if a hat no longer fits."""
    look = replace(person.look, **changes)
    if changes.get("old"):
        look = replace(look, hair="grey")
    return replace(person, look=look)


# ---- held-out identities ---------------------------------------------------------------------------------------
HELD_OUT_SEED = 20261203
HELD_OUT_COUNT = 16
SKIN_EXCLUSION = 0.04   # pretraining never draws a held-out person's discrete traits within this skin distance


def held_out_identities(count: int = HELD_OUT_COUNT) -> list[Identity]:
    """People never shown in pretraining: evenly spread skin tones, every discrete trait combination in turn."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    combos = [(j, m, h) for j in JAWS for m in MARKS for h in HAIRLINES]
    order = rng.permutation(len(combos))
    tones = (np.arange(count) + 0.5) / count
    rng.shuffle(tones)
    return [Identity(skin=round(float(tones[i]), 4), jaw=combos[order[i % len(combos)]][0],
                     mark=combos[order[i % len(combos)]][1], hairline=combos[order[i % len(combos)]][2])
            for i in range(count)]


def is_held_out(identity: Identity, held_out: list[Identity]) -> bool:
    return any(identity.jaw == h.jaw and identity.mark == h.mark and identity.hairline == h.hairline
               and abs(identity.skin - h.skin) < SKIN_EXCLUSION for h in held_out)


def pretraining_identity(rng: np.random.Generator, held_out: list[Identity]) -> Identity:
    while True:
        identity = random_identity(rng)
        if not is_held_out(identity, held_out):
            return identity
