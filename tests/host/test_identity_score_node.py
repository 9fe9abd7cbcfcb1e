"""SeFiIdentityScore inside the real host (in process, and once through a server graph), on real photos with
the dlib backend."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.dev_requirements import import_required

import_required("dlib", reason="needs dlib-bin==20.0.1.post1 (prebuilt dlib)")
import_required("cv2", reason="the face core needs opencv-python-headless")

NODE = "SeFiIdentityScore"
SIDE = 320


def _square(path) -> torch.Tensor:
    """A photo letterboxed onto a gray SIDE x SIDE square (a ComfyUI batch needs one size), as [1,H,W,3]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((SIDE, SIDE))
        canvas = Image.new("RGB", (SIDE, SIDE), (128, 128, 128))
        canvas.paste(im, ((SIDE - im.width) // 2, (SIDE - im.height) // 2))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def batches(faces_dir):
    refs = torch.cat([_square(faces_dir / n) for n in ("obama_1.jpg", "obama_2.jpg")])
    blank = torch.full((1, SIDE, SIDE, 3), 0.5)
    gen = torch.cat([_square(faces_dir / "obama_3.jpg"), _square(faces_dir / "biden_1.jpg"), blank])
    return gen, refs


def run(host, images, references, **kw):
    args = dict(backend="dlib", reference_mode="mean", text_format="table")
    args.update(kw)
    return host.run(NODE, images=images, reference_images=references, **args)


def test_registered_with_choices_in_step_with_the_core(host, pack):
    glue, ev = pack.glue("evaluation"), pack.core("eval")
    assert host.nodes[NODE] is glue.SeFiIdentityScore
    assert host.pack_module.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "SeFi Identity Score"
    assert glue.SeFiIdentityScore.CATEGORY == "SeFi-IDE"
    assert set(glue.REFERENCE_MODES) == set(ev.REFERENCE_MODES)
    assert glue.SeFiIdentityScore.RETURN_TYPES == ("IMAGE", "STRING", "FLOAT")


def test_scores_same_person_above_other_and_reports_missing_face(host, batches):
    gen, refs = batches
    table, text, mean = run(host, gen, refs, text_format="json")
    data = json.loads(text)
    same, other, blank = data["images"]
    assert data["model"].startswith("dlib_face_recognition_resnet_model_v1") and data["threshold"] == 0.6
    assert same["face_found"] and same["same_person"] and same["similarity"] > 0.6
    assert other["face_found"] and not other["same_person"] and other["similarity"] < 0.45
    assert not blank["face_found"] and blank["similarity"] is None
    assert [r["face_found"] for r in data["references"]] == [True, True]
    assert mean == pytest.approx((same["similarity"] + other["similarity"]) / 2)
    assert data["prompt_fidelity"] == {"available": False, "model": None, "reason": "no prompts given",
                                       "definition": data["prompt_fidelity"]["definition"]}
    assert table.dim() == 4 and table.shape[0] == 1 and table.shape[-1] == 3 and table.dtype == torch.float32
    assert 0.0 <= float(table.min()) and float(table.max()) <= 1.0 and table.shape[1] > 3 * 96


def test_table_text_prompts_without_clip_and_min_mode(host, batches):
    gen, refs = batches
    _, text, mean_min = run(host, gen, refs, reference_mode="min",
                            prompts="a photo of sks person\nanother man\na gray square")
    assert "image 0" in text and "mean (2/3 faces)" in text
    assert "prompt fidelity: not available (no image-text CLIP model given" in text
    _, csv_text, _ = run(host, gen, refs, text_format="csv", prompts="one prompt for all")
    assert csv_text.splitlines()[1].startswith("image 0,yes,1,") and ",one prompt for all," in csv_text
    assert 0.0 < mean_min < 1.0


def test_bad_input_errors_say_what_to_do(host, batches):
    gen, refs = batches
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        run(host, gen, refs, prompts="one\ntwo")
    with pytest.raises(ValueError, match="No face found in any of the 1 reference"):
        run(host, gen, gen[2:])
    with pytest.raises(ValueError, match="clip_weights='clip/missing.bin': no such file in ComfyUI's models folder"):
        run(host, gen, refs, prompts="x", clip_weights="clip/missing.bin")


def test_clip_weights_stay_inside_the_models_folders(host, batches, tmp_path):
    """Any path on disk was read, and the two errors told whether a file exists: now a path elsewhere is refused
    from its text, in one message for all; a file inside the models folder is taken."""
    gen, refs = batches
    readme = Path(__file__).resolve().parents[2] / "README.md"
    messages = set()
    for outside in (str(readme), "/etc/passwd", "../../../../etc/passwd", str(tmp_path / "missing.bin"), "~/x.bin",
                    "C:\\x.bin", "clip/../../README.md", "clip//x.bin"):
        with pytest.raises(ValueError) as info:
            run(host, gen, refs, prompts="x", clip_weights=outside)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    assert "clip_weights must be a path inside ComfyUI's models folder" in messages.pop()
    inside = Path(host.folder_paths.models_dir) / "clip" / "sefi-not-weights.bin"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(b"not weights")
    try:  # found and handed to open_clip: loads, or fails to load with the reason (never "elsewhere")
        text = run(host, gen, refs, prompts="x", clip_weights="clip/sefi-not-weights.bin")[1]
        assert "prompt fidelity: not available" in text
    except ValueError as err:
        assert "Could not load" in str(err) and "sefi-not-weights.bin" in str(err)
    finally:
        inside.unlink()


def test_clip_weights_without_prompts_say_they_have_no_effect(host, batches):
    """clip_weights set and no prompts: it was ignored without a word (issue 32)."""
    gen, refs = batches
    inside = Path(host.folder_paths.models_dir) / "clip" / "sefi-unused-weights.bin"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(b"never read: there are no prompts to score")
    try:
        text = run(host, gen, refs, clip_weights="clip/sefi-unused-weights.bin")[1]
    finally:
        inside.unlink()
    assert "no prompts given, so clip_weights has no effect" in text and "write them in prompts" in text
    with pytest.raises(ValueError, match="clip_weights='clip/missing.bin': no such file"):  # checked all the same
        run(host, gen, refs, clip_weights="clip/missing.bin")


def test_runs_in_a_server_graph(server, faces_dir):
    """LoadImage → SeFiIdentityScore → SaveImage through the executor (the FLOAT and STRING outputs too)."""
    inputs = server.base_dir / "input"
    inputs.mkdir(exist_ok=True)
    for name in ("obama_1.jpg", "obama_3.jpg"):
        shutil.copy(faces_dir / name, inputs / name)
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "obama_3.jpg"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "obama_1.jpg"}},
        "3": {"class_type": NODE, "inputs": {"images": ["1", 0], "reference_images": ["2", 0], "backend": "dlib",
                                             "reference_mode": "mean", "text_format": "json"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "score"}},
    }
    from batch.comfy_client import output_files
    entry = server.client.run(graph, timeout=300)
    files = output_files(entry, server.output_dir)
    assert files and files[0].is_file(), server.log()[-3000:]
    with Image.open(files[0]) as im:
        assert im.width == 720
