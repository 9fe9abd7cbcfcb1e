"""SeFiFaceMask inside the real host, on real photos (tests/data/faces and scikit-image's astronaut), dlib backend.

The node caches detections by image content, so each photo is detected about once in this module whatever
mask options a test asks for.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tools.dev_requirements import import_required

import_required("dlib", reason="needs dlib-bin==20.0.1.post1 (prebuilt dlib)")
import_required("cv2", reason="the face core needs opencv-python-headless")

NODE = "SeFiFaceMask"
CROP = 160
ONE_FACE = "kit_harington_2.jpg"  # 630x374, one frontal face
RGBA_PHOTO = "alex_lacamoire_2.png"  # RGBA
# dlib 68-point indices inside the face (brows 17-26, nose 27-35, eyes 36-47, mouth 48-67); the ellipse trims
# the brows' outer ends.
INNER = {"box": range(17, 68), "landmark hull": range(17, 68), "ellipse": range(27, 68)}


def _load(path, mode=None) -> torch.Tensor:
    """A photo as a ComfyUI IMAGE [1,H,W,C] float 0..1 (C = 1 for mode L, 4 for RGBA)."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert(mode) if mode else (im if im.mode in ("RGB", "RGBA") else im.convert("RGB"))
        array = np.asarray(im, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array)[None]


@pytest.fixture(scope="module")
def photos(faces_dir):
    skdata = import_required("skimage.data", reason="scikit-image ships the astronaut photo")
    astronaut = torch.from_numpy(skdata.astronaut().astype(np.float32) / 255.0)[None]
    return {
        "one": _load(faces_dir / ONE_FACE),
        "gray": _load(faces_dir / ONE_FACE, "L"),
        "rgba": _load(faces_dir / RGBA_PHOTO),
        "two": _load(faces_dir / "two_people.jpg"),
        "astronaut": astronaut,
        "blank": torch.full_like(astronaut, 0.5),
    }


def run(host, image, **options):
    args = dict(backend="dlib", which_face="largest", face_index=0, mask_shape="ellipse", grow=0, feather=0,
                crop_size=CROP, crop_margin=0.25, on_no_face="skip", insightface_pack="antelopev2")
    args.update(options)
    return host.run(NODE, image=image, **args)


@pytest.fixture(scope="module")
def one_face(photos, pack):
    """The one-face photo's face as the core detects it (68 landmarks), for checking the node's mask."""
    faces = pack.core("faces").detect_faces(photos["one"], "dlib", descriptors=False)
    assert len(faces) == 1
    return faces[0]


@contextmanager
def node_warnings(pack):
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = pack.glue("faces").log
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def inside(mask: torch.Tensor, points: np.ndarray) -> np.ndarray:
    p = np.round(points).astype(int)
    return mask.numpy()[p[:, 1], p[:, 0]] >= 0.5


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a >= 0.5, b >= 0.5
    return float((a & b).sum() / (a | b).sum())


# --------------------------------------------------------------------------------------------- registration


def test_registered_with_valid_inputs(host, pack):
    cls = host.nodes[NODE]
    faces_glue = pack.glue("faces")
    assert cls is faces_glue.SeFiFaceMask is host.pack_module.NODE_CLASS_MAPPINGS[NODE]
    assert host.pack_module.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "SeFi Face Mask"
    assert cls.CATEGORY == "SeFi-IDE" and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)
    assert cls.RETURN_TYPES == ("MASK", "IMAGE", "MASK", "INT")
    assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    inputs = cls.INPUT_TYPES()
    assert set(inputs) == {"required"}
    for name, (kind, spec) in inputs["required"].items():
        assert spec.get("tooltip"), f"{name} has no tooltip"
        if isinstance(kind, list):
            assert spec["default"] in kind, name
        elif kind in ("INT", "FLOAT"):
            assert spec["min"] <= spec["default"] <= spec["max"], name
    # the widget choices mirror the core's
    core = pack.core("faces")
    assert set(faces_glue.BACKENDS) == set(core.BACKEND_NAMES)
    assert set(faces_glue.WHICH_FACE) == set(core.SELECT_MODES)
    assert {core.normalize_mask_shape(s) for s in faces_glue.MASK_SHAPES} == set(core.MASK_SHAPES)
    assert set(faces_glue.INSIGHTFACE_PACKS) == set(core.KNOWN_PACKS)
    assert set(faces_glue.NO_FACE) == set(core.NO_FACE_MODES)


def test_insightface_folder_registered_and_extra_model_paths_reach_it(host, pack, tmp_path):
    fp, glue_host = host.folder_paths, pack.glue("host")
    default = os.path.join(fp.models_dir, "insightface")
    assert default in fp.get_folder_paths("insightface")
    assert glue_host.insightface_roots()[0] == default
    extra = tmp_path / "faces_models"
    extra.mkdir()
    yaml_file = tmp_path / "extra_model_paths.yaml"
    yaml_file.write_text(f"mine:\n  base_path: {tmp_path}\n  insightface: faces_models\n")
    if host.upstream:
        import utils.extra_config as extra_config
    else:
        from comfy.cmd import extra_model_paths as extra_config
    extra_config.load_extra_path_config(str(yaml_file))
    roots = [os.path.normpath(r) for r in glue_host.insightface_roots()]
    assert str(extra) in roots and default in roots


# --------------------------------------------------------------------------------------------- one face


def test_one_face_mask_covers_the_face_and_crop_has_the_chosen_size(host, photos, one_face):
    image = photos["one"]
    _, h, w, _ = image.shape
    masks = {}
    for shape in ("box", "ellipse", "landmark hull"):
        mask, crops, crop_masks, count = run(host, image, mask_shape=shape)
        assert count == 1
        assert mask.shape == (1, h, w) and mask.dtype == torch.float32
        assert inside(mask[0], one_face.kps).all(), f"{shape}: eyes, nose or mouth outside the mask"
        assert inside(mask[0], one_face.landmarks[list(INNER[shape])]).all(), f"{shape}: inner landmarks"
        assert 0.01 < mask.mean() < 0.5
        assert crops.shape == (1, CROP, CROP, 3) and crop_masks.shape == (1, CROP, CROP)
        assert 0.0 <= crops.min() and crops.max() <= 1.0 and crops.std() > 0.05
        assert crop_masks[0, CROP // 2, CROP // 2] > 0.5 and 0.1 < crop_masks.mean() < 0.8
        masks[shape] = mask[0]
    box, ellipse, hull = masks["box"], masks["ellipse"], masks["landmark hull"]
    assert not torch.equal(box, ellipse) and not torch.equal(box, hull) and not torch.equal(ellipse, hull)
    assert box.sum() > hull.sum() and box.sum() > ellipse.sum()
    assert ((hull > 0.5) & (box < 0.5)).sum() < 0.01 * hull.sum()  # the box bounds the hull

    auto = run(host, image, backend="auto", mask_shape="box")
    assert auto[3] == 1 and iou(auto[0][0], box) > 0.9  # no insightface pack here: auto means dlib


def test_grow_shrink_and_feather(host, photos, one_face):
    image = photos["one"]
    base = run(host, image)[0][0]
    grown = run(host, image, grow=12)[0][0]
    shrunk = run(host, image, grow=-12)[0][0]
    assert grown.sum() > base.sum() > shrunk.sum() > 0
    assert (grown[base > 0.5] > 0.5).all() and (base[shrunk > 0.5] > 0.5).all()
    assert set(base.unique().tolist()) <= {0.0, 1.0}

    feathered, _, crop_masks, _ = run(host, image, feather=10)
    soft = ((feathered > 0.05) & (feathered < 0.95)).sum()
    assert soft > 100, "feathering gave no intermediate values"
    assert inside(feathered[0], one_face.kps[2:3]).all()  # the nose stays fully masked
    assert ((crop_masks > 0.05) & (crop_masks < 0.95)).any()


def test_detection_runs_once_per_image(host, photos, pack, monkeypatch):
    cls = pack.core("faces").DlibBackend
    calls = []
    original = cls.detect

    def counting(self, image, descriptors=True):
        calls.append(image.shape)
        return original(self, image, descriptors)

    monkeypatch.setattr(cls, "detect", counting)
    mirrored = torch.flip(photos["one"], dims=[2])  # not seen before in this module
    first = run(host, mirrored, mask_shape="box")
    second = run(host, mirrored, mask_shape="landmark hull", grow=4, crop_size=64)
    assert len(calls) == 1 and first[3] == second[3] == 1


# --------------------------------------------------------------------------------------------- several faces


def test_two_people_largest_index_and_all(host, photos, pack):
    image = photos["two"]
    everyone = run(host, image, which_face="all")
    assert everyone[3] == 2
    assert everyone[1].shape == (2, CROP, CROP, 3) and everyone[2].shape == (2, CROP, CROP)

    largest = run(host, image, which_face="largest")
    assert largest[3] == 2 and largest[1].shape == (1, CROP, CROP, 3)

    left = run(host, image, which_face="index", face_index=0)[0][0]
    right = run(host, image, which_face="index", face_index=1)[0][0]
    xs = torch.arange(image.shape[2], dtype=torch.float32)
    centre = lambda m: float((m.sum(0) * xs).sum() / m.sum())  # noqa: E731
    assert centre(left) < centre(right) and iou(left, right) == 0.0
    assert torch.equal(everyone[0][0], torch.maximum(left, right))
    assert torch.equal(run(host, image, which_face="index", face_index=-1)[0][0], right)
    assert torch.equal(largest[0][0], left) or torch.equal(largest[0][0], right)

    with node_warnings(pack) as records:
        missing = run(host, image, which_face="index", face_index=5)
    assert missing[3] == 2 and missing[0].abs().sum() == 0 and missing[1].abs().sum() == 0
    assert any("index 5 is out of range" in r.getMessage() for r in records)


# --------------------------------------------------------------------------------------------- no face


def test_no_face_skip_returns_placeholders_and_warns(host, photos, pack):
    blank = photos["blank"]
    with node_warnings(pack) as records:
        mask, crops, crop_masks, count = run(host, blank)
    assert count == 0
    assert mask.shape == blank.shape[:3] and mask.abs().sum() == 0
    assert crops.shape == (1, CROP, CROP, 3) and crops.abs().sum() == 0
    assert crop_masks.shape == (1, CROP, CROP) and crop_masks.abs().sum() == 0
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "image(s) 0 of 1" in records[0].getMessage()


def test_no_face_error_names_the_image(host, photos, pack):
    batch = torch.cat([photos["astronaut"], photos["blank"]])
    with pytest.raises(RuntimeError) as caught:
        run(host, batch, on_no_face="error")
    assert isinstance(caught.value, pack.core("faces").NoFaceError)
    message = str(caught.value)
    assert "image(s) 1 of a batch of 2" in message and "on_no_face='skip'" in message


# --------------------------------------------------------------------------------------------- input formats


def test_rgba_and_grayscale_inputs(host, photos):
    rgba = photos["rgba"]
    assert rgba.shape[-1] == 4
    mask, crops, _, count = run(host, rgba)
    assert count == 1 and mask.shape == rgba.shape[:3] and crops.shape == (1, CROP, CROP, 3)

    gray = photos["gray"]
    assert gray.shape[-1] == 1
    mask, crops, _, count = run(host, gray)
    assert count == 1 and mask.shape == gray.shape[:3] and crops.shape == (1, CROP, CROP, 3)
    assert torch.allclose(crops[..., 0], crops[..., 1]) and torch.allclose(crops[..., 1], crops[..., 2])
    assert iou(mask[0], run(host, photos["one"])[0][0]) > 0.8


def test_batch_of_two_images(host, photos):
    astronaut = photos["astronaut"]
    batch = torch.cat([astronaut, torch.flip(astronaut, dims=[2])])
    mask, crops, crop_masks, count = run(host, batch)
    assert count == 2 and mask.shape == (2, 512, 512)
    assert crops.shape == (2, CROP, CROP, 3) and crop_masks.shape == (2, CROP, CROP)
    assert iou(mask[0], torch.flip(mask[1], dims=[1])) > 0.8


# --------------------------------------------------------------------------------------------- insightface


def test_insightface_without_pack_names_the_folder_to_create(host, photos):
    expected = os.path.join(host.folder_paths.models_dir, "insightface", "models", "antelopev2")
    with pytest.raises(RuntimeError) as caught:
        run(host, photos["one"], backend="insightface")
    message = str(caught.value)
    assert expected in message, message
    assert "dlib" in message  # the offline alternative


# --------------------------------------------------------------------------------------------- stock nodes


def test_outputs_feed_stock_nodes(host, photos, sd15):
    _, _, vae = sd15
    image = photos["one"]
    mask, crops, crop_masks, _ = run(host, image, crop_size=64)
    grown = host.run("GrowMask", mask=mask, expand=2, tapered_corners=True)[0]
    assert grown.shape == mask.shape and grown.sum() > mask.sum()
    as_image = host.run("MaskToImage", mask=mask)[0]
    assert as_image.shape == (*mask.shape, 3)
    scaled = host.run("ImageScale", image=crops, upscale_method="bilinear", width=96, height=96, crop="disabled")[0]
    assert scaled.shape == (1, 96, 96, 3)
    latent = host.run("VAEEncode", vae=vae, pixels=crops)[0]
    assert latent["samples"].shape[0] == 1 and torch.isfinite(latent["samples"]).all()
    masked = host.run("SetLatentNoiseMask", samples=latent, mask=crop_masks)[0]
    assert masked["noise_mask"].shape[-2:] == crop_masks.shape[-2:]
