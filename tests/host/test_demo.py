"""`make demo`'s main job runs end to end on the embedded default (tiny model, bundled photo)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # make demo boots its own host
def test_demo_trains_an_identity_and_writes_a_grid(tmp_path, tiny_sd15):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tools.demo", "--tiny", "--steps", "2", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tiny random-weight SD1.5 model" in proc.stdout and "CKPT=" in proc.stdout
    for name in ("demo_identity.safetensors", "demo_grid.png", "demo_loss_curve.png", "demo_face_crop.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert str(out / name) in proc.stdout
    sys.path.append(str(REPO_ROOT))
    from sefi_core.identity import load_identity
    identity = load_identity(out / "demo_identity.safetensors")
    assert identity.trigger == "sks" and identity.stages == 5 and identity.training["steps_done"] == 2
    from PIL import Image
    with Image.open(out / "demo_grid.png") as grid:
        assert grid.size == (128, 128)  # 2 x 2 images of 64 px
