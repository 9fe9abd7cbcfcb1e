"""Does a training batch show one person? An identity learnt from two people's photos is neither of them.

The check uses the face backend SeFi Face Mask would use (auto: insightface when a pack is installed, else the
offline dlib backend): the largest face of every photo gets an identity descriptor and each photo is compared
with the first by the backend's own same-person threshold (sefi_core.faces.identity). Photos where no face is
found are not judged here (the face node and drop_faceless deal with those). Where no backend can run (a
platform without dlib's wheel and no insightface), the check is skipped with a log line: it guards, it is not
what makes training possible.
"""
from __future__ import annotations

import logging

from . import host

log = logging.getLogger("sefi")


def different_people(images) -> list[tuple[int, float]] | None:
    """(index, descriptor distance) of every image whose largest face is not the person of the first image with a
    face; None when no face backend can run here."""
    try:
        from ..sefi_core import faces
        backend = faces.get_backend("auto", insightface_roots=host.insightface_roots())
    except Exception as exc:  # ImportError (cv2/dlib missing) or the backend's own unavailability error
        log.warning("[SeFi] could not check that the photos show one person (no face backend: %s)", exc)
        return None
    first, found = None, []
    for i, image in enumerate(images):
        host.raise_if_interrupted()
        batch = image if image.dim() == 4 else image[None]
        faces_here = [f for f in faces.detect_faces(batch[..., :3], backend, descriptors=True)
                      if f.descriptor is not None]
        if not faces_here:
            continue
        face = max(faces_here, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        if first is None:
            first = face
        elif not faces.same_person(first, face):
            found.append((i, faces.descriptor_distance(first, face)))
    return found


def check_one_person(images, allow_multiple_people: bool) -> None:
    """Refuse a batch of several people unless the user opted in (then only log it)."""
    if len(images) < 2:
        return
    others = different_people(images)
    if not others:
        return
    listed = ", ".join(f"image {i} (distance {d:.2f})" for i, d in others)
    if allow_multiple_people:
        log.warning("[SeFi] training one identity from photos of different people, as allow_multiple_people asks: "
                    "%s differ from image 0", listed)
        return
    raise ValueError(f"the images show more than one person: {listed} is not the person in image 0 (face "
                     f"descriptors, same-person threshold of the face backend). An identity is one person: give "
                     f"photos of one person, or in SeFi Face Mask pick one face (which_face=largest or index "
                     f"instead of all); to train them into one identity anyway, set allow_multiple_people to true")
