"""`make serve`: the chosen host's web UI with this pack loaded, models under ./models, on 127.0.0.1 only.

Two checkpoints are put in ./models/checkpoints when missing: the miniature world's (world-sd15.safetensors,
trained here, docs/world.md: the method can be seen to work on it) with its held-out person's studio photo and
face mask in ./input (workflows/07_world_identity.json trains and renders on them), and the tiny random SD1.5 one
(its images are noise: it proves the install, not the method). A real checkpoint copied there sits beside them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from host_boot import embedded_host
from world import demo

MODEL_FOLDERS = ("checkpoints", "controlnet", "embeddings", "sefi_identities", "insightface/models")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8188)))
    args = parser.parse_args(argv)
    base = embedded_host.REPO_ROOT
    models = base / "models"
    for folder in MODEL_FOLDERS:
        (models / folder).mkdir(parents=True, exist_ok=True)
    print("models/checkpoints: the miniature world's checkpoint and the tiny random SD1.5 one (built when missing; "
          "copy a real SD1.5/SDXL checkpoint there for real pictures)", flush=True)
    subprocess.run([sys.executable, "-m", "world", "checkpoint", str(models / "checkpoints")], check=True, cwd=base)
    subprocess.run([sys.executable, "-m", "tools.tiny_checkpoints", str(models / "checkpoints")], check=True,
                   cwd=base)
    photo, mask = demo.write_photo(base / "input")
    print(f"input/{photo}, input/{mask}: a held-out person of the world and their face mask", flush=True)
    argv = embedded_host.server_command(base, args.port)
    print(f"ComfyUI ({embedded_host.host_label()}) on http://127.0.0.1:{args.port} — Ctrl+C stops it")
    return subprocess.call(argv, cwd=base)


if __name__ == "__main__":
    sys.exit(main())
