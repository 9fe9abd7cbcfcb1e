"""User-facing messages point the user at the node's own widgets (issue 11, point 8).

Two walks: (1) every message literal raised or logged by the glue of a node (nodes/<module>.py) and (2) the core
messages those nodes pass on, produced for real (divergence, no face, face too small, score weights, trigger). In
each, every identifier-like name the message cites (snake_case words, `name=` settings) must be an input of that
node; CLI flags and torch's "weights_only=False" advice must never reach a node's user."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

GLUE = {"train.py": ["SeFiTrainIdentity"], "train_policies.py": ["SeFiTrainIdentity"],
        "train_inputs.py": ["SeFiTrainIdentity"], "faces.py": ["SeFiFaceMask"],
        "evaluation.py": ["SeFiIdentityScore"]}
NOT_WIDGETS = {
    # folders, files, tensor keys and output names the messages may cite as such
    "sefi_identities", "clip_l", "clip_g", "my_face", "model_sampling", "face_crops", "crop_masks", "face_count",
    "file_name", "loss_curve", "open_clip",
    "loss", "diffusion", "attention", "grad_norm", "loss_scale",  # reported values (loss parts), not settings
}
# a name followed by ".ext" is a file the message names (extra_model_paths.yaml), not a setting
SNAKE = re.compile(r"(?<![\w.\-/])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?![\w/]|\.\w)")
SETTING = re.compile(r"(?<![\w.\-/])([a-z][a-z0-9_]*)=")
FORBIDDEN = [re.compile(r"(?<![\w-])--[a-z]"), re.compile(r"weights_only"), re.compile(r"\bselect=")]


def cited_names(message: str) -> set[str]:
    return {m for m in SNAKE.findall(message) + SETTING.findall(message)} - NOT_WIDGETS


def inputs_of(host, node: str) -> set[str]:
    """A node's inputs; the trainer's include those of SeFi Training Options, which carries its other settings."""
    nodes = [node, "SeFiTrainingOptions"] if node == "SeFiTrainIdentity" else [node]
    specs = [host.nodes[n].INPUT_TYPES() for n in nodes]
    return set().union(*(set(spec.get("required", {})) | set(spec.get("optional", {})) for spec in specs))


def check(host, node: str, message: str) -> None:
    unknown = cited_names(message) - inputs_of(host, node)
    assert not unknown, f"{node}: message cites {sorted(unknown)}, which are not its inputs: {message!r}"
    for bad in FORBIDDEN:
        assert not bad.search(message), f"{node}: message contains {bad.pattern!r}: {message!r}"


def _message_literals(path: Path) -> list[str]:
    """The text of every string in raise statements and log calls (f-string constant parts joined by '{}')."""
    def text(node) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        if isinstance(node, ast.BinOp):
            return text(node.left) + text(node.right)
        return ""

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        is_log = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("info", "warning", "error") and isinstance(node.func.value, ast.Name)
                  and node.func.value.id == "log")
        if isinstance(node, ast.Raise) or is_log:
            pieces = []
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Constant, ast.JoinedStr)):
                    pieces.append(text(sub))
            found.append(" ".join(p for p in pieces if p))
    return [m for m in found if m.strip()]


@pytest.mark.parametrize("module", sorted(GLUE))
def test_glue_messages_cite_only_the_nodes_widgets(host, module):
    messages = _message_literals(REPO_ROOT / "nodes" / module)
    assert messages
    node_inputs = set().union(*(inputs_of(host, n) for n in GLUE[module]))
    for message in messages:
        unknown = cited_names(message) - node_inputs
        assert not unknown, f"nodes/{module}: {sorted(unknown)} are not inputs of {GLUE[module]}: {message!r}"
        for bad in FORBIDDEN:
            assert not bad.search(message), f"nodes/{module}: {bad.pattern!r} in {message!r}"


def test_divergence_message_names_the_trainer_widgets(host, pack):
    tr = pack.core("training")
    for precision in ("bf16", "fp32"):
        settings = tr.TrainSettings(precision=precision, lr=5e-3)
        msg = str(tr.TrainingDivergedError(3, 10, float("nan"), {"diffusion": 1.0}, "the loss is not finite",
                                           settings, 2))
        check(host, "SeFiTrainIdentity", msg)
        assert "learning_rate (now 0.005)" in msg
        assert ("precision fp32 (now bf16)" in msg) == (precision == "bf16")
        assert "fp32 instead of fp32" not in msg and "fp32 (now fp32)" not in msg


def test_face_messages_name_the_face_node_widgets(host, pack, face_photo):
    faces = pack.core("faces")
    msg = str(faces.NoFaceError([0], 1, ["image 0: no face detected."]))
    check(host, "SeFiFaceMask", msg)
    assert "which_face='largest' or 'all'" in msg and "on_no_face='skip'" in msg
    with pytest.raises(ValueError) as info:
        faces.FaceMaskOptions(select="biggest")
    check(host, "SeFiFaceMask", str(info.value))
    tiny = face_photo("obama_1.jpg", 16)
    with pytest.raises(faces.NoFaceError) as info:
        host.run("SeFiFaceMask", image=tiny, backend="dlib", which_face="largest", face_index=0,
                 mask_shape="ellipse", grow=0, feather=0, crop_size=64, crop_margin=0.25, on_no_face="error",
                 insightface_pack="antelopev2")
    msg = str(info.value)
    check(host, "SeFiFaceMask", msg)
    assert "face too small: at least 20 px" in msg and "no face detected" not in msg


def test_score_messages_never_cite_cli_flags_nor_torch_advice(host, pack, tmp_path):
    prompt_fidelity = pack.core("eval.prompt_fidelity")
    refs = torch.full((1, 64, 64, 3), 0.5)
    with pytest.raises(ValueError) as info:
        host.run("SeFiIdentityScore", images=refs, reference_images=refs, backend="dlib", reference_mode="mean",
                 text_format="table", prompts="x", clip_weights="clip/missing.bin")
    msg = str(info.value)
    check(host, "SeFiIdentityScore", msg)
    assert "clip_weights" in msg and "clip_model" in msg
    # torch's own refusal of a pickle carries "re-run with weights_only=False" advice: it must not be passed on
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": np.dtype("float32")}, pickled)
    with pytest.raises(Exception) as info:
        torch.load(pickled, weights_only=True)
    assert "weights_only" in str(info.value)
    reason = prompt_fidelity._load_failure(info.value)
    assert "weights_only" not in reason and "False" not in reason and "trust" in reason


def test_trigger_error_quotes_a_short_excerpt(pack):
    tokens = pack.core("tokens")
    long_prompt = "a photo of a person, " * 300 + "SKS in a garden, " + "highly detailed, " * 300
    with pytest.raises(ValueError) as info:
        tokens.plan_placeholders(long_prompt, {"sks": 1})
    msg = str(info.value)
    assert len(msg) < 300 and "SKS in a garden" in msg
    with pytest.raises(ValueError) as info:
        tokens.plan_placeholders("x" * 5000, {"sks": 1})
    assert len(str(info.value)) < 300
