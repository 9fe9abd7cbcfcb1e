"""What the training photos show: a face in each, one person in all of them, and — when a run is resumed — the
person of the checkpoint's photos. An identity learnt from a faceless photo learns the background; one learnt from
two people's photos is neither of them.

One pass of the face backend SeFi Face Mask would use (auto: insightface when a pack is installed, else the
offline dlib backend) looks at every photo the trainer receives, crops and raw photos alike: how many faces it
shows (faces smaller than a quarter of its largest face are background) and the identity descriptor of its
largest face. Descriptors are compared by the backend's own same-person threshold (sefi_core.faces.identity).
Where the backend cannot run or fails (a platform without dlib's wheel and no insightface, a broken install),
the person checks cannot be made, and a safety check that can vanish must fail closed: the run is refused with
the backend's error unless allow_multiple_people opts out of the checks (then logged). A photo in which a working
backend finds no face is another matter: it is dropped, or kept where its mask marks the face, and only logged
as not compared.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from . import host
from ..sefi_core.identity import hash_array

log = logging.getLogger("sefi")

BACKGROUND_FACE_AREA = 0.25
"""A face smaller than this fraction of its photo's largest face is a passer-by, not a second subject."""


@dataclass(frozen=True)
class PhotoFaces:
    """What the face backend found in one photo."""

    faces: int
    """Faces of at least BACKGROUND_FACE_AREA of the largest one (0: no face)."""
    descriptor: np.ndarray | None = None
    """The largest face's identity descriptor, None when the backend gives none."""
    kind: str | None = None
    """Its kind (sefi_core.faces.identity): descriptors of different kinds are never compared."""


@dataclass(frozen=True)
class FacesUnknown:
    """The face backend could not look at the photos (it cannot run here, or it failed): nothing is known about
    their faces, and the person checks refuse the run unless allow_multiple_people."""

    error: str
    """The backend's own error, with its advice."""


def survey(images) -> list[PhotoFaces] | FacesUnknown:
    """PhotoFaces of every image ([H, W, C] or [1, H, W, C] tensors); FacesUnknown with the backend's error when
    no face backend can run here or it fails on a photo. SeFi Face Mask's black placeholders show no face without
    asking the backend."""
    try:
        from ..sefi_core import faces
        backend = faces.get_backend("auto", insightface_roots=host.insightface_roots())
    except Exception as exc:  # ImportError (cv2/dlib missing) or the backend's own unavailability error
        return FacesUnknown(f"no face backend can run ({type(exc).__name__}: {exc})")
    found = []
    for index, image in enumerate(images):
        host.raise_if_interrupted()
        if _is_placeholder(image):
            found.append(PhotoFaces(0))
            continue
        batch = image if image.dim() == 4 else image[None]
        try:
            detected = faces.detect_faces(batch[..., :3], backend, descriptors=True)
        except Exception as exc:  # a broken model file, runtime or install: the faces are unknown, not absent
            return FacesUnknown(f"the face backend failed on image {index} ({type(exc).__name__}: {exc})")
        if not detected:
            found.append(PhotoFaces(0))
            continue
        area = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in detected]
        largest = detected[int(np.argmax(area))]
        found.append(PhotoFaces(sum(a >= BACKGROUND_FACE_AREA * max(area) for a in area), largest.descriptor,
                                largest.descriptor_kind))
    return found


def same_person(a: PhotoFaces, b: PhotoFaces) -> bool | None:
    """Whether two photos' largest faces are one person; None when they cannot be compared."""
    if a.descriptor is None or b.descriptor is None or a.kind != b.kind:
        return None
    from ..sefi_core import faces
    return faces.same_person(a.descriptor, b.descriptor, a.kind)


def distance(a: PhotoFaces, b: PhotoFaces) -> float:
    from ..sefi_core import faces
    return faces.descriptor_distance(a.descriptor, b.descriptor, a.kind)


def different_people(found: list[PhotoFaces]) -> list[tuple[int, float]]:
    """(index, descriptor distance) of every photo whose largest face is not the person of the first photo with a
    face."""
    first = next((f for f in found if f.descriptor is not None), None)
    return [(i, distance(first, f)) for i, f in enumerate(found)
            if first is not None and f is not first and same_person(first, f) is False]


CHECKS_OFF_HINT = "set allow_multiple_people to true to train without the person checks"


def check_one_person(found: list[PhotoFaces] | FacesUnknown, allow_multiple_people: bool) -> None:
    """Refuse photos of several people — across the photos, or several subjects in one photo — unless the user
    opted in (then only log it). Photos whose faces are unknown (the backend could not look) are refused the same
    way: the check fails closed."""
    if isinstance(found, FacesUnknown):
        if allow_multiple_people:
            log.warning("[SeFi] the photos' faces could not be checked (%s); training without the person checks, "
                        "as allow_multiple_people asks", found.error)
            return
        raise ValueError(f"the photos could not be checked for one person: {found.error}. These checks (one "
                         f"person in all photos, and on a resume the checkpoint's person) are not skipped "
                         f"silently: fix the face backend as the message says, or {CHECKS_OFF_HINT}")
    if not found:
        return
    groups = [(i, f.faces) for i, f in enumerate(found) if f.faces > 1]
    others = different_people(found)
    if not groups and not others:
        return
    problems = []
    if others:
        listed = ", ".join(f"image {i} (distance {d:.2f})" for i, d in others)
        problems.append(f"{listed} {'is' if len(others) == 1 else 'are'} not the person in image "
                        f"{next(i for i, f in enumerate(found) if f.descriptor is not None)}")
    if groups:
        problems.append(", ".join(f"image {i} shows {n} people" for i, n in groups))
    if allow_multiple_people:
        log.warning("[SeFi] training one identity from photos of more than one person, as allow_multiple_people "
                    "asks: %s", "; ".join(problems))
        return
    raise ValueError(f"the images show more than one person: {'; '.join(problems)} (face descriptors, same-person "
                     f"threshold of the face backend). An identity is one person: give photos of one person, or "
                     f"put SeFi Face Mask in front with which_face=largest or index (not all) to crop one face per "
                     f"photo; to train them into one identity anyway, set allow_multiple_people to true")


# --- faceless photos and their masks -----------------------------------------------------------------------------

def _is_placeholder(image: torch.Tensor) -> bool:
    """SeFi Face Mask's all-black crop for an image without a face (on_no_face=skip)."""
    return float(image[..., :3].max()) == 0.0


def drop_faceless(pics: list, masks: list | None, found: list[PhotoFaces] | FacesUnknown, name: str
                  ) -> tuple[list, list | None, list[PhotoFaces] | FacesUnknown]:
    """Drop the photos without a face — SeFi Face Mask's black placeholders, photos in which the face backend finds
    none, and photos whose mask is empty where the backend finds no face (or none can run) — each logged with its
    index and why; none left is an error. A face mask that is not empty marks the face even where the backend
    finds none (drawings, renders: its detectors know photographs). A photo the backend finds a face in but whose
    mask is empty is refused: the mask, not the photo, is wrong."""
    unknown = isinstance(found, FacesUnknown)
    why, empty_masks = {}, []
    for i, pic in enumerate(pics):
        no_face = not unknown and found[i].faces == 0
        empty_mask = masks is not None and float(masks[i].max()) == 0
        if _is_placeholder(pic):
            why[i] = "black placeholder crop (SeFi Face Mask found no face there)"
        elif empty_mask and (no_face or unknown):
            why[i] = "empty mask" + (", no face found" if no_face else "")
        elif empty_mask:
            empty_masks.append(i)
        elif no_face and masks is None:
            why[i] = "no face found"
    if empty_masks:
        raise ValueError(f"mask {', '.join(map(str, empty_masks))} (counted from 0) is all zeros although its image "
                         f"shows a face: the mask was shrunk away (SeFi Face Mask's grow too negative) or belongs "
                         f"to other images. Connect the face masks of these images, or leave mask unconnected")
    if len(why) == len(pics):
        listed = "; ".join(f"image {i}: {w}" for i, w in why.items())
        raise ValueError(f"none of the {len(pics)} image(s) shows a face ({listed}). Give photos of the person's "
                         f"face (one per image), e.g. through SeFi Face Mask")
    if why:
        log.warning("[SeFi] %s: dropped %d of %d image(s) without a face: %s", name, len(why), len(pics),
                    "; ".join(f"image {i}: {w}" for i, w in why.items()))
    keep = [i for i in range(len(pics)) if i not in why]
    return ([pics[i] for i in keep], None if masks is None else [masks[i] for i in keep],
            found if unknown else [found[i] for i in keep])


# --- what a checkpoint trained on ----------------------------------------------------------------------------------

def photo_hash(image: torch.Tensor) -> str:
    """sha256 of a photo's 8-bit RGB pixels (what the identity file lists under sefi.image_hashes)."""
    return hash_array((image[..., :3].float().cpu().numpy() * 255).round().astype(np.uint8))


def photo_records(pics: list, found: list[PhotoFaces] | FacesUnknown) -> list[dict]:
    """JSON records of the photos for a checkpoint (TrainState.photos): sha256 and face descriptor."""
    records = []
    for i, pic in enumerate(pics):
        face = PhotoFaces(1) if isinstance(found, FacesUnknown) else found[i]
        records.append({"sha256": photo_hash(pic), "kind": face.kind,
                        "descriptor": None if face.descriptor is None else [float(v) for v in face.descriptor]})
    return records


def _from_record(record: dict) -> PhotoFaces:
    descriptor = record.get("descriptor")
    return PhotoFaces(1, None if descriptor is None else np.asarray(descriptor, dtype=np.float32), record.get("kind"))


def compare_with_checkpoint(now: list[dict], before: list[dict], allow_multiple_people: bool, resume_from: str,
                            name: str) -> tuple[list[dict], dict | None]:
    """This run's photo records compared with those its checkpoint trained on. Returns the records of every photo
    the identity will have trained on (the checkpoint's, then the new ones) and, when the photos changed, the
    sha256s of both for the identity's changed_on_resume (None when they are the same), after logging what
    changed. Photos of another person than the checkpoint's are refused unless allow_multiple_people (logged)."""
    old, new = [r["sha256"] for r in before], [r["sha256"] for r in now]
    every = list(before) + [r for r in now if r["sha256"] not in old]
    if not before or set(old) == set(new):
        if not before:
            log.warning("[SeFi] %s: the checkpoint %s records no photos (an earlier version wrote it): whether these "
                        "photos show its person cannot be checked", name, resume_from)
        return every, None
    reference = next((_from_record(r) for r in before if r.get("descriptor") is not None), None)
    others, unknown, other_kind = [], [], []
    for i, record in enumerate(now):
        if record["sha256"] in old:
            continue
        face = _from_record(record)
        same = None if reference is None else same_person(reference, face)
        if same is False:
            others.append(f"image {i} (distance {distance(reference, face):.2f})")
        elif same is None and reference is not None and face.descriptor is not None:
            other_kind.append((i, face.kind))  # both faces seen, by different backends: no comparison exists
        elif same is None:
            unknown.append(i)
    if other_kind:
        listed = ", ".join(f"image {i} ({kind})" for i, kind in other_kind)
        if not allow_multiple_people:
            raise ValueError(f"resume_from={resume_from}: the new photos cannot be compared with the person the "
                             f"checkpoint was trained on: its photos were described by the {reference.kind} face "
                             f"backend, {listed} by another, and their descriptors do not compare. Resume with "
                             f"the face backend that trained it (insightface installed or not, as then), or "
                             f"{CHECKS_OFF_HINT}")
        log.warning("[SeFi] %s: resuming %s with photos that cannot be compared with its person (%s; the "
                    "checkpoint's: %s), as allow_multiple_people asks", name, resume_from, listed, reference.kind)
    if others and not allow_multiple_people:
        raise ValueError(f"resume_from={resume_from}: the photos are not of the person the checkpoint was trained "
                         f"on: {', '.join(others)} (face descriptors, same-person threshold of the face backend). "
                         f"Resume with photos of that person, or start a new run for this one (resume_from empty, "
                         f"another name); to train them into one identity anyway, set allow_multiple_people to true")
    added, dropped = [h for h in new if h not in old], [h for h in old if h not in new]
    # one verdict for the new photos, in one line: another person (allowed) / some not comparable / the same person
    verdicts = []
    if others:
        verdicts.append(f"photos of another person ({', '.join(others)}), as allow_multiple_people asks")
    if unknown:
        verdicts.append(f"images {', '.join(map(str, unknown))} could not be compared with its person (no face "
                        f"descriptor)")
    if other_kind:
        verdicts.append("photos described by another face backend (above)")
    verdict = "; ".join(verdicts) if verdicts else "they show the same person"
    (log.warning if others else log.info)(
        "[SeFi] %s: resuming %s with other photos: %d new, %d of the checkpoint's no longer given; %s", name,
        resume_from, len(added), len(dropped), verdict)
    return every, {"checkpoint": old, "now": new}
