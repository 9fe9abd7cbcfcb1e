"""A node's log line through the host's own logger on a cp1252 console (issue 32). ComfyUI's log interceptor
(app/logger.py upstream: a TextIOWrapper over the console's buffer, with its encoding and strict errors) would lose
a line holding a character outside cp1252 with a "--- Logging error ---" traceback; the pack's loggers escape such
characters (sefi_core.console), here a person's name in Chinese.

One fresh interpreter with PYTHONIOENCODING=cp1252 boots the host in process, installs the host's logger (upstream's
setup_logger; the PyPI host has none, so the same wrapper is made here), and runs the trainer on a name whose
stale temp file it removes and logs before it refuses the missing model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAME = "\\u674e\\u5c0f\\u9f99"  # escaped here; the script writes the real characters

SCRIPT = r"""
import io, logging, sys
repo, base = sys.argv[1], sys.argv[2]
sys.path.append(repo)
import torch
from host_boot import embedded_host
host = embedded_host.boot_in_process(base)
try:
    from app.logger import setup_logger  # upstream ComfyUI: its interceptor, as main.py installs it
    setup_logger(log_level="INFO")
    print("LOGGER upstream", flush=True)
except ImportError:  # the PyPI host: the same wrapper (console encoding, strict errors) and handler
    sys.stderr = io.TextIOWrapper(sys.stderr.buffer, encoding=sys.stderr.encoding, line_buffering=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    print("LOGGER replica", flush=True)
import importlib
pack = host.pack_module.__name__
policies = importlib.import_module(pack + ".nodes.train_policies")
name = "NAME"
folder = policies.identity_dir()
folder.mkdir(parents=True, exist_ok=True)
(folder / f".{name}.safetensors.0123456789ab.tmp").write_bytes(b"half")
try:
    host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=torch.rand(1, 64, 64, 3), name=name,
             trigger="sks", steps=1)
except Exception as exc:
    print("REFUSED", type(exc).__name__, flush=True)
print("DONE", flush=True)
""".replace("NAME", NAME)


def test_a_node_log_line_with_a_name_outside_cp1252_is_written(tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(tmp_path / "base")], cwd=REPO, env=env,
                            capture_output=True, timeout=600)
    out, err = result.stdout.decode("cp1252", "replace"), result.stderr.decode("cp1252", "replace")
    assert result.returncode == 0 and "DONE" in out, f"{out[-3000:]}\n{err[-6000:]}"
    # upstream's own interceptor where the host is upstream ComfyUI (COMFYUI_PATH), the replica on the PyPI host
    assert ("LOGGER upstream" in out) == bool(os.environ.get("COMFYUI_PATH")), out[-3000:]
    assert "Logging error" not in err and "UnicodeEncodeError" not in err, err[-6000:]
    assert "\\u674e\\u5c0f\\u9f99: removed" in err and "left over from an interrupted write" in err, err[-6000:]
