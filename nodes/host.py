"""The one module that knows which ComfyUI the pack runs in.

Two layouts exist in the wild: upstream ComfyUI (a checkout whose top-level modules are `folder_paths`,
`nodes`, `node_helpers`, …) and the installable PyPI distribution (`comfyui`, where they live under
`comfy.cmd` / `comfy.nodes`). Features also differ (conditioning hooks, patcher wrappers, the V3 API exist
only in newer upstream releases); the pack relies only on what both have (the attn2 patch list, V1 nodes), and
the few API differences it meets (interrupt exception, force_full_load) are bridged here. Every other module
of the pack imports host things from here.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable

try:  # PyPI distribution
    from comfy.cmd import folder_paths  # type: ignore[no-redef]
    from comfy.interruption import InterruptProcessingException, interrupt_current_processing
    DISTRIBUTION = "pypi"
except ImportError:  # upstream checkout
    import folder_paths  # type: ignore[no-redef]
    from comfy.model_management import InterruptProcessingException, interrupt_current_processing
    DISTRIBUTION = "upstream"

import comfy.model_management as model_management  # noqa: E402
import comfy.utils  # noqa: E402

IDENTITY_FOLDER = "sefi_identities"
IDENTITY_EXTENSIONS = {".safetensors"}
INSIGHTFACE_FOLDER = "insightface"  # models/insightface, the ComfyUI convention for insightface packs
INSIGHTFACE_EXTENSIONS = {".onnx"}


def register_model_folder(name: str, extensions: Iterable[str]) -> str:
    """Register `models/<name>` as a model folder listing only `extensions`; keep paths that
    extra_model_paths.yaml may already have added under the same name. Returns the default path."""
    default = os.path.join(folder_paths.models_dir, name)
    exts = set(extensions)
    table = folder_paths.folder_names_and_paths
    if DISTRIBUTION == "pypi":
        entry = table[name]  # indexing creates the entry (and its default folder) on this host
        if default not in entry.paths:
            entry.paths.insert(0, default)
        entry.supported_extensions.clear()
        entry.supported_extensions.update(exts)
        folder_paths.invalidate_cache(name)
    else:
        paths = list(table[name][0]) if name in table else []
        if default not in paths:
            paths.insert(0, default)
        table[name] = (paths, exts)
        os.makedirs(default, exist_ok=True)
    return default


def knows_model_folder(name: str) -> bool:
    """Whether the host, another pack or extra_model_paths.yaml has registered model folder `name`. Never
    indexes the table: upstream raises KeyError for unknown names, PyPI's table creates the entry instead."""
    return name in folder_paths.folder_names_and_paths


def ensure_model_folder(name: str, extensions: Iterable[str]) -> bool:
    """register_model_folder only when nobody has registered `name` yet, so another pack's extension list stays
    as it is. Returns whether it registered."""
    if knows_model_folder(name):
        return False
    register_model_folder(name, extensions)
    return True


def insightface_roots() -> list[str]:
    """Folders that may hold insightface packs as `<root>/models/<pack>/*.onnx`: the registered 'insightface'
    folders (extra_model_paths.yaml `insightface:` entries included), then models/insightface if not among them."""
    default = os.path.join(folder_paths.models_dir, INSIGHTFACE_FOLDER)
    if not knows_model_folder(INSIGHTFACE_FOLDER):
        return [default]
    roots = list(folder_paths.get_folder_paths(INSIGHTFACE_FOLDER))
    if os.path.normpath(default) not in [os.path.normpath(r) for r in roots]:
        roots.append(default)
    return roots


def filename_list(name: str) -> list[str]:
    return list(folder_paths.get_filename_list(name))


def full_path(name: str, filename: str) -> str:
    """Absolute path of a file listed in model folder `name`, or a FileNotFoundError that says where to put it."""
    path = folder_paths.get_full_path(name, filename)
    if path is None or not os.path.isfile(path):
        folders = ", ".join(folder_paths.get_folder_paths(name))
        raise FileNotFoundError(f"'{filename}' is not in any {name} folder ({folders}). Put the file there, "
                                f"or add the folder to extra_model_paths.yaml under '{name}:', then refresh.")
    return path


SERVER_MODULE = "comfy.cmd.server" if DISTRIBUTION == "pypi" else "server"


def add_prompt_handler(handler: Callable[[dict], dict]) -> bool:
    """Have the running server call `handler(json_data) -> json_data` on every prompt it receives, before it validates
    the prompt: the only hook that sees the values as they were sent (validation converts some of them). Once per
    handler. False where no server runs (ComfyUI used in-process): there nothing but Python calls the nodes."""
    module = sys.modules.get(SERVER_MODULE)  # never imported here: no server module loaded means no server
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is None or not hasattr(server, "add_on_prompt_handler"):
        return False
    if handler not in getattr(server, "on_prompt_handlers", []):
        server.add_on_prompt_handler(handler)
    return True


def models_dir() -> str:
    return folder_paths.models_dir


def relative_parts(value: str) -> list[str] | None:
    """The parts of `value` when it is a plain relative path, which cannot leave the folder it is joined to (no
    absolute path, drive letter, '~', '..', empty part or control character); None otherwise. Decided from the
    text alone, so a refusal never depends on (and never tells) what exists elsewhere on the disk."""
    parts = value.replace("\\", "/").split("/")
    if (not value or os.path.isabs(value) or value.startswith(("/", "\\", "~")) or ":" in value or ".." in parts
            or "" in parts or any(ord(c) < 32 for c in value)):
        return None
    return parts


def find_model_file(relative: str) -> str | None:
    """The file `relative` (checked with relative_parts) names inside the models folders: models/<relative>, or,
    when it is "<folder>/<rest>", <rest> in any folder registered under <folder> (extra_model_paths.yaml)."""
    parts = relative_parts(relative)
    if parts is None:
        return None
    candidates = [os.path.join(folder_paths.models_dir, *parts)]
    if len(parts) > 1 and knows_model_folder(parts[0]):
        candidates += [os.path.join(root, *parts[1:]) for root in folder_paths.get_folder_paths(parts[0])]
    return next((c for c in candidates if os.path.isfile(c)), None)


def progress_bar(total: int) -> "comfy.utils.ProgressBar":
    return comfy.utils.ProgressBar(total)


def preview_image(picture) -> tuple:
    """A picture (PIL image) in the form both hosts' progress hooks send to the UI as the running node's preview, as
    their samplers do with latent previews: ("JPEG", image, largest side). The largest side is the picture's own:
    the servers fit a preview into it, upstream's scaling small ones up too."""
    return ("JPEG", picture, max(picture.size))


def sample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
           latent_image, on_step: Callable[[], None] | None = None):
    """What the host's KSampler computes for an empty latent (its common_ksampler: same latent fix, noise and call),
    without its progress bar and latent previews, so a caller's own progress bar keeps its place. `on_step` runs
    after every sampler step (e.g. to honour Cancel)."""
    import comfy.sample as host_sample

    latent_image = host_sample.fix_empty_latent_channels(model, latent_image)
    noise = host_sample.prepare_noise(latent_image, seed, None)
    callback = (lambda *_: on_step()) if on_step is not None else None
    return host_sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                              callback=callback, disable_pbar=True, seed=seed)


def raise_if_interrupted() -> None:
    """Raise the host's InterruptProcessingException when the user pressed Cancel (clears the flag, as the
    host does; whoever catches it to save work must re-raise it so the executor stops the graph)."""
    model_management.throw_exception_if_processing_interrupted()


def clip_attention(device):
    """The attention function the host's CLIP encoder uses for a causal-masked, short (77-token) input."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    return optimized_attention_for_device(device, mask=True, small_input=True)


@contextlib.contextmanager
def sdpa_unet_attention():
    """For the duration, the U-Net's attention (both hosts' CrossAttention calls the module's `optimized_attention`)
    runs through the host's own PyTorch SDPA function. For compiled training: the host's CPU pick (sub-quadratic /
    split) sizes its chunks from the free memory, a figure a compiled block would be specialised to and recompiled
    for at every step; sage/flash kernels are opaque to the compiler. On a GPU the host's default already is SDPA."""
    import comfy.ldm.modules.attention as attention

    saved = attention.optimized_attention, attention.optimized_attention_masked
    try:
        attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = saved


def load_for_training(model, clip) -> None:
    """Put the MODEL's and CLIP's weights on their compute device with any weight patches (LoRA) applied, fully
    loaded where the host can force it (upstream has force_full_load, 0.0.1 does not)."""
    import inspect
    kwargs = {}
    if "force_full_load" in inspect.signature(model_management.load_models_gpu).parameters:
        kwargs["force_full_load"] = True
    model_management.load_models_gpu([model], **kwargs)
    clip.load_model()


def torch_device():
    return model_management.get_torch_device()


__all__ = [
    "DISTRIBUTION", "IDENTITY_FOLDER", "INSIGHTFACE_FOLDER", "InterruptProcessingException", "add_prompt_handler",
    "clip_attention",
    "ensure_model_folder", "filename_list", "folder_paths", "full_path", "insightface_roots",
    "find_model_file", "interrupt_current_processing", "knows_model_folder", "load_for_training", "model_management",
    "models_dir", "relative_parts",
    "preview_image", "progress_bar", "raise_if_interrupted", "register_model_folder", "sample",
    "sdpa_unet_attention", "torch_device",
]
