"""Write synthetic insightface model packs (antelopev2, buffalo_l): the real packs' file names and ONNX
input/output signatures, with fixed weights whose answers are known in advance.

The real packs cannot be downloaded here, but a pack is only ONNX files that insightface's model zoo routes by
signature (insightface/model_zoo/model_zoo.py): >= 5 outputs is an SCRFD detector, a 192x192 input a landmark
model (212 outputs: 106 2-D points; 3309: 68 3-D points), 96x96 an attribute model (3 outputs: gender/age), a
square input >= 112 a recogniser. These files follow those signatures, so FaceAnalysis loads and runs them with
its own pre- and post-processing. What they compute:

- Detector (SCRFD, 9 outputs: score/bbox/kps at strides 8/16/32, 2 anchors per place): it finds *beacons*.
  A beacon is a pure-green square filling one stride-32 cell of the detector's 640x640 input. The cell's
  anchor scores ~1 and reports a fixed face around the beacon: box 160x192 centred on it and five points that
  map onto ArcFace's template at 1.5x (see :func:`expected_face`). Everything else scores 0, so an image
  without a beacon has no face.
- Recogniser (112x112 -> 512): the embedding is ``W @ c + b``, ``c`` the mean colour of the aligned crop's
  top 16 rows (the forehead) normalised as insightface feeds it; a face painted with :func:`paint_face` in
  colour ``rgb`` therefore embeds as :func:`embedding_for` ``(rgb)``.
- 106-point landmarks: a fixed outline relative to the detector box (lower half of its inscribed ellipse for
  the jaw, the rest on an inner ellipse). 68-point 3-D landmarks and gender/age are constants (age 31).

Usage: python -m tools.synthetic_insightface ROOT [--pack antelopev2|buffalo_l|all]
(writes ROOT/models/<pack>/*.onnx; ROOT is what FaceAnalysis gets as root=, ComfyUI's models/insightface).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "insightface"

#: The real packs' file names per role.
PACK_FILES: dict[str, dict[str, str]] = {
    "antelopev2": {"detector": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx",
                   "landmark_2d_106": "2d106det.onnx", "landmark_3d_68": "1k3d68.onnx",
                   "genderage": "genderage.onnx"},
    "buffalo_l": {"detector": "det_10g.onnx", "recognition": "w600k_r50.onnx",
                  "landmark_2d_106": "2d106det.onnx", "landmark_3d_68": "1k3d68.onnx",
                  "genderage": "genderage.onnx"},
}

OPSET = 13  # ReduceMean still takes axes as an attribute; old and new onnxruntime load it
IR_VERSION = 8
DET_INPUT = 640  # the detector's input side (the backend prepares FaceAnalysis with det_size 640)
STRIDES = (8, 16, 32)
BEACON_STRIDE = 32  # only this level fires: one anchor per beacon
BEACON_RGB = (0, 255, 0)
#: Score = sigmoid(GAIN * (greenness - THRESHOLD)); a full beacon cell has greenness ~1.99, a half-covered
#: one ~1.0, any non-green colour <= 1.0.
GAIN, THRESHOLD = 20.0, 1.5
#: Face box around the beacon centre, in detector pixels: half width, half height.
BOX_HALF = (80.0, 96.0)
#: The five points are ArcFace's 112x112 template scaled by this about the beacon centre.
KPS_SCALE = 1.5
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
FOREHEAD_ROWS = 16  # rows of the 112x112 aligned crop the recogniser averages
EMBEDDING_SIZE = 512
AGE = 31


# --------------------------------------------------------------------------------------------- the known answers


def recognition_weights() -> tuple[np.ndarray, np.ndarray]:
    """``(W [3, 512], b [512])`` of the recogniser (fixed seed)."""
    rng = np.random.default_rng(20240616)
    weights = rng.normal(size=(3, EMBEDDING_SIZE))
    # a small bias: the angle between two embeddings then follows the angle between the colours, so different
    # skins score as different people (cosine below ArcFace's 0.4) and equal skins as the same (1.0)
    bias = 0.05 * rng.normal(size=EMBEDDING_SIZE)
    return weights.astype(np.float32), bias.astype(np.float32)


def embedding_for(rgb: tuple[int, int, int]) -> np.ndarray:
    """The embedding of a face painted in ``rgb`` (uint8 values): insightface feeds (v - 127.5) / 127.5."""
    weights, bias = recognition_weights()
    colour = (np.asarray(rgb, dtype=np.float64) - 127.5) / 127.5
    return (colour @ weights.astype(np.float64) + bias).astype(np.float32)


def det_scale(height: int, width: int) -> float:
    """How insightface's SCRFD scales an image into its square input (letterboxed at the top left)."""
    if height > width:
        return DET_INPUT / height
    return int(DET_INPUT * (height / width)) / height


def expected_face(image_shape: tuple[int, ...], cell: tuple[int, int]) -> dict[str, np.ndarray]:
    """Box ``[x0, y0, x1, y1]`` and five points ``[5, 2]`` (image pixels) the detector reports for a beacon in
    stride-32 cell ``(column, row)`` of its input."""
    scale = det_scale(image_shape[0], image_shape[1])
    centre = (np.asarray(cell, dtype=np.float64) + 0.5) * BEACON_STRIDE
    half = np.asarray(BOX_HALF)
    box = np.concatenate([centre - half, centre + half]) / scale
    kps = (centre + (ARCFACE_TEMPLATE - 56.0) * KPS_SCALE) / scale
    return {"bbox": box, "kps": kps}


def paint_face(image: np.ndarray, cell: tuple[int, int], rgb: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Paint a face the detector finds into ``image`` ([H, W, 3] uint8 RGB, changed in place): a square of
    ``rgb`` covering the face box and the aligned crop, with the beacon in stride-32 cell ``cell`` of the
    detector input. Returns :func:`expected_face`. The image side should make 32 detector pixels a whole
    number of image pixels (e.g. 640, 320 or 160 for a square image)."""
    scale = det_scale(image.shape[0], image.shape[1])
    x0, y0 = (np.asarray(cell) * BEACON_STRIDE / scale).round().astype(int)
    side = int(round(BEACON_STRIDE / scale))
    reach = int(round((BOX_HALF[1] + BEACON_STRIDE / 2) / scale))  # covers the box and the 1.5x crop
    cx, cy = x0 + side // 2, y0 + side // 2
    image[max(cy - reach, 0):cy + reach, max(cx - reach, 0):cx + reach] = rgb
    image[y0:y0 + side, x0:x0 + side] = BEACON_RGB
    return expected_face(image.shape, cell)


def landmarks_106_normalised() -> np.ndarray:
    """The 106 points the landmark model outputs, in its crop's [-1, 1] coordinates ([106, 2])."""
    # FaceAnalysis crops the landmark input around the box centre with half side 1.5 * max(w, h) / 2.
    half_crop = 1.5 * 2 * max(BOX_HALF) / 2
    rx, ry = BOX_HALF[0] / half_crop, BOX_HALF[1] / half_crop
    jaw = np.linspace(0.0, np.pi, 33)  # 33 contour points, the lower half of the box's inscribed ellipse
    inner = np.linspace(0.0, 2 * np.pi, 106 - 33, endpoint=False)
    points = np.concatenate([
        np.stack([rx * np.cos(jaw), ry * np.sin(jaw)], axis=1),
        np.stack([0.5 * rx * np.cos(inner), 0.5 * ry * np.sin(inner)], axis=1),
    ])
    return points.astype(np.float32)


def expected_landmarks_106(bbox: np.ndarray) -> np.ndarray:
    """Where FaceAnalysis puts the 106 points for a detector box (image pixels)."""
    bbox = np.asarray(bbox, dtype=np.float64)
    centre = (bbox[:2] + bbox[2:]) / 2
    half_crop = 1.5 * float(max(bbox[2] - bbox[0], bbox[3] - bbox[1])) / 2
    return centre + landmarks_106_normalised().astype(np.float64) * half_crop


# --------------------------------------------------------------------------------------------- ONNX graphs


def _onnx():
    import onnx  # the builder's only dependency beyond numpy (requirements-dev.txt)
    return onnx


def _model(nodes, inputs, outputs, initializers, name: str):
    onnx = _onnx()
    graph = onnx.helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="sefi-synthetic-insightface")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _tensor(name: str, array: np.ndarray):
    return _onnx().numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _ints(name: str, values) -> object:
    return _onnx().numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def detector_model():
    """SCRFD signature: input [1, 3, H, W], outputs score_s [N, 1], bbox_s [N, 4], kps_s [N, 10] for s in
    8/16/32, in that order (how SCRFD reads them: scores, then boxes, then points)."""
    onnx = _onnx()
    helper = onnx.helper
    floats = onnx.TensorProto.FLOAT
    nodes, inits = [], []
    # Greenness of each pixel on insightface's normalised RGB input: G - (R + B) / 2.
    inits.append(_tensor("green_w", np.array([-0.5, 1.0, -0.5]).reshape(1, 3, 1, 1)))
    nodes.append(helper.make_node("Conv", ["input.1", "green_w"], ["green"], name="greenness"))
    anchor = np.array([0.5, 0.5]) * BEACON_STRIDE  # beacon centre relative to its anchor (the cell corner)
    half = np.asarray(BOX_HALF)
    box = np.concatenate([half - anchor, half + anchor]) / BEACON_STRIDE  # left, top, right, bottom distances
    kps = ((ARCFACE_TEMPLATE - 56.0) * KPS_SCALE + anchor).reshape(-1) / BEACON_STRIDE
    outputs = {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        pooled = f"pooled_{stride}"
        nodes.append(helper.make_node("AveragePool", ["green"], [pooled], name=f"cells_{stride}",
                                      kernel_shape=[stride, stride], strides=[stride, stride]))
        fires = stride == BEACON_STRIDE
        heads = {  # per head: (weights, bias) of a 1x1 conv on the pooled greenness, 2 anchors per place
            "score": (np.array([GAIN if fires else 0.0, 0.0]),
                      np.array([-GAIN * THRESHOLD if fires else -30.0, -30.0])),
            "bbox": (np.zeros(8), np.tile(box, 2)),
            "kps": (np.zeros(20), np.tile(kps, 2)),
        }
        for head, (weight, bias) in heads.items():
            width = len(bias) // 2
            stem = f"{head}_{stride}"
            inits += [_tensor(f"{stem}_w", weight.reshape(-1, 1, 1, 1)), _tensor(f"{stem}_b", bias),
                      _ints(f"{stem}_shape", [-1, width])]
            raw = f"{stem}_conv"
            nodes.append(helper.make_node("Conv", [pooled, f"{stem}_w", f"{stem}_b"], [raw], name=f"{stem}_head"))
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [raw], [f"{stem}_prob"], name=f"{stem}_sigmoid"))
                raw = f"{stem}_prob"
            nodes.append(helper.make_node("Transpose", [raw], [f"{stem}_nhwc"], name=f"{stem}_nhwc",
                                          perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Reshape", [f"{stem}_nhwc", f"{stem}_shape"], [stem], name=f"{stem}_rows"))
            outputs[head].append(helper.make_tensor_value_info(stem, floats, [f"anchors_{stride}", width]))
    inputs = [helper.make_tensor_value_info("input.1", floats, [1, 3, "height", "width"])]
    return _model(nodes, inputs, outputs["score"] + outputs["bbox"] + outputs["kps"], inits, "scrfd_synthetic")


def recognition_model():
    """ArcFace signature: input [N, 3, 112, 112], output [N, 512] = W^T (mean RGB of the top rows) + b."""
    onnx = _onnx()
    helper = onnx.helper
    floats = onnx.TensorProto.FLOAT
    weights, bias = recognition_weights()
    inits = [_ints("rows_start", [0]), _ints("rows_end", [FOREHEAD_ROWS]), _ints("rows_axis", [2]),
             _tensor("project_w", weights), _tensor("project_b", bias)]
    nodes = [
        helper.make_node("Slice", ["input.1", "rows_start", "rows_end", "rows_axis"], ["forehead"], name="forehead"),
        helper.make_node("ReduceMean", ["forehead"], ["colour4d"], name="colour", axes=[2, 3], keepdims=1),
        helper.make_node("Flatten", ["colour4d"], ["colour"], name="flatten", axis=1),
        helper.make_node("Gemm", ["colour", "project_w", "project_b"], ["683"], name="project"),
    ]
    inputs = [helper.make_tensor_value_info("input.1", floats, ["batch", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("683", floats, ["batch", EMBEDDING_SIZE])]
    return _model(nodes, inputs, outputs, inits, "arcface_synthetic")


def constant_model(side: int, values: np.ndarray, name: str):
    """Input [N, 3, side, side], output [N, len(values)]: the constant ``values`` (the input is read, times 0,
    so the graph has a real data path)."""
    onnx = _onnx()
    helper = onnx.helper
    floats = onnx.TensorProto.FLOAT
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    inits = [_tensor("zero_w", np.zeros((1, values.size))), _tensor("values", values)]
    nodes = [
        helper.make_node("ReduceMean", ["data"], ["level4d"], name="level", axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["level4d"], ["level"], name="flatten", axis=1),
        helper.make_node("Gemm", ["level", "zero_w", "values"], ["fc1"], name="constant"),
    ]
    inputs = [helper.make_tensor_value_info("data", floats, ["batch", 3, side, side])]
    outputs = [helper.make_tensor_value_info("fc1", floats, ["batch", values.size])]
    return _model(nodes, inputs, outputs, inits, name)


def _landmarks_3d_68() -> np.ndarray:
    # 1k3d68 outputs 1103 3-D points of which FaceAnalysis keeps the last 68; put the 106 model's jaw and a
    # flat face there so pose estimation (if a caller enables it) sees a plausible shape.
    points = np.zeros((1103, 3), dtype=np.float32)
    points[-68:, :2] = landmarks_106_normalised()[:68]
    return points


def pack_models(pack: str) -> dict[str, object]:
    """File name -> ONNX model of one synthetic pack."""
    files = PACK_FILES[pack]
    return {
        files["detector"]: detector_model(),
        files["recognition"]: recognition_model(),
        files["landmark_2d_106"]: constant_model(192, landmarks_106_normalised(), "landmark_106_synthetic"),
        files["landmark_3d_68"]: constant_model(192, _landmarks_3d_68(), "landmark_3d_68_synthetic"),
        # gender scores (female, male), then age / 100
        files["genderage"]: constant_model(96, np.array([0.2, 0.8, AGE / 100.0]), "genderage_synthetic"),
    }


def build_pack(root: str | Path, pack: str = "antelopev2") -> Path:
    """Write ``root/models/<pack>/*.onnx`` (each file atomically) and return that folder."""
    from sefi_core.atomic import atomic_write_bytes

    folder = Path(root) / "models" / pack
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in pack_models(pack).items():
        atomic_write_bytes(folder / name, model.SerializeToString())
    return folder


def cached_root(pack: str, cache: str | Path = DEFAULT_CACHE) -> Path:
    """A root holding only a synthetic ``pack``, under ``cache`` (built on first use; the builder's own source
    is part of the key, so an edited builder writes a fresh pack)."""
    import hashlib

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    root = Path(cache) / digest / pack
    if not all((root / "models" / pack / name).is_file() for name in PACK_FILES[pack].values()):
        build_pack(root, pack)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="insightface root to write into (e.g. models/insightface)")
    parser.add_argument("--pack", choices=[*PACK_FILES, "all"], default="antelopev2")
    args = parser.parse_args(argv)
    for pack in (list(PACK_FILES) if args.pack == "all" else [args.pack]):
        print(f"{pack}: {build_pack(args.root, pack)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
