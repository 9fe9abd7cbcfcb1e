"""Which of the detected faces the node acts on."""

from __future__ import annotations

from collections.abc import Sequence

from .records import Face

SELECT_MODES: tuple[str, ...] = ("largest", "index", "all")


def sort_left_to_right(faces: Sequence[Face]) -> list[Face]:
    """Faces ordered by the x of their box centre (ties: by y), the order ``index`` counts in."""
    return sorted(faces, key=lambda f: (f.center[0], f.center[1]))


def select_faces(faces: Sequence[Face], mode: str = "largest", index: int = 0) -> list[Face]:
    """Pick faces: ``largest`` (box area), ``index`` (0 = left-most by box centre; negative counts from the
    right, -1 = right-most) or ``all`` (left to right). An out-of-range index yields an empty list, so the
    caller can treat it like an image without a face.
    """
    ordered = sort_left_to_right(faces)
    if mode == "all":
        return ordered
    if not ordered:
        return []
    if mode == "largest":
        return [max(ordered, key=lambda f: f.area)]  # max keeps the first (left-most) of equal areas
    if mode == "index":
        if -len(ordered) <= index < len(ordered):
            return [ordered[index]]
        return []
    raise ValueError(f"Unknown which_face {mode!r}: use one of {', '.join(SELECT_MODES)}")
