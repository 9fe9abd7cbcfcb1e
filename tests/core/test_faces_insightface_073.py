"""The real-library tests of test_faces_insightface.py once more on insightface 0.7.3, the version most ComfyUI
installs carry (prebuilt wheels for Windows; on Linux an sdist that compiles). `make setup` builds it into
<venv>/insightface-0.7.3, next to the venv's own insightface 2.x; this test puts that folder first on the path
of a child pytest, so both versions run the same tests in one suite."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OVERLAY = Path(sys.prefix) / "insightface-0.7.3"
VERSION = "0.7.3"


def test_real_library_tests_pass_on_insightface_0_7_3():
    assert (OVERLAY / "insightface" / "__init__.py").is_file(), (
        f"insightface {VERSION} is not built in {OVERLAY}: run `make setup` (it compiles it there)")
    env = dict(os.environ, SEFI_EXPECT_INSIGHTFACE_VERSION=VERSION,
               PYTHONPATH=os.pathsep.join(p for p in (str(OVERLAY), os.environ.get("PYTHONPATH", "")) if p))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE / "test_faces_insightface.py"), "-q", "-p", "no:cacheprovider",
         "-W", "ignore::FutureWarning"],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "deselected" not in summary, tail
