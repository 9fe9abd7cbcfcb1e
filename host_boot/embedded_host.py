"""Boot a real ComfyUI for tests, the demo, `make serve` and the batch trainer's own hosts: the PyPI
distribution by default, or the upstream checkout named by COMFYUI_PATH.

This is not pack code: the pack itself learns which host it runs in from nodes/host.py.
Everything that differs between the two hosts' *boot sequences* (module names, base-directory flag, how
custom nodes are loaded) is kept here, in one place.
"""
from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-SeFi-IDE"


def comfyui_path() -> Path | None:
    """The upstream ComfyUI checkout to use, or None for the embedded PyPI host."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise SystemExit(f"COMFYUI_PATH={value} is not a ComfyUI checkout (no main.py / comfy/ there)")
    return path


def host_label() -> str:
    path = comfyui_path()
    if path is None:
        return "comfyui 0.0.1 (PyPI)"
    version = "?"
    version_file = path / "comfyui_version.py"
    if version_file.exists():
        version = version_file.read_text().split('"')[1]
    return f"upstream ComfyUI {version} at {path}"


HOST_DEVICES = ("cpu", "auto")


def import_host_modules(device: str = "cpu") -> None:
    """Make `comfy` importable from the chosen host and choose its device before model_management loads (it
    reads the flag once, at import): "cpu" for tests and checkpoint building (the same on every machine),
    "auto" to let the host pick an accelerator as a user's ComfyUI does (benchmarks, the demo)."""
    if device not in HOST_DEVICES:
        raise ValueError(f"device must be one of {HOST_DEVICES}, got {device!r}")
    import host_boot.torchvision_shim  # noqa: F401  (must precede any torchvision import)
    upstream = comfyui_path()
    if upstream is not None and str(upstream) not in sys.path[:1]:
        sys.path.insert(0, str(upstream))
    import comfy.cli_args
    use_cpu = device == "cpu" or not _has_accelerator()  # the host without --cpu and without a GPU fails
    mm = sys.modules.get("comfy.model_management")
    if mm is not None and (mm.cpu_state == mm.CPUState.CPU) != use_cpu:
        raise RuntimeError(f"the host's model management was already loaded for another device than {device!r}")
    comfy.cli_args.args.cpu = use_cpu
    if upstream is None:
        comfy.cli_args.args.disable_known_models = True  # never try to download a checkpoint by name


def _has_accelerator() -> bool:
    import torch
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


@dataclass
class InProcessHost:
    """A booted host: node classes by id, plus its folder_paths module."""
    base_dir: Path
    nodes: dict[str, type]
    folder_paths: Any
    upstream: bool
    pack_module: Any = field(default=None)

    def run(self, class_type: str, **inputs) -> tuple:
        """Execute one V1 node the way the executor does (inference mode, FUNCTION by name)."""
        import torch
        cls = self.nodes[class_type]
        with torch.inference_mode():
            return getattr(cls(), cls.FUNCTION)(**inputs)


def link_pack(base_dir: Path) -> Path:
    """Place this repository into `<base>/custom_nodes` the way a user's git clone sits there."""
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def boot_in_process(base_dir: Path, device: str = "cpu") -> InProcessHost:
    """Boot the host inside this process with `base_dir` as its base directory and load the pack from
    `<base_dir>/custom_nodes` through the host's own custom-node loader. `device`: see import_host_modules."""
    base_dir = Path(base_dir).resolve()
    pack_link = link_pack(base_dir)
    upstream = comfyui_path()
    import_host_modules(device)
    import comfy.cli_args
    if "folder_paths" in sys.modules or "comfy.cmd.folder_paths" in sys.modules:
        raise RuntimeError("the host's folder_paths was imported before boot; its base directory is fixed then")
    if upstream is not None:
        comfy.cli_args.args.base_directory = str(base_dir)
        import utils.extra_config  # noqa: F401  (claims the name `utils` for the checkout's package first)
        import folder_paths
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        if not asyncio.run(nodes.load_custom_node(str(pack_link))):
            raise RuntimeError(f"upstream ComfyUI failed to load the pack from {pack_link}; see the log above")
        pack_module = sys.modules[str(pack_link).replace(".", "_x_")]
        return InProcessHost(base_dir, nodes.NODE_CLASS_MAPPINGS, folder_paths, True, pack_module)
    comfy.cli_args.args.cwd = str(base_dir)
    from comfy.cmd import folder_paths
    from comfy.nodes.package import import_all_nodes_in_workspace
    exported = import_all_nodes_in_workspace(vanilla_custom_nodes=True, raise_on_failure=False)
    return InProcessHost(base_dir, dict(exported.NODE_CLASS_MAPPINGS), folder_paths, False,
                         sys.modules.get(PACK_DIR_NAME))


def server_command(base_dir: Path, port: int, extra_model_paths: Path | None = None,
                   python: str = sys.executable) -> list[str]:
    """argv that starts the host's server headless on 127.0.0.1 with the pack in `<base>/custom_nodes`."""
    base_dir = Path(base_dir).resolve()
    link_pack(base_dir)
    argv = [python, "-m", "host_boot.serve", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    if comfyui_path() is not None:
        argv += ["--base-directory", str(base_dir), "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    else:
        argv += ["--cwd", str(base_dir), "--disable-known-models"]
    if extra_model_paths is not None:
        argv += ["--extra-model-paths-config", str(extra_model_paths)]
    return argv
