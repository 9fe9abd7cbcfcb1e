"""The pack boots inside a real ComfyUI host, in process and as a server."""
from __future__ import annotations

import ast
import os
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_pack_nodes_registered_with_stable_prefixed_ids(host):
    mappings = host.pack_module.NODE_CLASS_MAPPINGS
    names = host.pack_module.NODE_DISPLAY_NAME_MAPPINGS
    assert mappings, "the pack registered no nodes"
    for node_id, cls in mappings.items():
        assert node_id.startswith("SeFi"), node_id
        assert host.nodes[node_id] is cls, f"{node_id} is not what the host registered"
        assert node_id in names
        assert isinstance(cls.INPUT_TYPES(), dict) and hasattr(cls, cls.FUNCTION)


def test_tiny_checkpoint_loads_through_the_hosts_checkpoint_loader(host, sd15, tiny_sd15):
    model, clip, vae = sd15
    assert type(model.model.model_config).__name__ == "SD15"
    assert tiny_sd15.name in host.folder_paths.get_filename_list("checkpoints")
    cond = host.run("CLIPTextEncode", clip=clip, text="a photo of the face of person")[0]
    assert cond[0][0].shape == (1, 77, 768)


def test_sampling_graph_runs_in_process(host, sd15):
    import torch
    model, clip, vae = sd15
    pos = host.run("CLIPTextEncode", clip=clip, text="a photo of a person")[0]
    neg = host.run("CLIPTextEncode", clip=clip, text="")[0]
    latent = host.run("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    out = host.run("KSampler", model=model, seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                   positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
    image = host.run("VAEDecode", vae=vae, samples=out)[0]
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()


def test_identity_folder_registered_and_extra_model_paths_reach_it(host, tmp_path):
    fp = host.folder_paths
    default = os.path.join(fp.models_dir, "sefi_identities")
    assert default in fp.get_folder_paths("sefi_identities")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    (extra / "someone.safetensors").write_bytes(b"x")
    (extra / "notes.txt").write_text("not an identity")
    yaml_file = tmp_path / "extra_model_paths.yaml"
    yaml_file.write_text(f"mine:\n  base_path: {tmp_path}\n  sefi_identities: elsewhere\n")
    if host.upstream:
        import utils.extra_config as extra_config
    else:
        from comfy.cmd import extra_model_paths as extra_config
    extra_config.load_extra_path_config(str(yaml_file))
    assert str(extra) in [os.path.normpath(p) for p in fp.get_folder_paths("sefi_identities")]
    listed = fp.get_filename_list("sefi_identities")
    assert "someone.safetensors" in listed and "notes.txt" not in listed


def test_sefi_core_never_imports_comfyui():
    for path in (REPO_ROOT / "sefi_core").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                assert top not in {"comfy", "comfy_extras", "folder_paths", "nodes", "node_helpers", "comfy_api"}, \
                    f"{path.relative_to(REPO_ROOT)} imports {mod}"


def test_only_the_host_module_names_a_host_layout():
    """nodes/host.py is the one place that knows whether the host is the PyPI or the upstream layout."""
    layout_names = ("comfy.cmd", "import folder_paths", "comfy.nodes", "import nodes", "comfy.interruption")
    for path in (REPO_ROOT / "nodes").rglob("*.py"):
        if path.name == "host.py":
            continue
        text = path.read_text()
        for name in layout_names:
            assert name not in text, f"{path.relative_to(REPO_ROOT)} mentions {name}; go through nodes/host.py"


def test_server_lists_pack_nodes_and_renders_an_image(server, host, tiny_sd15):
    info = server.client.object_info()
    ours = {k for k in info if k.startswith("SeFi")}
    assert ours == set(host.pack_module.NODE_CLASS_MAPPINGS), server.log()[-3000:]
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a person"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 3, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "foundation"}},
    }
    from batch.comfy_client import output_files
    entry = server.client.run(graph)
    files = output_files(entry, server.output_dir)
    assert files and all(f.is_file() and f.stat().st_size > 0 for f in files), server.log()[-3000:]
    from PIL import Image
    with Image.open(files[0]) as im:
        assert im.size == (64, 64)


def test_host_device_choice_for_benchmarks_and_demo():
    """"cpu" (tests) puts the host in CPU mode; "auto" (benchmarks, demo) leaves the choice to the host, which on a
    machine without an accelerator must still end up on the CPU rather than fail. Each in a fresh interpreter,
    because the host reads the flag once, when its model management is imported."""
    import subprocess
    import sys
    probe = ("import sys, torch; from host_boot import embedded_host as e; e.import_host_modules(sys.argv[1]); "
             "import comfy.model_management as mm; print(mm.cpu_state.name, torch.cuda.is_available())")
    for device in ("cpu", "auto"):
        out = subprocess.run([sys.executable, "-c", probe, device], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300, env=os.environ.copy())
        assert out.returncode == 0, out.stderr[-2000:]
        state, cuda = out.stdout.split()[-2:]
        assert state == ("CPU" if device == "cpu" or cuda == "False" else "GPU"), out.stdout
    bad = subprocess.run([sys.executable, "-c", probe, "gpu"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "device must be one of" in bad.stderr
