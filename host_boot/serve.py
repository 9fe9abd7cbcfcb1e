"""Start the chosen host's server (see host_boot.embedded_host) with the arguments given on the command line.

Used by `make serve` and the server tests. The torchvision shim must be imported before the host.
"""
from __future__ import annotations

import os
import runpy
import sys

import host_boot.torchvision_shim  # noqa: F401
from host_boot.embedded_host import comfyui_path


def main() -> None:
    upstream = comfyui_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here; never try
    if upstream is None:
        # The PyPI host lists cached Hugging Face repos in some nodes' inputs and fails those nodes' INPUT_TYPES
        # (dropping them from /object_info) when the cache folder does not exist yet.
        from huggingface_hub import constants
        os.makedirs(constants.HF_HUB_CACHE, exist_ok=True)
        from comfy.cmd.main import entrypoint
        sys.argv = ["comfyui", *sys.argv[1:]]
        entrypoint()
        return
    sys.path.insert(0, str(upstream))
    sys.argv = [str(upstream / "main.py"), *sys.argv[1:]]
    runpy.run_path(str(upstream / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
