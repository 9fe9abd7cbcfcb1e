"""Refresh docs/screenshots (the README's pictures) from the newest ComfyUI frontend: runs the browser test
(tests/workflows/test_browser.py) on that frontend only, with SEFI_SCREENSHOTS pointing at docs/screenshots.

Needs upstream ComfyUI (the newest frontend does not run on the PyPI host's server):

    COMFYUI_PATH=<checkout> .venv-upstream/bin/python -m tools.screenshots     # or: make screenshots COMFYUI_PATH=…

A picture that did not visibly change is left as it is; the run fails (and writes nothing more) where the test
fails. Extra arguments go to pytest (-x, -v, …).
"""
from __future__ import annotations

import os
import subprocess
import sys

from host_boot import embedded_host
from tools import frontends

SCREENSHOTS = embedded_host.REPO_ROOT / "docs" / "screenshots"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if embedded_host.comfyui_path() is None:
        print("tools.screenshots needs COMFYUI_PATH=<an upstream ComfyUI checkout> (and its venv's python): the "
              f"newest frontend ({frontends.NEWEST}) runs on upstream's server only", file=sys.stderr)
        return 2
    env = {**os.environ, "SEFI_SCREENSHOTS": str(SCREENSHOTS)}
    command = [sys.executable, "-m", "pytest", "tests/workflows/test_browser.py", "-q", "-k", "newest", *argv]
    print(f"writing {SCREENSHOTS.relative_to(embedded_host.REPO_ROOT)}/ from frontend {frontends.NEWEST}", flush=True)
    return subprocess.run(command, cwd=embedded_host.REPO_ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
