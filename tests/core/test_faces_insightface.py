"""insightface backend: pack discovery and its error messages (temp folders with fake .onnx names), provider
choice, the adapter on a fake FaceAnalysis, the ``auto`` rule, and real inference only when a pack exists."""

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


# --------------------------------------------------------------------------------------------- adapter on a fake app


class FakeRawFace:
    """Stands in for insightface.app.common.Face (attributes, missing ones are None)."""

    def __init__(self, x0, y0, size=100.0, landmarks=True, embedding=True):
        self.bbox = np.array([x0, y0, x0 + size, y0 + size * 1.2], np.float32)
        self.det_score = np.float32(0.9)
        self.kps = np.array([[x0 + 30, y0 + 45], [x0 + 70, y0 + 45], [x0 + 50, y0 + 65],
                             [x0 + 35, y0 + 85], [x0 + 65, y0 + 85]], np.float32)
        self.landmark_2d_106 = (np.random.default_rng(0).uniform(0, size, (106, 2)) + [x0, y0]).astype(np.float32) \
            if landmarks else None
        self.embedding = np.linspace(-1, 1, 512).astype(np.float32) if embedding else None


class FakeApp:
    def __init__(self, results):
        self.results = list(results)
        self.seen = []

    def get(self, img):
        self.seen.append(img)
        return self.results.pop(0) if self.results else []


@pytest.fixture()
def fake_insightface(monkeypatch, tmp_path):
    root = tmp_path / "insightface"
    make_pack(root / "models" / "antelopev2")
    created = []

    def install(results):
        app = FakeApp(results)

        def create(root_, pack, providers, ctx_id, det_size):
            created.append((root_, pack, providers, ctx_id, det_size))
            return app

        monkeypatch.setattr(ifb, "insightface_importable", lambda: True)
        monkeypatch.setattr(ifb, "_available_providers", lambda: ["CPUExecutionProvider"])
        monkeypatch.setattr(ifb, "_create_app", create)
        monkeypatch.setattr(ifb, "_apps", {})
        return app

    return root, install, created


def test_adapter_converts_faces_and_feeds_bgr(fake_insightface):
    root, install, created = fake_insightface
    app = install([[FakeRawFace(200, 50), FakeRawFace(20, 40, landmarks=False)]])
    backend = InsightFaceBackend([root], "antelopev2", device="cuda")  # no CUDA provider -> CPU
    image = np.zeros((300, 400, 3), np.uint8)
    image[..., 0] = 255  # pure red in RGB
    faces = backend.detect(image)
    assert created == [(root, "antelopev2", ["CPUExecutionProvider"], -1, 640)]
    assert app.seen[0][0, 0].tolist() == [0, 0, 255]  # insightface got BGR
    assert len(faces) == 2 and backend.name == "insightface:antelopev2"
    first = faces[0]
    assert first.bbox == pytest.approx((200, 50, 300, 170)) and first.score == pytest.approx(0.9)
    assert first.landmarks.shape == (106, 2) and first.landmarks_kind == "insightface-106"
    assert first.descriptor.shape == (512,) and first.descriptor_kind == "insightface-arcface-512"
    assert faces[1].landmarks is None and faces[1].landmarks_kind is None


def test_adapter_drops_descriptors_on_request_and_caches_the_app(fake_insightface):
    root, install, created = fake_insightface
    install([[FakeRawFace(10, 10)], [FakeRawFace(10, 10)]])
    backend = InsightFaceBackend([root])
    assert backend.detect(np.zeros((200, 200, 3), np.uint8), descriptors=False)[0].descriptor is None
    InsightFaceBackend([root]).detect(np.zeros((200, 200, 3), np.uint8))
    assert len(created) == 1  # one FaceAnalysis per (root, pack, providers, ctx, det_size)


def test_adapter_retries_a_miss_on_a_padded_copy(fake_insightface):
    root, install, _ = fake_insightface
    app = install([[], [FakeRawFace(150, 160)]])
    faces = InsightFaceBackend([root]).detect(np.zeros((200, 400, 3), np.uint8))
    pad = round(400 * ifb.PAD_RETRY_FRACTION)
    assert app.seen[1].shape == (200 + 2 * pad, 400 + 2 * pad, 3)
    assert faces[0].bbox[:2] == pytest.approx((150 - pad, 160 - pad))
    assert faces[0].kps[0] == pytest.approx((180 - pad, 205 - pad))


def test_auto_prefers_insightface_only_when_usable(monkeypatch, tmp_path):
    root = tmp_path / "insightface"
    monkeypatch.setattr(ifb, "insightface_importable", lambda: True)
    assert resolve_backend_name("auto", [root])[0] == "dlib"  # no pack
    make_pack(root / "models" / "antelopev2")
    assert resolve_backend_name("auto", [root]) == ("insightface", "auto: insightface pack 'antelopev2' found")
    assert resolve_backend_name("auto", [root], "buffalo_l")[0] == "dlib"
    monkeypatch.setattr(ifb, "insightface_importable", lambda: False)
    assert resolve_backend_name("auto", [root])[0] == "dlib"
    assert resolve_backend_name("DLIB")[0] == "dlib"
    with pytest.raises(ValueError, match="auto, insightface, dlib"):
        resolve_backend_name("mediapipe")


def test_explicit_insightface_without_pack_raises_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(ifb, "insightface_importable", lambda: True)
    monkeypatch.setattr(ifb, "_create_app", lambda *a: pytest.fail("FaceAnalysis must not be reached"))
    with pytest.raises(FaceBackendUnavailable, match="not found"):
        get_backend("insightface", insightface_roots=[tmp_path])


# --------------------------------------------------------------------------------------------- real inference


def _real_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("SEFI_INSIGHTFACE_ROOTS", "").split(os.pathsep) if p]
    roots += [REPO / "models" / "insightface", REPO.parent / "ComfyUI" / "models" / "insightface"]
    return roots


def test_real_insightface_inference_on_the_astronaut():
    if not ifb.insightface_importable():
        pytest.skip("insightface/onnxruntime not installed (pip install insightface onnxruntime to run this)")
    pack = next((p for p in KNOWN_PACKS if find_insightface_pack(p, _real_roots())), None)
    if pack is None:
        pytest.skip(f"no insightface model pack in {', '.join(map(str, _real_roots()))} (set SEFI_INSIGHTFACE_ROOTS)")
    skimage_data = pytest.importorskip("skimage.data")
    backend = InsightFaceBackend(_real_roots(), pack)
    faces = backend.detect(skimage_data.astronaut())
    assert len(faces) == 1
    face = faces[0]
    assert face.descriptor is not None and face.descriptor.shape == (512,)
    assert abs(face.eye_angle_degrees) < 15


def test_cuda_failure_falls_back_to_cpu(fake_insightface, monkeypatch):
    root, install, created = fake_insightface
    app = install([[FakeRawFace(10, 10)]])
    calls = []

    def create(root_, pack, providers, ctx_id, det_size):
        calls.append((providers, ctx_id))
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("LoadLibrary failed with error 126")
        return app

    monkeypatch.setattr(ifb, "_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ifb, "_create_app", create)
    faces = InsightFaceBackend([root], device="cuda").detect(np.zeros((100, 100, 3), np.uint8))
    assert len(faces) == 1
    assert calls == [(["CUDAExecutionProvider", "CPUExecutionProvider"], 0), (["CPUExecutionProvider"], -1)]
