"""The world's reader: any picture (rendered or generated) back to the world's facts.

The picture is averaged to its 8 × 8 cells; every way a person can stand in the world (framing, hat, column) is a
hypothesis whose cells have roles (hair, skin, eye, …, background), and each role takes the nearest of its allowed
colours — one skin tone fitted along the skin line, one hair colour for all hair cells, one scene for all background
cells, and so on. The hypothesis with the least squared colour error wins, against the scene-only hypothesis. What
the winning framing hides (eyes in a wide shot, the hairline outside close-ups) is reported as None.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .render import (CELL, CLOTHES, EYES, FACE_COLS, FACE_ROWS, FRAMINGS, GLASSES, GRID, HAIR, HAT, HORIZONS, LEGS,
                     MARK, MOUTH, SCENES, SKIN_DARK, SKIN_LIGHT, VISIBLE_LOOK, VISIBLE_TRAITS, Identity, Look, Person,
                     background, person_roles, placements, skin_colour)


@dataclass
class Reading:
    scene: str
    framing: str | None                   # None: no person
    column: int | None = None
    face_box: tuple[int, int, int, int] | None = None   # cells, (row0, col0, row1, col1), end-exclusive
    look: dict = field(default_factory=dict)       # visible worded attributes: hair, eyes, glasses, hat, smiling, old
    identity: dict = field(default_factory=dict)   # visible wordless traits: skin (float), jaw, mark, hairline
    error: float = 0.0                    # root mean squared colour error per cell of the winning fit

    @property
    def person(self) -> bool:
        return self.framing is not None


def image_to_cells(image: np.ndarray, grid: int = GRID) -> np.ndarray:
    """[H, W, 3] in 0..1 (any size divisible into grid × grid blocks) → [grid, grid, 3] cell means (the second world's
    grid is 8, the third's 10)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    h, w = image.shape[:2]
    if h % grid or w % grid:
        raise ValueError(f"a world picture is {grid * CELL}×{grid * CELL} px (any multiple of {grid}); got {w}×{h}")
    return image[..., :3].reshape(grid, h // grid, grid, w // grid, 3).mean(axis=(1, 3))


def _d2(cells: np.ndarray, colour) -> np.ndarray:
    return ((cells - np.asarray(colour, dtype=np.float64)) ** 2).sum(axis=-1)


def _fit_skin(colours: np.ndarray) -> tuple[float, float]:
    """Best single tone for these cells along the skin line, and its summed squared error."""
    axis = SKIN_DARK - SKIN_LIGHT
    t = float(np.clip(((colours - SKIN_LIGHT) @ axis).mean() / (axis @ axis), 0.0, 1.0))
    return t, float(_d2(colours, skin_colour(t)).sum())


def _choose(colours: np.ndarray, options: dict) -> tuple[object, float]:
    costs = {name: float(_d2(colours, c).sum()) for name, c in options.items()}
    best = min(costs, key=costs.get)
    return best, costs[best]


class _Fit:
    def __init__(self, cells: np.ndarray):
        self.cells = cells
        self.backgrounds = {(s, h): background(s, h) for s in SCENES for h in HORIZONS}
        self.bg_cost = {k: _d2(cells, bg) for k, bg in self.backgrounds.items()}

    def scene_only(self) -> Reading:
        key = min(self.bg_cost, key=lambda k: self.bg_cost[k].sum())
        return Reading(scene=key[0], framing=None, error=self._rms(self.bg_cost[key].sum()))

    def _rms(self, total: float) -> float:
        return float(np.sqrt(total / (GRID * GRID)))

    def person(self, framing: str, hat: bool, x: int, y: int) -> tuple[float, Reading]:
        dummy = Person(identity=Identity(0.0, "square", "none", "high"),
                       look=Look("black", "blue", False, hat, False, False), framing=framing, x=x, y=y, clothes=0)
        roles = person_roles(dummy)
        by_role: dict[str, list[tuple[int, int]]] = {}
        for cell, role in roles.items():
            by_role.setdefault(role, []).append(cell)
        cells = self.cells

        def pick(role: str) -> np.ndarray:
            return np.array([cells[r, c] for r, c in by_role.get(role, [])]).reshape(-1, 3)

        free = np.ones((GRID, GRID), bool)
        for (r, c), role in roles.items():
            free[r, c] = role == "j"   # a jaw corner is skin or background; decided below, per scene
        # Scene: from the cells no role claims.
        scene_key = min(self.bg_cost, key=lambda k: self.bg_cost[k][free & ~self._jaw_mask(by_role)].sum())
        cost = float(self.bg_cost[scene_key][free & ~self._jaw_mask(by_role)].sum())
        bg = self.backgrounds[scene_key]
        tone, _ = _fit_skin(pick("S"))
        skin = skin_colour(tone)
        cost += float(_d2(pick("S"), skin).sum())
        hair, c = _choose(pick("H"), HAIR)
        cost += c
        look: dict = {"hair": hair, "old": hair == "grey", "hat": hat}
        identity: dict = {}
        if hat:
            cost += float(_d2(pick("T"), HAT).sum())
        if "E" in by_role:
            look["eyes"], c = _choose(pick("E"), EYES)
            cost += c
        if "M" in by_role:
            smiling, c = _choose(pick("M"), {True: MOUTH[True], False: MOUTH[False]})
            look["smiling"] = bool(smiling)
            cost += c
        if "g" in by_role:
            glasses, c = _choose(pick("g"), {True: GLASSES, False: skin})
            look["glasses"] = bool(glasses)
            cost += c
        if "h" in by_role:
            identity["hairline"], c = _choose(pick("h"), {"low": HAIR[hair], "high": skin})
            cost += c
        if "k" in by_role:
            k, r = pick("k"), pick("r")
            options = {"none": float(_d2(k, skin).sum() + _d2(r, skin).sum()),
                       "left": float(_d2(k, MARK).sum() + _d2(r, skin).sum()),
                       "right": float(_d2(k, skin).sum() + _d2(r, MARK).sum())}
            identity["mark"] = min(options, key=options.get)
            cost += options[identity["mark"]]
        if "j" in by_role:
            jaw_cells = by_role["j"]
            square = sum(float(_d2(cells[r, c], skin)) for r, c in jaw_cells)
            narrow = sum(float(_d2(cells[r, c], bg[r, c])) for r, c in jaw_cells)
            identity["jaw"] = "square" if square <= narrow else "narrow"
            cost += min(square, narrow)
        if "C" in by_role:
            cost += min(float(_d2(pick("C"), colour).sum()) for colour in CLOTHES)
        if "P" in by_role:
            cost += float(_d2(pick("P"), LEGS).sum())
        identity["skin"] = tone
        top = y + int(hat)
        r0, r1 = FACE_ROWS[framing]
        c0, c1 = FACE_COLS[framing]
        reading = Reading(scene=scene_key[0], framing=framing, column=x,
                          face_box=(top + r0, x + c0, top + r1, x + c1),
                          look={k: v for k, v in look.items() if k in VISIBLE_LOOK[framing] or k == "old"},
                          identity={k: v for k, v in identity.items() if k in VISIBLE_TRAITS[framing]},
                          error=self._rms(cost))
        return cost, reading

    @staticmethod
    def _jaw_mask(by_role) -> np.ndarray:
        mask = np.zeros((GRID, GRID), bool)
        for r, c in by_role.get("j", []):
            mask[r, c] = True
        return mask


def read_cells(cells: np.ndarray) -> Reading:
    fit = _Fit(np.asarray(cells, dtype=np.float64))
    best = fit.scene_only()
    best_cost = (best.error ** 2) * GRID * GRID
    for framing in FRAMINGS:
        for hat in (False, True):
            for x, y in placements(framing, hat):
                cost, reading = fit.person(framing, hat, x, y)
                if cost < best_cost:
                    best, best_cost = reading, cost
    return best


def read(image: np.ndarray) -> Reading:
    """A picture ([H, W, 3], 0..1) → what the world says is in it."""
    return read_cells(image_to_cells(image))
