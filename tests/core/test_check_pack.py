"""tools/check_pack.py, the check `make validate` runs on the zip `comfy node pack` builds for the Registry."""
from __future__ import annotations

import pytest

from tools import check_pack

GOOD = [check_pack.Entry(name, 1000) for name in (
    "__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt", "nodes/__init__.py",
    "nodes/faces.py", "sefi_core/__init__.py", "sefi_core/eval/__main__.py", "batch/__main__.py", "batch/cli.py",
    *check_pack.HOST_BOOT, *check_pack.SHIPPED_TOOLS, "workflows/01_train_identity.json", "docs/method.md")]


def test_pack_check_accepts_a_complete_package():
    assert check_pack.problems(GOOD) == []


@pytest.mark.parametrize("name", [".venv/lib/site.py", ".venv-comfycli/bin/comfy", ".cache/tiny/sd15.safetensors",
                                  "models/checkpoints/x.ckpt", "tests/data/faces/obama_1.jpg", "bench/results.json",
                                  "docs/results/runs/ti-person0-seed0-steps150.npz",
                                  "nodes/__pycache__/faces.cpython-311.pyc", "weights/antelopev2.onnx",
                                  "node.zip", "tools/tiny_checkpoints.py", "tools/check_pack.py",
                                  "tools/embedded_host.py", "Makefile", "requirements-dev.txt"])
def test_pack_check_refuses_what_must_not_ship(name):
    found = check_pack.problems([*GOOD, check_pack.Entry(name, 10)])
    assert len(found) == 1 and found[0].startswith(name)


def test_pack_check_names_missing_parts_and_size_limits():
    incomplete = [e for e in GOOD if not e.name.startswith(("workflows/", "LICENSE", "batch/", "host_boot/serve"))]
    assert check_pack.problems(incomplete) == ["missing LICENSE", "missing batch/__main__.py",
                                               "missing host_boot/serve.py", "missing batch/*.py",
                                               "missing workflows/*.json"]
    big = check_pack.Entry("docs/screenshots/huge.png", check_pack.MAX_FILE_BYTES + 1)
    assert check_pack.problems([*GOOD, big]) == [
        f"docs/screenshots/huge.png is {big.size} bytes, over the {check_pack.MAX_FILE_BYTES}-byte limit for one file"]
    many = [check_pack.Entry(f"docs/{i}.png", check_pack.MAX_FILE_BYTES) for i in range(6)]
    assert any("over the" in p and "limit" in p and "package" in p for p in check_pack.problems([*GOOD, *many]))

