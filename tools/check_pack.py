"""Check the Registry package that `comfy node pack` builds: what a user needs is in it, nothing else is.

`python -m tools.check_pack node.zip` (run by `make validate`). The package is the git-tracked files minus
.comfyignore; this check is what keeps a test photo, a venv, a model or a benchmark result from being published.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: The packages that ship: the ComfyUI glue, the method, the batch trainer (a user command) and the host boot it
#: starts hosts with. None of them may import tools/ (tests/core/test_import_rules.py).
SHIPPED_PACKAGES = ("nodes", "sefi_core", "batch", "host_boot")
#: The host boot the batch trainer starts hosts with (docs/architecture.md).
HOST_BOOT = ("host_boot/__init__.py", "host_boot/embedded_host.py", "host_boot/serve.py",
             "host_boot/torchvision_shim.py")
#: Files a ComfyUI user needs: the loader, the licence, the docs, the install metadata and the user commands.
REQUIRED_FILES = ("__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt", "nodes/__init__.py",
                  "sefi_core/__init__.py", "sefi_core/eval/__main__.py", "batch/__main__.py", *HOST_BOOT)
#: Folders that must ship with at least one file of the given suffix.
REQUIRED_FOLDERS = (*((f"{package}/", ".py") for package in SHIPPED_PACKAGES), ("workflows/", ".json"))
#: The only files of tools/ that ship: the batch trainer's old name `python -m tools.batch_train`, documented for
#: release 0.1 only (README), and the package file it needs.
SHIPPED_TOOLS = ("tools/__init__.py", "tools/batch_train.py")
#: Developer files at the top: the Makefile and the pins of the development environments.
DEVELOPER_FILES = ("Makefile", "constraints.txt", "requirements-dev.txt", "requirements-insightface.txt")
#: Path prefixes that never ship: environments, caches, models, run outputs, tests and benchmarks.
FORBIDDEN_PREFIXES = (".venv", ".cache/", ".git/", "models/", "output/", "input/", "temp/", "user/",
                      "demo-output/", "custom_nodes/", "device-out/", "tests/", "bench/", ".ci/", "docs/results/runs/")
#: Model weights and archives: the pack downloads none and ships none.
FORBIDDEN_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".onnx", ".bin", ".dat", ".bz2", ".gguf", ".zip",
                      ".pyc")
#: Size limits (uncompressed): one file, and the whole package.
MAX_FILE_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    name: str
    size: int


def problems(entries: Iterable[Entry]) -> list[str]:
    """Everything wrong with a package's file list (empty when it is fine)."""
    entries = [e for e in entries if not e.name.endswith("/")]
    names = {e.name for e in entries}
    found = [f"missing {name}" for name in REQUIRED_FILES if name not in names]
    for folder, suffix in REQUIRED_FOLDERS:
        if not any(n.startswith(folder) and n.endswith(suffix) for n in names):
            found.append(f"missing {folder}*{suffix}")
    for entry in entries:
        name = entry.name
        if name.startswith(FORBIDDEN_PREFIXES) or "/__pycache__/" in f"/{name}":
            found.append(f"{name} must not ship (environment, cache, model, output, test or benchmark file)")
        elif name.lower().endswith(FORBIDDEN_SUFFIXES):
            found.append(f"{name} must not ship (model weights or archive)")
        elif name in DEVELOPER_FILES or (name.startswith("tools/") and name not in SHIPPED_TOOLS):
            found.append(f"{name} must not ship (developer tooling; list it in .comfyignore)")
        if entry.size > MAX_FILE_BYTES:
            found.append(f"{name} is {entry.size} bytes, over the {MAX_FILE_BYTES}-byte limit for one file")
    total = sum(e.size for e in entries)
    if total > MAX_TOTAL_BYTES:
        found.append(f"the package holds {total} bytes, over the {MAX_TOTAL_BYTES}-byte limit")
    return found


def read_zip(path: Path) -> list[Entry]:
    with zipfile.ZipFile(path) as archive:
        return [Entry(info.filename, info.file_size) for info in archive.infolist()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zip", type=Path, help="the zip written by `comfy node pack` (node.zip)")
    args = parser.parse_args(argv)
    entries = read_zip(args.zip)
    found = problems(entries)
    for problem in found:
        print(f"check_pack: {problem}", file=sys.stderr)
    files = [e for e in entries if not e.name.endswith("/")]
    top = sorted({e.name.split("/", 1)[0] for e in files})
    print(f"check_pack: {args.zip}: {len(files)} files, {sum(e.size for e in files)} bytes uncompressed "
          f"({', '.join(top)}): {'FAILED' if found else 'ok'}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
