"""The ComfyUI web frontends the browser test (tests/workflows/test_browser.py) drives besides the host's own.

Upstream ComfyUI pins one `comfyui-frontend-package` (0.3.64: 1.27.10) and serves another with
`--front-end-root <its static folder>`; ComfyUI users today run the newest one from PyPI, so the pack is
checked in that one too. The PyPI host (comfyui 0.0.1) serves only the frontend bundled with it: its server has
none of the routes a frontend package calls (`/api/...`, `/settings`, `/userdata`) and no `--front-end-root`.

A frontend is installed once per version, unpacked only (`pip install --no-deps --target`: the package is a folder
of static files), into SEFI_FRONTENDS (default .cache/frontends in the repository):

    python -m tools.frontends            # installs the newest pinned one if it is not there; prints its static folder
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui-frontend-package"
# The newest release on PyPI when this was last checked (2026-12); raise it after a look at the browser test's
# screenshots, then refresh docs/screenshots with `python -m tools.screenshots`.
NEWEST = "1.58.1"


def frontends_dir() -> Path:
    return Path(os.environ.get("SEFI_FRONTENDS") or REPO_ROOT / ".cache" / "frontends")


def static_root(version: str, folder: Path | None = None) -> Path | None:
    """The installed frontend's static folder (what --front-end-root takes), or None if it is not installed."""
    static = (folder or frontends_dir()) / f"{PACKAGE}-{version}" / "comfyui_frontend_package" / "static"
    return static if (static / "index.html").is_file() else None


def install(version: str, folder: Path | None = None, python: str = sys.executable) -> Path:
    """pip-install the frontend `version` into its own folder under `folder` (unpacked into a temporary folder
    first, then renamed: an interrupted install leaves nothing that looks installed). Returns the static folder.
    Raises RuntimeError with pip's own message when it cannot (no network, no such version)."""
    folder = folder or frontends_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PACKAGE}-{version}"
    with tempfile.TemporaryDirectory(prefix=f".{PACKAGE}-{version}-", dir=folder) as tmp:
        done = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                               "--target", tmp, f"{PACKAGE}=={version}"], capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.startswith("ERROR")]
            raise RuntimeError(f"pip could not install {PACKAGE}=={version} into {folder}: "
                               + ("; ".join(lines) or (done.stderr or done.stdout).strip()[-500:]))
        if target.exists():  # a half-copied folder from before (static_root found no index.html in it)
            shutil.rmtree(target)
        os.replace(tmp, target)
        Path(tmp).mkdir()  # for TemporaryDirectory's own clean-up
    root = static_root(version, folder)
    if root is None:
        raise RuntimeError(f"{PACKAGE}=={version} installed into {target} but has no static/index.html there")
    return root


def ensure(version: str = NEWEST, folder: Path | None = None) -> Path:
    return static_root(version, folder) or install(version, folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=NEWEST, help=f"the {PACKAGE} version (default {NEWEST})")
    args = parser.parse_args(argv)
    try:
        print(ensure(args.version))
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
