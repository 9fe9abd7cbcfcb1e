"""What ships survives a Windows console that writes cp1252 with strict errors (issue 32): ComfyUI's log interceptor
writes with the console's encoding, and where output is redirected on Windows (launchers, services) that is cp1252.
The pack's own text is cp1252 (the same rule as the Registry peer checker comfy-test's `lint --check syntax`, which
looks at every character of every shipped .py file), and the command line tools escape what users bring in (a
person's name in another script) instead of stopping."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CJK = "\u674e\u5c0f\u9f99"  # a person's name in Chinese: outside cp1252


def shipped_python_files() -> list[str]:
    """The .py files the Registry package holds: git-tracked, minus what .comfyignore keeps out."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (the package is its tracked files minus .comfyignore)")
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    ignored = subprocess.run(["git", "-c", "core.excludesFile=.comfyignore", "check-ignore", "--no-index",
                              "--stdin"], cwd=REPO, input="\n".join(tracked), capture_output=True,
                             text=True).stdout.split()
    files = sorted(set(tracked) - set(ignored))
    assert "nodes/train.py" in files and "host_boot/embedded_host.py" in files and "bench/__init__.py" not in files
    return files


def test_every_shipped_python_file_is_cp1252():
    bad = []
    for name in shipped_python_files():
        for number, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), 1):
            for column, char in enumerate(line, 1):
                try:
                    char.encode("cp1252")
                except UnicodeEncodeError:
                    bad.append(f"{name}:{number}:{column}: U+{ord(char):04X} {char!r}")
    assert not bad, "not encodable in cp1252 (write ASCII: -> for arrows, lambda, ~, <=):\n" + "\n".join(bad[:40])


def _run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "cp1252:strict", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, timeout=300)


def _text(result: subprocess.CompletedProcess) -> str:
    return result.stdout.decode("cp1252") + result.stderr.decode("cp1252")


@pytest.mark.parametrize("module", ["batch", "tools.batch_train", "sefi_core.eval"])
def test_the_commands_help_writes_on_a_cp1252_console(module):
    result = _run("-m", module, "--help")
    assert result.returncode == 0 and "UnicodeEncodeError" not in _text(result), _text(result)
    assert "usage: python -m" in _text(result)


def test_the_batch_error_paths_write_on_a_cp1252_console(tmp_path, faces_dir):
    """Log lines and the summary with a person's name outside cp1252, the skipped-entry lines, a name collision and
    an unreachable server: every line is written (escaped), none stops the batch."""
    people = tmp_path / "people"
    for name in (CJK, "alice", "Alice"):
        (people / name).mkdir(parents=True)
        shutil.copy(faces_dir / "obama_1.jpg", people / name / "1.jpg")
    shutil.copy(faces_dir / "obama_1.jpg", people / "stray.jpg")
    (people / "...").mkdir()
    result = _run("-m", "batch", str(people), "--out", str(tmp_path / "out"), "--server", "http://127.0.0.1:9",
                  "--checkpoint", "m.safetensors")
    text = _text(result)
    assert result.returncode == 3 and "Traceback" not in text and "UnicodeEncodeError" not in text, text
    assert "\\u674e\\u5c0f\\u9f99" in text and "are one identity name" in text and "stray.jpg" in text, text
    assert "1 trained" not in text and "0 trained, 0 skipped, 3 failed" in text, text


def test_the_eval_report_and_error_path_write_on_a_cp1252_console(tmp_path, faces_dir):
    """The report names each image (stdout is strict); an error names the file (stderr escapes by itself)."""
    photo = tmp_path / f"{CJK}.jpg"
    shutil.copy(faces_dir / "obama_1.jpg", photo)
    result = _run("-m", "sefi_core.eval", "--references", str(photo), "--images", str(photo), "--backend", "dlib")
    text = _text(result)
    assert result.returncode == 0 and "Traceback" not in text and "UnicodeEncodeError" not in text, text
    assert "\\u674e\\u5c0f\\u9f99.jpg" in text, text
    missing = tmp_path / f"{CJK}.png"
    result = _run("-m", "sefi_core.eval", "--references", str(missing), "--images", str(missing))
    text = _text(result)
    assert result.returncode == 2 and "Traceback" not in text and "error:" in text and "\\u674e" in text, text
