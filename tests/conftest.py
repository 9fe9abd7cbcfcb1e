"""Host fixtures for the whole suite: tiny checkpoints, an in-process ComfyUI, and a real server.

The host is PyPI's comfyui==0.0.1 by default, or the upstream checkout named by COMFYUI_PATH (see
host_boot/embedded_host.py). Pure `sefi_core` tests use none of these fixtures and never import ComfyUI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: an upstream checkout must win the names `nodes`, `utils`, … over this repository.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

from batch import comfy_client  # noqa: E402
from host_boot import embedded_host  # noqa: E402
from tools import tiny_checkpoints  # noqa: E402

# Real face photos, vendored with their licence (tests/data/faces/README.md): a bare clone runs every test.
FACES_DIR = REPO_ROOT / "tests" / "data" / "faces"
CACHE_DIR = Path(os.environ.get("SEFI_TEST_CACHE", REPO_ROOT / ".cache" / "tiny"))


def pytest_report_header(config):
    return f"ComfyUI host: {embedded_host.host_label()}"


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    return FACES_DIR


def image_tensor(path: Path, max_side: int | None = None):
    """A photo as a ComfyUI IMAGE [1, H, W, 3] float 0..1, shrunk to fit `max_side` when given."""
    import numpy as np
    import torch
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if max_side:
            im.thumbnail((max_side, max_side))
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


@pytest.fixture(scope="session")
def face_photo(faces_dir):
    """`face_photo("obama_1.jpg", 160)`: a real face photo from tests/data/faces as a ComfyUI IMAGE."""
    return lambda name, max_side=None: image_tensor(faces_dir / name, max_side)


@pytest.fixture(scope="session")
def people_folder(faces_dir):
    """`people_folder(root, {"obama": ["obama_1.jpg", ...], ...})`: one sub-folder of real photos per person, as
    the batch trainer (python -m batch) reads them, plus "nobody" holding only a noise image (a person who must fail alone)."""
    def build(root: Path, photos: dict[str, list[str]]) -> Path:
        import numpy as np
        from PIL import Image
        for person, names in photos.items():
            (root / person).mkdir(parents=True)
            for name in names:
                shutil.copy(faces_dir / name, root / person / name)
        (root / "nobody").mkdir(parents=True)
        noise = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
        Image.fromarray(noise).save(root / "nobody" / "noise.png")
        return root
    return build


def _tiny(family: str) -> Path:
    """Build (once, cached) in a subprocess: importing the host's model code here would fix its folders
    before the in-process host is booted with its own base directory."""
    name = tiny_checkpoints.BUILDERS[family][0]
    path = CACHE_DIR / name
    if not path.exists():
        subprocess.run([sys.executable, "-m", "tools.tiny_checkpoints", str(CACHE_DIR), "--family", family],
                       cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return path


@pytest.fixture(scope="session")
def tiny_sd15() -> Path:
    return _tiny("sd1")


@pytest.fixture(scope="session")
def tiny_sdxl() -> Path:
    return _tiny("sdxl")


@pytest.fixture(scope="session")
def tiny_controlnet() -> Path:
    return _tiny("controlnet")


def _link_model(folder: Path, source: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    if not target.exists():
        target.symlink_to(source)


@pytest.fixture(scope="session")
def host_base(tmp_path_factory, tiny_sd15) -> Path:
    """The in-process host's base directory: models/checkpoints holds the tiny SD1.5 checkpoint."""
    base = tmp_path_factory.mktemp("comfy-base")
    _link_model(base / "models" / "checkpoints", tiny_sd15)
    return base


@pytest.fixture(scope="session")
def host(host_base) -> embedded_host.InProcessHost:
    """ComfyUI booted in this process with the pack loaded through the host's own custom-node loader."""
    return embedded_host.boot_in_process(host_base)


@pytest.fixture(scope="session")
def sd15(host, tiny_sd15):
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded through CheckpointLoaderSimple."""
    return host.run("CheckpointLoaderSimple", ckpt_name=tiny_sd15.name)[:3]


@pytest.fixture(scope="module")
def sdxl(host, tiny_sdxl):
    """(MODEL, CLIP, VAE) of the tiny SDXL checkpoint for one test module (~5 GB), unloaded after it."""
    folder = Path(host.folder_paths.get_folder_paths("checkpoints")[0])
    _link_model(folder, tiny_sdxl)
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=tiny_sdxl.name)[:3]
    yield model, clip, vae
    del model, clip, vae
    host.pack_module.nodes.host.model_management.unload_all_models()


@pytest.fixture(scope="session")
def world_unet_weights(host) -> Path:
    """The committed, trained world U-Net (world/weights/unet.safetensors)."""
    from world import checkpoint
    return checkpoint.UNET_WEIGHTS


@pytest.fixture(scope="session")
def world_sd15(host, world_unet_weights) -> Path:
    """The world checkpoint (world/checkpoint.py) in the host's checkpoints folder, built once and cached. Built after
    boot, in process: its builder imports the host's model code. Cached where `make demo` looks for it
    (checkpoint.CACHE_FOLDER), not in CACHE_DIR: the demo tests' own processes then find it built instead of
    assembling it a second time."""
    from world import checkpoint
    path = checkpoint.ensure(checkpoint.CACHE_FOLDER, world_unet_weights)
    _link_model(Path(host.folder_paths.get_folder_paths("checkpoints")[0]), path)
    return path


@pytest.fixture(scope="session")
def world3_sd15(host) -> Path:
    """The third world's checkpoint (world/third/checkpoint.py) on its committed round, cached like world_sd15."""
    from world.third import checkpoint as third
    path = third.ensure(CACHE_DIR)
    _link_model(Path(host.folder_paths.get_folder_paths("checkpoints")[0]), path)
    return path


@pytest.fixture(scope="session")
def world_models(host, world_sd15):
    """(MODEL, CLIP, VAE) of the world checkpoint, loaded through CheckpointLoaderSimple."""
    return host.run("CheckpointLoaderSimple", ckpt_name=world_sd15.name)[:3]


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_sd15):
    """A real ComfyUI server headless on 127.0.0.1 (free port, --cpu) with this pack in its custom nodes."""
    base = tmp_path_factory.mktemp("comfy-server")
    _link_model(base / "models" / "checkpoints", tiny_sd15)
    with running_server(base) as handle:
        yield handle


@pytest.fixture(scope="session")
def start_server():
    """`with start_server(base, extra_args) as handle:` a server of the caller's own on `base` (see running_server)."""
    return running_server


@contextmanager
def running_server(base: Path, extra_args: tuple[str, ...] = ()):
    """Start a server on `base` (see `server`), with `extra_args` appended to its command line; stop it after."""
    port = comfy_client.free_port()
    log = open(base / "server.log", "wb")
    proc = subprocess.Popen([*embedded_host.server_command(base, port), *extra_args], cwd=REPO_ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        comfy_client.wait_until_ready(proc, url)
    except RuntimeError as err:
        comfy_client.stop(proc)
        log.close()
        pytest.fail(f"{err}\n--- server log ---\n{(base / 'server.log').read_text(errors='replace')[-6000:]}")
    try:
        yield ServerHandle(proc=proc, client=comfy_client.ComfyClient(url), base_dir=base)
    finally:
        comfy_client.stop(proc)
        log.close()


class ServerHandle:
    def __init__(self, proc, client, base_dir: Path):
        self.proc, self.client, self.base_dir = proc, client, base_dir
        self.output_dir = base_dir / "output"
        self.models_dir = base_dir / "models"

    def log(self) -> str:
        return (self.base_dir / "server.log").read_text(errors="replace")

    def add_model(self, folder: str, source: Path) -> None:
        _link_model(self.models_dir / folder, source)
        shutil.os.utime(self.models_dir / folder)  # the host caches folder listings by mtime


@pytest.fixture(scope="session")
def pack(host):
    """The pack as the host loaded it; `pack.core("identity")` is its sefi_core.identity module."""
    import importlib

    class Pack:
        module = host.pack_module

        @staticmethod
        def core(name: str):
            return importlib.import_module(f"{host.pack_module.__name__}.sefi_core.{name}")

        @staticmethod
        def glue(name: str):
            return importlib.import_module(f"{host.pack_module.__name__}.nodes.{name}")

    return Pack
