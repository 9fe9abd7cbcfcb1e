"""Per-step cost of sampling with SeFiApplyIdentity vs plain CLIPTextEncode on the same model, side by side.

Prints ms per sampling step for both, their ratio (goal <= 1.03), and the one-time cost of the node's
2·S + 2 prompt encodings separately. Runs in a real host booted in process (host_boot.embedded_host).

    python -m bench.apply_identity                       # tiny random SD1.5 checkpoint, CPU
    python -m bench.apply_identity --checkpoint X.safetensors --size 512 --steps 20
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from host_boot import embedded_host  # noqa: E402
from tools import tiny_checkpoints  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.5/SDXL checkpoint (default: the tiny one)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="sefi-bench-"))
    ckpt = args.checkpoint
    if ckpt is None:
        cache = embedded_host.REPO_ROOT / ".cache" / "tiny"
        ckpt = cache / tiny_checkpoints.SD15_NAME
        if not ckpt.exists():
            subprocess.run([sys.executable, "-m", "tools.tiny_checkpoints", str(cache)], check=True,
                           cwd=embedded_host.REPO_ROOT)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / ckpt.name).symlink_to(ckpt.resolve())
    host = embedded_host.boot_in_process(base, device="auto")  # the accelerator when there is one
    identity_mod = __import__(f"{host.pack_module.__name__}.sefi_core.identity", fromlist=["Identity"])

    model, clip, _ = host.run("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]
    family = "sdxl" if set(clip.tokenize("a")) == {"g", "l"} else "sd1"
    widths = {"clip_l": 768, "clip_g": 1280} if family == "sdxl" else {"clip_l": 768}
    g = torch.Generator().manual_seed(0)
    identity = identity_mod.Identity(family, {e: torch.randn(5, 2, 1, w, generator=g) * 0.02 for e, w in widths.items()},
                                     "sks", "person")
    text = "a photo of sks person in a garden"
    neg = host.run("CLIPTextEncode", clip=clip, text="blurry")[0]
    plain = host.run("CLIPTextEncode", clip=clip, text=text.replace("sks", "person"))[0]

    encode_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        patched, cond = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=identity, text=text,
                                 strength=1.0, start_percent=0.0, end_percent=1.0)
        encode_times.append(time.perf_counter() - t0)

    latent = host.run("EmptyLatentImage", width=args.size, height=args.size, batch_size=1)[0]

    def sample(m, positive) -> float:
        t0 = time.perf_counter()
        host.run("KSampler", model=m, seed=1, steps=args.steps, cfg=5.0, sampler_name="euler", scheduler="normal",
                 positive=positive, negative=neg, latent_image=latent, denoise=1.0)
        return (time.perf_counter() - t0) / args.steps

    sample(model, plain), sample(patched, cond)  # warm-up
    plain_ms, sefi_ms = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        plain_ms.append(sample(model, plain) * 1e3)
        sefi_ms.append(sample(patched, cond) * 1e3)
    p, s = statistics.median(plain_ms), statistics.median(sefi_ms)
    print(f"host: {embedded_host.host_label()}  checkpoint: {ckpt.name}  {args.size}px  {args.steps} steps  "
          f"device: {host.pack_module.nodes.host.model_management.get_torch_device()}")
    print(f"plain CLIPTextEncode : {p:8.2f} ms/step (median of {args.repeats})")
    print(f"SeFiApplyIdentity    : {s:8.2f} ms/step")
    print(f"ratio SeFi / plain   : {s / p:8.3f}   (goal <= 1.03)")
    print(f"one-time encoding    : {statistics.median(encode_times):8.2f} s for 2·S+2 = 12 prompt encodings")


if __name__ == "__main__":
    main()
