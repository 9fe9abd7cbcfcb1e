"""One SeFi training step vs one plain textual-inversion step, side by side, on the same model/resolution/precision.

SeFi step: self-attention generator → K and V tokens through ONE CLIP forward (batch 2) → U-Net with the K/V split and the
face-wise attention loss (same-Q reference maps at the loss sites) → backward → AdamW.
TI step: one free vector → 1 CLIP encode → U-Net (no K/V split, no attention capture) → backward → AdamW.
Both run through nodes/training and the real training loop (same frozen-weight handling, same host), so the ratio
isolates SeFi's extra work. Prints ms/step (mean over the timed steps, after 2 warm-up steps), the ratio
(goal ≤ 1.15) and peak memory, for each of the loop's speed modes asked for (`--modes eager,sync,compile`), and
with `--batch-sizes 1,2,4` ms per step / per sample / per 600-sample identity for each batch size.

    python -m bench.train_step                      # tiny checkpoint on CPU, 64 px (builds it in .cache/tiny)
    python -m bench.train_step --full-sd15          # real-size SD1.5 UNet, random weights, 512 px — for GPU runs
    python -m bench.train_step --identity 600       # also time a real default-length SeFiTrainIdentity run
    python -m bench.train_step --modes eager,sync,compile --batch-sizes 1,2,4    # every speed option
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

from host_boot import embedded_host  # noqa: E402
from tools import tiny_checkpoints  # noqa: E402

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


def model_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    """The arguments every model bench takes: which model (tiny by default), resolution and steps."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--full-sd15", action="store_true", help="SD1.5's U-Net architecture, random weights, 512 px")
    ap.add_argument("--checkpoint", type=Path, help="a real SD1.5 checkpoint (e.g. the world's) instead")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=steps)
    return ap


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


MODES = ("eager", "sync", "compile")
"""eager: the loop read back every step, the single-tensor/foreach AdamW (the path before the speed work); sync: the
loop's accelerator path (fused AdamW, `DEFERRED_SYNC_STEPS` steps read back at once, sefi_core.step_sync); compile:
sync plus the node's compile_unet (regional torch.compile, CUDA graphs on a GPU)."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-sd15", action="store_true", help="real-size SD1.5 UNet at 512 px (GPU)")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="compute precision of the frozen models (the node's `precision` input)")
    ap.add_argument("--modes", default="eager", help=f"comma-separated, from {','.join(MODES)}: each times TI "
                    "and SeFi side by side (default: eager)")
    ap.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes for SeFi in the last mode of "
                    "--modes: ms per step, per sample and per identity at the default sample budget (600 samples)")
    ap.add_argument("--identity", type=int, default=0, metavar="N",
                    help="afterwards, time a whole N-step SeFiTrainIdentity run with the node's defaults "
                         "(600 = a default-length identity); 0 = skip")
    ap.add_argument("--identity-compile", action="store_true", help="run the --identity run with compile_unet "
                    "on (after the benches: the compile caches are warm, as for a user's second identity)")
    ap.add_argument("--separate-kv", action="store_true", help="SeFi encodes K and V in two CLIP forwards "
                    "(the pre-batching behaviour, for comparison)")
    args = ap.parse_args(argv)
    res = args.resolution or (512 if args.full_sd15 else 64)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not modes or any(m not in MODES for m in modes) or not batches or min(batches) < 1:
        ap.error(f"--modes takes {','.join(MODES)}; --batch-sizes positive integers")

    host, src = boot_bench_host(args.full_sd15)
    import dataclasses
    import importlib
    pkg = host.pack_module.__name__
    th = importlib.import_module(f"{pkg}.nodes.training")
    tr = importlib.import_module(f"{pkg}.sefi_core.training")
    gen = importlib.import_module(f"{pkg}.sefi_core.generator")
    step_sync = importlib.import_module(f"{pkg}.sefi_core.step_sync")
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=src.name)[:3]
    image = torch.rand(1, res, res, 3, generator=torch.Generator().manual_seed(0))
    device = model.load_device

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def run(step_fn, make_generator, settings, mode):
        """(ms per step, one-time seconds of the 2 warm-up steps, peak bytes) through the real training loop."""
        # sync/compile: what the loop chooses on a GPU (step_sync.choose_sync): fp16 reads every step for its scale
        deferred = 1 if settings.precision == "fp16" else step_sync.DEFERRED_SYNC_STEPS
        loop = dict(fused=False, sync_every=1) if mode == "eager" else dict(fused=True, sync_every=deferred)
        with step_fn.unet.compiled(mode == "compile"):
            t0 = synced()
            tr.run_training(make_generator(), step_fn, dataclasses.replace(settings, steps=2), **loop)
            warm = synced() - t0
            th.reset_peak_memory(device)
            t0 = synced()
            tr.run_training(make_generator(), step_fn, dataclasses.replace(settings, steps=args.steps), **loop)
            ms = (synced() - t0) / args.steps * 1e3
        return ms, warm, th.peak_memory_bytes(device)

    with torch.inference_mode(), th.training_context(model, clip, args.precision) as dtype:
        pixels = th.fit_image(image, res)
        init = th.TextEncoder(clip).initializer_embeddings("person")
        steps_fns = {}
        for label, kind, stages, kv, att in (("TI", "direct", 1, False, "off"),
                                             ("SeFi", "self_attention", 5, True, "reference")):
            # grad_share_every=0: the plain step (a logging step adds one backward per term, every 25th step)
            s = tr.TrainSettings(steps=1, resolution=res, flip=False, attention_loss=att, grad_share_every=0,
                                 checkpoint_every=0, precision=th.DTYPE_NAMES[dtype],
                                 lr=1e-4 if kind == "self_attention" else 5e-3)
            step = th.SefiStep(model, clip, vae, pixels, None, s, "sks", 1)
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

            def make(kind=kind, stages=stages, kv=kv):
                return gen.build_generator(kind, init, stages=stages, vectors_per_token=1, kv_split=kv).to(device)
            steps_fns[label] = (step, make, s)

        print(f"host: {embedded_host.host_label()}; device {device}; compute {dtype}; {res} px; "
              f"{'full SD1.5 UNet' if args.full_sd15 else 'tiny UNet'}; {args.steps} timed steps per variant")
        cpu_note = " (process RSS high-water mark)" if device.type == "cpu" else ""
        for mode in modes:
            results = {}
            for label, (step, make, s) in steps_fns.items():
                results[label] = run(step, make, s, mode)
                ms, warm, peak = results[label]
                print(f"{label:5s} [{mode:7s}] {ms:9.1f} ms/step   peak memory {mib(peak):>12s}{cpu_note}   "
                      f"(2 warm-up steps: {warm:.1f} s{', compiling included' if mode == 'compile' else ''})")
            ti, sefi = results["TI"][0], results["SeFi"][0]
            print(f"ratio SeFi/TI [{mode}] = {sefi / ti:.3f} (goal <= 1.15)"
                  f"{'  [K/V in two CLIP forwards]' if args.separate_kv else ''}")
        if batches != [1]:
            mode = modes[-1]
            step, make, s = steps_fns["SeFi"]
            samples = 600  # the default identity's sample budget: 600 steps at batch 1
            for b in batches:
                step.settings.batch_size = b  # SefiStep draws settings.batch_size samples per step
                ms, warm, peak = run(step, make, dataclasses.replace(s, batch_size=b), mode)
                n = -(-samples // b)
                print(f"batch {b:2d} [{mode}]: {ms:8.1f} ms/step, {ms / b:7.1f} ms/sample, {n} steps x {ms:.1f} ms = "
                      f"{n * ms / 1e3:6.1f} s per identity of {samples} samples (loop only), peak {mib(peak)}")
            step.settings.batch_size = 1
    if args.identity:
        _time_identity(host, model, clip, vae, image, res, args)
    return 0


def mib(peak: int | None) -> str:
    """A peak in MiB, or why there is none (the CPU off Linux, or a kernel that refuses the reset)."""
    return "not measured" if peak is None else f"{peak / 2**20:.0f} MiB"


def _time_identity(host, model, clip, vae, image, res: int, args) -> None:
    """A real run of the node with its defaults (self-attention generator, 5 stages, K/V split, reference loss,
    checkpoint every 100 steps) for `--identity` steps: wall time from the call to the saved file, and peak memory."""
    device = model.load_device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    # the random picture holds no face a detector finds: a whole-picture face mask marks it as the face
    identity, _, name = host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=image,
                                 mask=torch.ones(image.shape[:3]), name="bench", steps=args.identity, resolution=res,
                                 precision=args.precision, overwrite=True, compile_unet=args.identity_compile)[:3]
    seconds = time.perf_counter() - t0
    print(f"identity: {args.identity} steps in {seconds:.1f} s ({seconds / args.identity * 1e3:.1f} ms/step "
          f"including setup and checkpoints), peak memory {mib(identity.training.get('peak_memory_bytes'))}, "
          f"final loss {identity.training['final_loss']:.4f}, compile_unet {args.identity_compile}, saved {name}"
          f"{' (goal <= 20 s for 600 steps on a GPU)' if args.identity == 600 else ''}")


if __name__ == "__main__":
    sys.exit(main())
