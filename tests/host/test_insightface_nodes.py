"""SeFiFaceMask and SeFiIdentityScore on the real insightface library inside the real host (in process, and
one graph through a server), with synthetic packs (tools/synthetic_insightface.py) in models/insightface.

The pack goes into the host's own models/insightface/models/<pack> for this module only: other modules expect
`auto` to mean dlib there. The server gets buffalo_l (never the default antelopev2) for the same reason."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tools import synthetic_insightface as synthetic

SKIN = (200, 150, 120)
OTHER_SKIN = (90, 160, 210)
BACKGROUND = (60, 90, 200)
SIDE = 320
CELL = (9, 8)


def scene(cell=CELL, rgb=SKIN):
    image = np.full((SIDE, SIDE, 3), BACKGROUND, np.uint8)
    return image, synthetic.paint_face(image, cell, rgb)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None]


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def installed_pack(host):
    """antelopev2 (synthetic) in the in-process host's models/insightface while this module runs."""
    folder = os.path.join(host.folder_paths.models_dir, "insightface", "models", "antelopev2")
    assert not os.path.exists(folder), f"{folder} already exists; this module installs its own pack there"
    shutil.copytree(synthetic.cached_root("antelopev2") / "models" / "antelopev2", folder)
    yield folder
    shutil.rmtree(folder)


def face_mask(host, image, **options):
    args = dict(backend="auto", which_face="largest", face_index=0, mask_shape="ellipse", grow=0, feather=0,
                crop_size=128, crop_margin=0.25, on_no_face="skip", insightface_pack="antelopev2")
    args.update(options)
    return host.run("SeFiFaceMask", image=image, **args)


def test_face_mask_node_auto_uses_the_pack_and_masks_the_synthetic_face(host, pack, installed_pack):
    image, expected = scene()
    blank = np.full_like(image, 128)
    mask, crops, crop_masks, count = face_mask(host, torch.cat([as_tensor(image), as_tensor(blank)]))
    assert count == 1 and mask.shape == (2, SIDE, SIDE) and crops.shape == (1, 128, 128, 3)
    x0, y0, x1, y1 = expected["bbox"]
    ys, xs = np.nonzero(mask[0].numpy() > 0.5)
    assert xs.mean() == pytest.approx((x0 + x1) / 2, abs=2)
    assert xs.min() >= x0 - 2 and xs.max() <= x1 + 2 and ys.max() <= y1 + 2
    assert float(mask[1].sum()) == 0.0  # the blank image: empty mask, no crop
    align = pack.core("faces.align")
    matrix = align.similarity_transform(expected["kps"], align.template_points(128, 0.25))
    centre = align.transform_points(((expected["bbox"][:2] + expected["bbox"][2:]) / 2)[None], matrix)[0]
    assert crops[0, int(centre[1]), int(centre[0])].numpy() == pytest.approx(np.array([0, 1, 0]), abs=0.02)
    assert crops[0, 8, 64].numpy() == pytest.approx(np.array(SKIN) / 255, abs=0.02)
    assert float(crop_masks[0].max()) == 1.0


def test_identity_score_node_reports_the_cosine_of_the_chosen_embeddings(host, installed_pack):
    moved, _ = scene((4, 3), SKIN)  # the reference's person, elsewhere in the frame
    other, _ = scene(CELL, OTHER_SKIN)
    reference, _ = scene(CELL, SKIN)
    blank = np.full_like(moved, 128)
    images = torch.cat([as_tensor(moved), as_tensor(other), as_tensor(blank)])
    _, text, mean = host.run("SeFiIdentityScore", images=images, reference_images=as_tensor(reference),
                             backend="auto", reference_mode="mean", text_format="json")
    data = json.loads(text)
    expected = cosine(synthetic.embedding_for(SKIN), synthetic.embedding_for(OTHER_SKIN))
    assert data["model"] == "insightface antelopev2/glintr100.onnx (ArcFace, 512-D, cosine)"
    same, different, empty = data["images"]
    assert same["similarity"] == pytest.approx(1.0, abs=1e-5) and same["same_person"]
    assert different["similarity"] == pytest.approx(expected, abs=1e-5) and not different["same_person"]
    assert not empty["face_found"]
    assert mean == pytest.approx((1.0 + expected) / 2, abs=1e-5)


def test_one_graph_through_the_server(server):
    """LoadImage → SeFiFaceMask (insightface, buffalo_l) → MaskToImage → SaveImage, and LoadImage ×2 →
    SeFiIdentityScore → SaveImage, in one prompt."""
    models = server.models_dir / "insightface" / "models" / "buffalo_l"
    shutil.copytree(synthetic.cached_root("buffalo_l") / "models" / "buffalo_l", models, dirs_exist_ok=True)
    inputs = server.base_dir / "input"
    inputs.mkdir(exist_ok=True)
    face, expected = scene(CELL, SKIN)
    other, _ = scene((4, 3), OTHER_SKIN)
    Image.fromarray(face).save(inputs / "synthetic_face.png")
    Image.fromarray(other).save(inputs / "synthetic_other.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "synthetic_face.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "synthetic_other.png"}},
        "3": {"class_type": "SeFiFaceMask", "inputs": {
            "image": ["1", 0], "backend": "insightface", "which_face": "largest", "face_index": 0,
            "mask_shape": "box", "grow": 0, "feather": 0, "crop_size": 128, "crop_margin": 0.25,
            "on_no_face": "error", "insightface_pack": "buffalo_l"}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "insightface_mask"}},
        "6": {"class_type": "SeFiIdentityScore", "inputs": {
            "images": ["2", 0], "reference_images": ["1", 0], "backend": "insightface",
            "reference_mode": "mean", "text_format": "json", "insightface_pack": "buffalo_l"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "insightface_score"}},
    }
    from batch.comfy_client import output_files

    entry = server.client.run(graph, timeout=300)
    files = {f.name.split("_0")[0]: f for f in output_files(entry, server.output_dir)}
    assert set(files) == {"insightface_mask", "insightface_score"}, server.log()[-3000:]
    with Image.open(files["insightface_mask"]) as im:
        mask = np.asarray(im.convert("L")) > 127
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = expected["bbox"]
    assert xs.min() == pytest.approx(x0, abs=2) and xs.max() == pytest.approx(x1, abs=2)
    eye_line = expected["kps"][:2, 1].mean()
    assert ys.max() == pytest.approx(y1, abs=2) and y0 - 2 <= ys.min() < eye_line - 20  # chin to forehead
    expected_similarity = cosine(synthetic.embedding_for(OTHER_SKIN), synthetic.embedding_for(SKIN))
    logged = re.findall(r"SeFi Identity Score \(insightface buffalo_l/w600k_r50\.onnx .*?\): mean similarity "
                        r"(-?[\d.]+) over 1/1 faces", server.log())
    assert logged and float(logged[-1]) == pytest.approx(expected_similarity, abs=1e-3), server.log()[-3000:]
