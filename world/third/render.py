"""The third world's renderer: facts (scene, one or two people, each with a framing, a head view, a worded look and a
wordless identity) → an 80 × 80 picture of 10 × 10 cells of 8 × 8 px.

A head is drawn as a window onto a ring of cell columns: the face's columns (from the person's right cheek to their
left one), then behind them one column of hair with the ear and one of hair only, on either side. A front view shows
the face's columns; turning the head slides the window, so a three-quarter view loses the far cheek and shows the
near ear, a profile also loses the far eye and brow. Which traits and looks a view shows follows from the roles in
its window (`visible_traits`, `visible_look`), and what it hides is never named by captions nor scored.

The scenes, hair, eye, mouth, glasses, hat, mark, clothes and skin colours are the second world's (world/render.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..render import (CLOTHES, EYES, GLASSES, HAIR, HAT, LEGS, MARK, MOUTH, WORDED_HAIR, Look, cells_to_image,
                      skin_colour)
from ..render import background as second_world_background

GRID = 10          # cells per side: room for two people side by side and a scene around them
CELL = 8           # pixels per cell side (the VAE's downscale)
SIZE = GRID * CELL
HORIZON = 6        # first row of a scene's lower colour

# Wordless feature tints (brow, nose, ear each take one): far apart from each other, so a reading is unambiguous
# under generation noise; whether they look like real brows matters less than that no word ever names them.
TINTS = ((0.90, 0.10, 0.10), (0.10, 0.60, 0.10), (0.15, 0.15, 0.85), (0.90, 0.85, 0.10),
         (0.85, 0.15, 0.85), (0.10, 0.80, 0.85), (0.95, 0.95, 0.95), (0.20, 0.10, 0.30))
MARKS = ("none", "left", "right")   # on the person's own left / right cheek (a front view shows "left" on the right)
FRAMINGS = ("close-up", "head-and-shoulders", "wide")
VIEWS = ("front", "three-quarter-left", "three-quarter-right", "profile-left", "profile-right")
"""Head yaw; "left" = the face points to the picture's left, so the person's left cheek is the near one."""
_WINDOW_OFFSET = {"profile-right": 0, "three-quarter-right": 1, "front": 2, "three-quarter-left": 3, "profile-left": 4}


@dataclass(frozen=True)
class Framing:
    """A framing's head: `face` columns (each a string of roles, top to bottom: the hair row, then the face rows),
    the `back` columns behind an ear (near, far), where the head stands in its block, and the body rows below."""
    face: tuple[str, ...]
    back: tuple[str, str]
    block_width: int
    head_offset: int
    body: tuple[str, ...]
    views: tuple[str, ...]


# Roles: H hair, B brow, E eye, g glasses (skin without), N nose, R / L the person's right / left cheek (mark or
# skin), A ear, S skin, M mouth, C clothes, P legs, T hat (a row above the head), . background.
FRAMING_LAYOUT = {
    "close-up": Framing(face=("HSgRS", "HBENM", "HBENM", "HSgLS"), back=("HHHAH", "HHHHH"), block_width=4,
                        head_offset=0, body=("CCCC",), views=VIEWS),
    "head-and-shoulders": Framing(face=("HBERS", "HSgNM", "HBELS"), back=("HHHAH", "HHHHH"), block_width=5,
                                  head_offset=1, body=("CCCCC", "CCCCC"), views=VIEWS),
    # A wide shot's head is two cells of skin: it cannot turn visibly, so it is always seen from the front.
    "wide": Framing(face=("HSS", "HSS"), back=("HHH", "HHH"), block_width=2, head_offset=0,
                    body=("CC", "CC", "PP"), views=("front",)),
}


def head_columns(framing: str, view: str) -> list[str]:
    """The head's columns left to right in the picture for this view (each a top-to-bottom string of roles)."""
    layout = FRAMING_LAYOUT[framing]
    if view not in layout.views:
        raise ValueError(f"a {framing} shows the views {layout.views}, not {view!r}")
    near, far = layout.back
    ring = [far, near, *layout.face, near, far]
    start = _WINDOW_OFFSET[view]
    return ring[start:start + len(layout.face)]


def head_roles(framing: str, view: str) -> set[str]:
    return set("".join(head_columns(framing, view)))


def visible_traits(framing: str, view: str) -> tuple[str, ...]:
    """The wordless traits this framing and view show. "mark" needs both cheeks; one cheek shows "mark_left" or
    "mark_right": whether that cheek carries the mark (the far one's is hidden)."""
    roles = head_roles(framing, view)
    traits = ["skin"] + [name for name, role in (("brow", "B"), ("nose", "N"), ("ear", "A")) if role in roles]
    if {"R", "L"} <= roles:
        traits.append("mark")
    elif "L" in roles:
        traits.append("mark_left")
    elif "R" in roles:
        traits.append("mark_right")
    return tuple(traits)


def visible_look(framing: str, view: str) -> tuple[str, ...]:
    """The worded looks this framing and view show (hair and hat always; old is grey hair)."""
    roles = head_roles(framing, view)
    return tuple(name for name, role in (("hair", "H"), ("eyes", "E"), ("glasses", "g"), ("hat", "H"),
                                         ("smiling", "M")) if role in roles)


# ---- facts -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """What no caption word names: skin tone (0 light … 1 dark), brow, nose and ear tints (indices into TINTS), and
    a mark on one cheek or none. Named people carry theirs under their name; nothing else says them."""
    skin: float
    brow: int
    nose: int
    ear: int
    mark: str


@dataclass(frozen=True)
class Person:
    identity: Identity
    look: Look
    framing: str
    view: str
    x: int               # column of the block's left edge
    y: int               # row of the block's top (the hat row when there is a hat)
    clothes: int         # index into CLOTHES (not named by captions)
    name: str | None = None   # the roster name captions may use; None: a person no caption can name


@dataclass(frozen=True)
class Facts:
    scene: str
    people: tuple[Person, ...] = ()    # none, one, or two side by side (left to right)
    horizon: int = HORIZON


def block_height(framing: str, hat: bool) -> int:
    layout = FRAMING_LAYOUT[framing]
    return len(layout.face[0]) + len(layout.body) + int(hat)


def single_placements(framing: str, hat: bool) -> list[tuple[int, int]]:
    """Where one person may stand: on the lower edge, anywhere that keeps a background column beside a narrow block."""
    w, h = FRAMING_LAYOUT[framing].block_width, block_height(framing, hat)
    xs = range(0, GRID - w + 1) if w >= 5 else range(1, GRID - w)
    return [(x, GRID - h) for x in xs]


def pair_columns(framing: str) -> list[tuple[int, int]]:
    """Left edges (left person, right person) of two people side by side: narrow blocks keep a column between them;
    head-and-shoulders blocks may touch (their heads still have background between them)."""
    w = FRAMING_LAYOUT[framing].block_width
    gap = 0 if w >= 5 else 1
    return [(a, b) for a in range(GRID) for b in range(a + w + gap, GRID - w + 1)]


def person_roles(person: Person) -> dict[tuple[int, int], str]:
    """(row, col) → role letter for every cell the person's block covers ('.' cells are background)."""
    layout = FRAMING_LAYOUT[person.framing]
    roles: dict[tuple[int, int], str] = {}
    top = person.y
    columns = head_columns(person.framing, person.view)
    left = person.x + layout.head_offset
    if person.look.hat:
        for c in range(len(columns)):
            roles[(top, left + c)] = "T"
        top += 1
    for c, column in enumerate(columns):
        for r, role in enumerate(column):
            roles[(top + r, left + c)] = role
    for r, row in enumerate(layout.body):
        for c, role in enumerate(row):
            roles[(top + len(columns[0]) + r, person.x + c)] = role
    return roles


def role_colour(role: str, person: Person) -> np.ndarray | None:
    """The colour of one of the person's roles; None for background."""
    ident, look = person.identity, person.look
    skin = skin_colour(ident.skin)
    table = {
        "H": HAIR[look.hair], "S": skin, "E": EYES[look.eyes], "M": MOUTH[look.smiling], "T": HAT,
        "B": TINTS[ident.brow], "N": TINTS[ident.nose], "A": TINTS[ident.ear],
        "g": GLASSES if look.glasses else skin,
        "R": MARK if ident.mark == "right" else skin,
        "L": MARK if ident.mark == "left" else skin,
        "C": CLOTHES[person.clothes], "P": LEGS,
    }
    colour = table.get(role)
    return None if colour is None else np.asarray(colour, dtype=np.float64)


def background(scene: str, horizon: int = HORIZON) -> np.ndarray:
    return second_world_background(scene, horizon, GRID)


def render_cells(facts: Facts) -> np.ndarray:
    """The picture as its GRID × GRID × 3 cell colours (float64, 0..1)."""
    cells = background(facts.scene, facts.horizon)
    for person in facts.people:
        for (r, c), role in person_roles(person).items():
            colour = role_colour(role, person)
            if colour is not None:
                cells[r, c] = colour
    return cells


def render(facts: Facts) -> np.ndarray:
    """[80, 80, 3] float32 in 0..1."""
    return cells_to_image(render_cells(facts))


def face_box(person: Person) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the face in cells (the head's window below its hair row), end-exclusive."""
    layout = FRAMING_LAYOUT[person.framing]
    top = person.y + int(person.look.hat) + 1
    left = person.x + layout.head_offset
    return top, left, top + len(layout.face[0]) - 1, left + len(layout.face)


def face_mask(facts: Facts, which: int | None = None) -> np.ndarray:
    """SIZE × SIZE float32 mask of the faces (or of person `which` only); zeros when there is no person."""
    mask = np.zeros((GRID, GRID), np.float32)
    for i, person in enumerate(facts.people):
        if which is None or which == i:
            r0, c0, r1, c1 = face_box(person)
            mask[r0:r1, c0:c1] = 1.0
    return np.repeat(np.repeat(mask, CELL, axis=0), CELL, axis=1)


# ---- random draws ----------------------------------------------------------------------------------------------
def random_identity(rng: np.random.Generator) -> Identity:
    return Identity(skin=float(rng.uniform(0.0, 1.0)), brow=int(rng.integers(len(TINTS))),
                    nose=int(rng.integers(len(TINTS))), ear=int(rng.integers(len(TINTS))),
                    mark=str(MARKS[rng.integers(len(MARKS))]))


def random_look(rng: np.random.Generator) -> Look:
    old = bool(rng.random() < 0.2)
    return Look(hair="grey" if old else str(WORDED_HAIR[rng.integers(len(WORDED_HAIR))]),
                eyes=str(list(EYES)[rng.integers(len(EYES))]), glasses=bool(rng.random() < 0.3),
                hat=bool(rng.random() < 0.3), smiling=bool(rng.random() < 0.5), old=old)


def random_view(rng: np.random.Generator, framing: str) -> str:
    views = FRAMING_LAYOUT[framing].views
    return str(views[rng.integers(len(views))])


def place(rng: np.random.Generator, identity: Identity, look: Look, framing: str, view: str,
          name: str | None = None) -> Person:
    spots = single_placements(framing, look.hat)
    x, y = spots[rng.integers(len(spots))]
    return Person(identity=identity, look=look, framing=framing, view=view, x=x, y=y,
                  clothes=int(rng.integers(len(CLOTHES))), name=name)


def place_pair(rng: np.random.Generator, people: list[tuple[Identity, Look, str, str | None]],
               framing: str) -> tuple[Person, Person]:
    """Two people (identity, look, view, name) side by side, the first on the left."""
    columns = pair_columns(framing)
    xs = columns[rng.integers(len(columns))]
    out = []
    for (identity, look, view, name), x in zip(people, xs):
        out.append(Person(identity=identity, look=look, framing=framing, view=view, x=x,
                          y=GRID - block_height(framing, look.hat), clothes=int(rng.integers(len(CLOTHES))),
                          name=name))
    return out[0], out[1]


def with_look(person: Person, **changes) -> Person:
    """The same person with some worded attributes changed (old ⇒ grey hair), standing on the lower edge."""
    look = replace(person.look, **changes)
    if changes.get("old"):
        look = replace(look, hair="grey")
    return replace(person, look=look, y=GRID - block_height(person.framing, look.hat))
