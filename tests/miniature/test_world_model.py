"""The shipped world checkpoint draws what plain prompts ask (a reduced gate), and `make demo` runs on it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from world.captions import Request
from world.gates import SAMPLER, rates, sample
from world.render import SCENES

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_plain_prompts_pass_a_reduced_gate(host, world_sd15):
    """Fourteen prompts, two per scene: a broken file, loader, VAE or text encoder draws the wrong scenes.
    (The full gates, 200 prompts: `python -m world gates`, figures in docs/world.md.)"""
    requests = [Request(scene=s, framing="head-and-shoulders") for s in SCENES] + \
        [Request(scene=s, person=False) for s in SCENES]
    results = sample(host, world_sd15.name, requests, seed=1, sampler={**SAMPLER, "steps": 12}, batch=len(requests))
    table = rates(results)
    assert table["scene"][0] >= 0.8, [(r.prompt, r.reading.scene) for r in results]
    assert table["person"][0] >= 0.75, [(r.prompt, r.reading.framing) for r in results]


@pytest.mark.slow  # make demo boots its own host
def test_demo_runs_on_the_world_by_default(tmp_path, world_sd15):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tools.demo", "--steps", "2", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Miniature world" in proc.stdout and "CKPT=" in proc.stdout and "held-out person" in proc.stdout
    for name in ("world_demo.safetensors", "demo_grid.png", "demo_loss_curve.png"):
        assert (out / name).is_file() and str(out / name) in proc.stdout, name
    rows = [line for line in proc.stdout.splitlines() if line.startswith("a ") and line.rstrip().endswith("%")]
    assert len(rows) == 4, proc.stdout[-2000:]
    sys.path.append(str(REPO_ROOT))
    from sefi_core.identity import load_identity
    identity = load_identity(out / "world_demo.safetensors")
    assert identity.trigger == "sks" and identity.training["steps_done"] == 2
