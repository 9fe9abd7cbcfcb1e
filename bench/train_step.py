"""One SeFi training step vs one plain textual-inversion step, side by side, on the same model/resolution/precision.

SeFi step: self-attention generator → K and V tokens through ONE CLIP forward (batch 2) → U-Net with the K/V split and the
face-wise attention loss (same-Q reference maps at the loss sites) → backward → AdamW.
TI step: one free vector → 1 CLIP encode → U-Net (no K/V split, no attention capture) → backward → AdamW.
Both run through nodes/training (same frozen-weight handling, same host), so the ratio isolates SeFi's extra
work. Prints ms/step (median), the ratio (goal ≤ 1.15) and peak memory.

    python -m bench.train_step                      # tiny checkpoint on CPU, 64 px (builds it in .cache/tiny)
    python -m bench.train_step --full-sd15          # real-size SD1.5 UNet, random weights, 512 px — for GPU runs
    python -m bench.train_step --identity 600       # also time a real default-length SeFiTrainIdentity run
    COMFYUI_PATH=/path/to/ComfyUI .venv-upstream/bin/python -m bench.train_step   # upstream host

`--full-sd15` builds the SD1.5 UNet configuration (model_channels 320, channel_mult [1,2,4,4], 2 res blocks,
16 cross-attention sites) with random weights in a temporary checkpoint; it is meant for a GPU (on a CPU, use
`--resolution 128` to keep a step within seconds).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from tools import embedded_host, tiny_checkpoints  # noqa: E402

SD15_FULL_UNET = dict(tiny_checkpoints.SD15_UNET, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                      transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                      transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], attention_resolutions=[4, 2, 1],
                      num_head_channels=-1, num_heads=8, image_size=64)


def _full_checkpoint(folder: Path) -> Path:
    path = folder / "sd15-full-random.safetensors"
    if path.exists():  # the builder is deterministic: a second bench in the same place reuses the file
        return path
    old = tiny_checkpoints.SD15_UNET
    tiny_checkpoints.SD15_UNET = {k: v for k, v in SD15_FULL_UNET.items() if k not in ("attention_resolutions",
                                                                                       "num_head_channels",
                                                                                       "num_heads")}
    try:
        return tiny_checkpoints.build_sd15(path)
    finally:
        tiny_checkpoints.SD15_UNET = old


def boot_bench_host(full_sd15: bool, checkpoint: Path | None = None):
    """(host, checkpoint path): the embedded host booted in a fresh base folder on the accelerator when there is
    one, with a real `checkpoint`, the full-size random SD1.5 (`full_sd15`) or the tiny one linked into it."""
    base = Path(tempfile.mkdtemp(prefix="sefi-bench-"))
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    if checkpoint is not None or full_sd15:
        embedded_host.import_host_modules("auto")
        src = Path(checkpoint).resolve() if checkpoint is not None else _full_checkpoint(REPO / ".cache" / "full")
    else:
        src = REPO / ".cache" / "tiny" / tiny_checkpoints.SD15_NAME
        if not src.exists():
            import subprocess
            subprocess.run([sys.executable, "-m", "tools.tiny_checkpoints", str(src.parent)], cwd=REPO, check=True)
    (ckpt_dir / src.name).symlink_to(src)
    return embedded_host.boot_in_process(base, device="auto"), src  # the accelerator when there is one


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-sd15", action="store_true", help="real-size SD1.5 UNet at 512 px (GPU)")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-ups)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="compute precision of the frozen models (the node's `precision` input)")
    ap.add_argument("--identity", type=int, default=0, metavar="N",
                    help="afterwards, time a whole N-step SeFiTrainIdentity run with the node's defaults "
                         "(600 = a default-length identity); 0 = skip")
    ap.add_argument("--separate-kv", action="store_true", help="SeFi encodes K and V in two CLIP forwards "
                    "(the pre-batching behaviour, for comparison)")
    args = ap.parse_args(argv)
    res = args.resolution or (512 if args.full_sd15 else 64)

    host, src = boot_bench_host(args.full_sd15)
    import importlib
    pkg = host.pack_module.__name__
    th = importlib.import_module(f"{pkg}.nodes.training")
    tr = importlib.import_module(f"{pkg}.sefi_core.training")
    gen = importlib.import_module(f"{pkg}.sefi_core.generator")
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=src.name)[:3]
    image = torch.rand(1, res, res, 3, generator=torch.Generator().manual_seed(0))

    def run(step_fn, generator, settings):
        params = [p for p in generator.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=settings.lr, foreach=device.type != "cpu")  # as run_training
        rng = torch.Generator().manual_seed(0)
        times = []
        for i in range(args.steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, *_ = step_fn(generator(), rng, i)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    with torch.inference_mode(), th.training_context(model, clip, args.precision) as dtype:
        device = model.load_device
        pixels = th.fit_image(image, res)
        init = th.TextEncoder(clip).initializer_embeddings("person")
        results = {}
        for label, kind, stages, kv, att in (("TI", "direct", 1, False, "off"),
                                             ("SeFi", "self_attention", 5, True, "reference")):
            s = tr.TrainSettings(steps=1, resolution=res, flip=False, attention_loss=att,
                                 lr=1e-4 if kind == "self_attention" else 5e-3)
            step = th.SefiStep(model, clip, vae, pixels, None, s, "sks", 1)
            g = gen.build_generator(kind, init, stages=stages, vectors_per_token=1, kv_split=kv).to(device)
            if kind == "direct":
                # plain TI: one encode (V = K, the same conditioning tensor for keys and values, no K/V split)
                orig = step.text.encode_prompt

                def one_encode(prompt, vecs, _orig=orig):
                    c = _orig(prompt, {e: v[: v.shape[0] // 2] for e, v in vecs.items()})
                    return torch.cat([c, c], 0)
                step.text.encode_prompt = one_encode
            elif args.separate_kv:
                orig = step.text.encode_prompt

                def two_encodes(prompt, vecs, _orig=orig):
                    half = next(iter(vecs.values())).shape[0] // 2
                    return torch.cat([_orig(prompt, {e: v[:half] for e, v in vecs.items()}),
                                      _orig(prompt, {e: v[half:] for e, v in vecs.items()})], 0)
                step.text.encode_prompt = two_encodes
            th.reset_peak_memory(device)
            ms = run(step, g, s)
            results[label] = (ms, th.peak_memory_bytes(device))
    ti, sefi = results["TI"][0], results["SeFi"][0]
    print(f"host: {embedded_host.host_label()}; device {device}; compute {dtype}; {res} px; "
          f"{'full SD1.5 UNet' if args.full_sd15 else 'tiny UNet'}")
    for label, (ms, peak) in results.items():
        print(f"{label:5s} {ms:9.1f} ms/step   peak memory {peak / 2**20:8.0f} MiB"
              f"{' (process RSS high-water mark)' if device.type == 'cpu' else ''}")
    print(f"ratio SeFi/TI = {sefi / ti:.3f} (goal <= 1.15){'  [K/V in two CLIP forwards]' if args.separate_kv else ''}")
    if args.identity:
        _time_identity(host, model, clip, vae, image, res, args)
    return 0


def _time_identity(host, model, clip, vae, image, res: int, args) -> None:
    """A real run of the node with its defaults (self-attention generator, 5 stages, K/V split, reference loss,
    checkpoint every 100 steps) for `--identity` steps: wall time from the call to the saved file, and peak memory."""
    device = model.load_device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    identity, _, name = host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=image, name="bench",
                                 steps=args.identity, resolution=res, precision=args.precision, overwrite=True)
    seconds = time.perf_counter() - t0
    print(f"identity: {args.identity} steps in {seconds:.1f} s ({seconds / args.identity * 1e3:.1f} ms/step "
          f"including setup and checkpoints), peak memory {identity.training['peak_memory_bytes'] / 2**20:.0f} MiB, "
          f"final loss {identity.training['final_loss']:.4f}, saved {name}"
          f"{' (goal <= 20 s for 600 steps on a GPU)' if args.identity == 600 else ''}")


if __name__ == "__main__":
    sys.exit(main())
