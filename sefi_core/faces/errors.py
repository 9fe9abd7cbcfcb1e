"""Errors raised by the face core. Every message says what the user can do about it."""

from __future__ import annotations

from collections.abc import Sequence


class FaceError(RuntimeError):
    """Base class for face-processing errors a user can act on."""


class FaceBackendUnavailable(FaceError):
    """A backend's Python package or model files are missing; the message names the fix."""


class NoFaceError(FaceError):
    """Raised in ``on_no_face="error"`` mode when some images yield no (selected) face."""

    def __init__(self, image_indices: Sequence[int], batch_size: int, details: Sequence[str] = (), hint: str = ""):
        self.image_indices = list(image_indices)
        self.batch_size = batch_size
        self.details = list(details)
        which = ", ".join(str(i) for i in self.image_indices)
        message = (
            f"No face found in image(s) {which} of a batch of {batch_size} (indices start at 0)."
            + ("" if not self.details else " " + " ".join(self.details))
            + " Try: a larger or more frontal face photo, a different backend (insightface finds smaller and"
            " more turned faces than dlib's HOG detector), which_face='largest' or 'all' instead of an index that"
            " is out of range, or on_no_face='skip' to drop these images with a warning."
        )
        if hint:
            message += " " + hint
        super().__init__(message)
