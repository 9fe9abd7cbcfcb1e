"""The third world's reader: any picture back to its scene and the people in it (none, one, or two side by side),
each with framing, view, place, worded look and the wordless traits that view shows — and how well it fits.

The picture is averaged to its cells. Every way one person can stand (framing, view, hat, column) is fitted once:
each role takes the nearest of its allowed colours (one skin tone along the skin line, one hair colour for all hair
cells, …). A configuration — nobody, one person, two side by side in one framing — costs its people's fits plus the
background cells it leaves, fitted to one scene; the least squared error wins. `Reading.error` is the winning fit's
root mean squared colour error per cell; a picture whose error is above REJECT_THRESHOLD is `rejected`: it shows
nothing the world can draw, and scores 0 (world/third/score.py). The threshold is calibrated on rendered pictures
with colour noise of CALIBRATION_NOISE per channel and cell (`calibrate_threshold`; a test recomputes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..read import image_to_cells as second_world_cells
from ..render import CLOTHES, EYES, GLASSES, HAIR, HAT, LEGS, MARK, MOUTH, SCENES, SKIN_DARK, SKIN_LIGHT, Look
from .render import (FRAMING_LAYOUT, FRAMINGS, GRID, TINTS, Identity, Person, background, face_box, pair_columns,
                     person_roles, single_placements, visible_look, visible_traits)

CALIBRATION_NOISE = 0.08     # twice the noise the reader must read through exactly (tests: σ 0.04)
CALIBRATION_SEED = 4
CALIBRATION_PICTURES = 200
REJECT_THRESHOLD = 0.1465    # calibrate_threshold(): the 99th percentile of rendered pictures' error at that noise


@dataclass
class PersonReading:
    framing: str
    view: str
    column: int
    face_box: tuple[int, int, int, int]
    look: dict = field(default_factory=dict)       # the worded looks the view shows, and old
    identity: dict = field(default_factory=dict)   # the wordless traits the view shows (render.visible_traits)


@dataclass
class Reading:
    scene: str
    people: list[PersonReading] = field(default_factory=list)   # left to right
    error: float = 0.0        # RMS colour error per cell of the winning fit
    rejected: bool = False    # error above REJECT_THRESHOLD: nothing here the world can draw

    @property
    def person(self) -> bool:
        return bool(self.people)

    @property
    def first(self) -> PersonReading | None:
        return self.people[0] if self.people else None


def image_to_cells(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] in 0..1 (H and W multiples of GRID) → [GRID, GRID, 3] cell means."""
    return second_world_cells(image, GRID)


def _d2(cells: np.ndarray, colour) -> np.ndarray:
    return ((cells - np.asarray(colour, dtype=np.float64)) ** 2).sum(axis=-1)


def _option_costs(colours: np.ndarray, options: np.ndarray) -> np.ndarray:
    """Summed squared error of cells [X, n, 3] (one row per column the block may stand at) against each option colour
    [k, 3] → [X, k]."""
    return ((colours[:, :, None, :] - options[None, None, :, :]) ** 2).sum(axis=(1, 3))


def _options(table) -> tuple[list, np.ndarray]:
    keys = list(table)
    return keys, np.array([table[k] for k in keys], dtype=np.float64)


_HAIR = _options(HAIR)
_EYES = _options(EYES)
_MOUTH = _options({True: MOUTH[True], False: MOUTH[False]})
_TINT = _options(dict(enumerate(TINTS)))
_CLOTHES = np.array(CLOTHES, dtype=np.float64)
_SKIN_AXIS = SKIN_DARK - SKIN_LIGHT


def _choose(colours: np.ndarray, options: tuple[list, np.ndarray]) -> tuple[list, np.ndarray]:
    costs = _option_costs(colours, options[1])
    best = costs.argmin(axis=1)
    return [options[0][i] for i in best], costs[np.arange(len(best)), best]


def _against(colours: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Summed squared error of cells [X, n, 3] against one colour per column [X, 3] (or one colour [3]) → [X]."""
    colour = np.asarray(colour, dtype=np.float64)
    if colour.ndim == 1:
        colour = colour[None]
    return ((colours - colour[:, None, :]) ** 2).sum(axis=(1, 2))


@dataclass
class _Fit:
    cost: float                      # squared error over the cells the person claims (not their '.' cells)
    claimed: np.ndarray              # [GRID, GRID] bool
    reading: PersonReading


@lru_cache(maxsize=None)
def _template(framing: str, view: str, hat: bool) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """role → (rows, columns) of a block of this framing, view and hat standing at column 0; and its top row."""
    y = next(y for _, y in single_placements(framing, hat))
    cells: dict[str, list[tuple[int, int]]] = {}
    for cell, role in person_roles(_dummy(framing, view, hat, 0, y)).items():
        if role != ".":
            cells.setdefault(role, []).append(cell)
    return {role: (np.array([r for r, _ in cs]), np.array([c for _, c in cs])) for role, cs in cells.items()}, y


def _dummy(framing: str, view: str, hat: bool, x: int, y: int) -> Person:
    return Person(identity=Identity(0.0, 0, 0, 0, "none"), look=Look("black", "blue", False, hat, False, False),
                  framing=framing, view=view, x=x, y=y, clothes=0)


def _fit_template(cells: np.ndarray, framing: str, view: str, hat: bool) -> list[_Fit]:
    """The fits of one framing, view and hat at every column its block fits, left to right (vectorised over the
    columns: the same roles at each)."""
    roles, y = _template(framing, view, hat)
    xs = np.arange(GRID - FRAMING_LAYOUT[framing].block_width + 1)

    def pick(role: str) -> np.ndarray:
        rows, cols = roles[role]
        return cells[rows[None, :], cols[None, :] + xs[:, None]]          # [X, n, 3]

    skin_cells = pick("S")
    tone = np.clip(((skin_cells - SKIN_LIGHT) @ _SKIN_AXIS).mean(axis=1) / (_SKIN_AXIS @ _SKIN_AXIS), 0.0, 1.0)
    skin = (1.0 - tone)[:, None] * SKIN_LIGHT + tone[:, None] * SKIN_DARK   # [X, 3]: skin_colour per column
    cost = _against(skin_cells, skin)
    hair, c = _choose(pick("H"), _HAIR)
    cost = cost + c
    looks: dict[str, list] = {"hair": hair, "old": [h == "grey" for h in hair], "hat": [hat] * len(xs)}
    traits: dict[str, list] = {"skin": [float(t) for t in tone]}
    if hat:
        cost = cost + _against(pick("T"), HAT)
    if "E" in roles:
        looks["eyes"], c = _choose(pick("E"), _EYES)
        cost = cost + c
    if "M" in roles:
        looks["smiling"], c = _choose(pick("M"), _MOUTH)
        cost = cost + c
    if "g" in roles:
        on, off = _against(pick("g"), GLASSES), _against(pick("g"), skin)
        looks["glasses"] = [bool(v) for v in on < off]
        cost = cost + np.minimum(on, off)
    for trait, role in (("brow", "B"), ("nose", "N"), ("ear", "A")):
        if role in roles:
            traits[trait], c = _choose(pick(role), _TINT)
            cost = cost + c
    if "R" in roles and "L" in roles:
        right, left = pick("R"), pick("L")
        options = np.stack([_against(right, skin) + _against(left, skin), _against(right, skin) + _against(left, MARK),
                            _against(right, MARK) + _against(left, skin)], axis=1)   # none, left, right
        best = options.argmin(axis=1)
        traits["mark"] = [("none", "left", "right")[i] for i in best]
        cost = cost + options.min(axis=1)
    elif "R" in roles or "L" in roles:
        side = "left" if "L" in roles else "right"
        shown_cells = pick(side[0].upper())
        marked, plain = _against(shown_cells, MARK), _against(shown_cells, skin)
        traits[f"mark_{side}"] = [bool(v) for v in marked < plain]
        cost = cost + np.minimum(marked, plain)
    if "C" in roles:
        cost = cost + _option_costs(pick("C"), _CLOTHES).min(axis=1)
    if "P" in roles:
        cost = cost + _against(pick("P"), LEGS)
    shown_look = set(visible_look(framing, view)) | {"old"}
    shown_traits = set(visible_traits(framing, view))
    fits = []
    for i, x in enumerate(xs):
        claimed = np.zeros((GRID, GRID), bool)
        for rows, cols in roles.values():
            claimed[rows, cols + x] = True
        reading = PersonReading(
            framing=framing, view=view, column=int(x), face_box=face_box(_dummy(framing, view, hat, int(x), y)),
            look={k: (bool(v[i]) if k != "hair" and k != "eyes" else v[i]) for k, v in looks.items()
                  if k in shown_look},
            identity={k: v[i] for k, v in traits.items() if k in shown_traits})
        fits.append(_Fit(float(cost[i]), claimed, reading))
    return fits


def _hypotheses(cells: np.ndarray) -> dict[tuple[str, int], list[_Fit]]:
    """(framing, column) → the fits of every view and hat there, at every column a block of that framing fits."""
    fits: dict[tuple[str, int], list[_Fit]] = {}
    for framing in FRAMINGS:
        for hat in (False, True):
            for view in FRAMING_LAYOUT[framing].views:
                for fit in _fit_template(cells, framing, view, hat):
                    fits.setdefault((framing, fit.reading.column), []).append(fit)
    return fits


def read_cells(cells: np.ndarray) -> Reading:
    cells = np.asarray(cells, dtype=np.float64)
    scenes = list(SCENES)
    bg_cost = np.stack([_d2(cells, background(s)) for s in scenes])          # [S, G, G]
    bg_total = bg_cost.sum(axis=(1, 2))
    fits = _hypotheses(cells)
    # delta[(framing, x)][i, s]: fit i there, in scene s, minus the background it replaces; the best fit per scene.
    best: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for key, options in fits.items():
        claimed = np.stack([f.claimed for f in options])                      # [F, G, G]
        delta = np.array([f.cost for f in options])[:, None] - np.einsum("fgh,sgh->fs", claimed, bg_cost)
        best[key] = (delta.min(axis=0), delta.argmin(axis=0))
    candidates = []   # (cost, scene index, [(key, fit index)])
    for s in range(len(scenes)):
        candidates.append((bg_total[s], s, []))
    for framing in FRAMINGS:
        for x in sorted({x for hat in (False, True) for x, _ in single_placements(framing, hat)}):
            d, i = best[(framing, x)]
            for s in range(len(scenes)):
                candidates.append((bg_total[s] + d[s], s, [((framing, x), int(i[s]))]))
        for a, b in pair_columns(framing):
            (da, ia), (db, ib) = best[(framing, a)], best[(framing, b)]
            for s in range(len(scenes)):
                candidates.append((bg_total[s] + da[s] + db[s], s,
                                   [((framing, a), int(ia[s])), ((framing, b), int(ib[s]))]))
    cost, s, chosen = min(candidates, key=lambda c: c[0])
    error = float(np.sqrt(max(cost, 0.0) / (GRID * GRID)))
    people = [fits[key][i].reading for key, i in chosen]
    return Reading(scene=scenes[s], people=people, error=error, rejected=error > REJECT_THRESHOLD)


def read(image: np.ndarray) -> Reading:
    """A picture ([H, W, 3], 0..1) → what the third world says is in it."""
    return read_cells(image_to_cells(image))


def calibrate_threshold(pictures: int = CALIBRATION_PICTURES, noise: float = CALIBRATION_NOISE,
                        seed: int = CALIBRATION_SEED, quantile: float = 0.99) -> float:
    """The reject threshold: the `quantile` of the fit error over random rendered pictures with Gaussian colour
    noise `noise` per channel and cell (clipped to 0..1 like a decoded picture)."""
    from .captions import random_facts
    from .render import render_cells
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(pictures):
        cells = render_cells(random_facts(rng))
        noisy = np.clip(cells + rng.normal(0.0, noise, cells.shape), 0.0, 1.0)
        errors.append(read_cells(noisy).error)
    return float(np.quantile(errors, quantile))
