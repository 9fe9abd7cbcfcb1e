"""The browser test without a browser: skipped with the reason on a developer's machine, a failure under CI=true
(tools.dev_requirements), where `make test` installs Chromium and a skip would pass the run untested."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _collect_without_chromium(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["SEFI_CHROMIUM"] = str(tmp_path / "no-chromium-here")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "tests/workflows/test_browser.py", "--collect-only", "-q",
                           "-rs"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_chromium_the_browser_test_skips_outside_ci(tmp_path, ci) -> None:
    done = _collect_without_chromium(tmp_path, ci)
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, out
    assert "chromium not found at" in out and "SKIPPED" in out, out


def test_without_chromium_the_browser_test_fails_under_ci(tmp_path) -> None:
    done = _collect_without_chromium(tmp_path, "true")
    out = done.stdout + done.stderr
    assert done.returncode not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), out
    assert "missing under CI=true: chromium not found at" in out, out
