"""`make serve`: the chosen host's web UI with this pack loaded, models under ./models, on 127.0.0.1 only.

Without any checkpoint in ./models/checkpoints the tiny random SD1.5 checkpoint is written there first, so
the graph runs end to end (its images are noise: it proves the install, not the method).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tools import embedded_host

MODEL_FOLDERS = ("checkpoints", "controlnet", "embeddings", "sefi_identities", "insightface/models")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8188)))
    args = parser.parse_args(argv)
    base = embedded_host.REPO_ROOT
    models = base / "models"
    for folder in MODEL_FOLDERS:
        (models / folder).mkdir(parents=True, exist_ok=True)
    checkpoints = [p for p in (models / "checkpoints").iterdir() if p.suffix in (".safetensors", ".ckpt")]
    if not checkpoints:
        print("No checkpoint in models/checkpoints: writing the tiny random SD1.5 checkpoint there "
              "(images will be noise; copy a real SD1.5/SDXL checkpoint there for real results).")
        subprocess.run([sys.executable, "-m", "tools.tiny_checkpoints", str(models / "checkpoints")], check=True)
    argv = embedded_host.server_command(base, args.port)
    print(f"ComfyUI ({embedded_host.host_label()}) on http://127.0.0.1:{args.port} — Ctrl+C stops it")
    return subprocess.call(argv, cwd=base)


if __name__ == "__main__":
    sys.exit(main())
