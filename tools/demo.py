"""`make demo`: the main job on the embedded host — face photo → face mask → trained identity → image grid.

Without --checkpoint it runs in the miniature world (world/, docs/world.md): a small checkpoint trained here from
scratch on rendered people in scenes, where a held-out person's studio photo becomes an identity and every generated
picture is scored by the world's reader. It shows the mechanics, not photographs; it says so. With a real SD1.5/SDXL
checkpoint it trains with full settings on a face photo, by default scikit-image's bundled astronaut portrait (NASA,
public domain). `--tiny` runs the old install check on the tiny random-weight model instead.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from host_boot import embedded_host
from tools import tiny_checkpoints

PROMPTS = (
    "a photo of {t} person on a beach at sunset",
    "a portrait of {t} person as an old man, wrinkles, grey hair",
    "a photo of {t} person laughing, in a busy street",
    "a side view photo of {t} person, profile, in a library",
)


def load_photo(path: Path | None) -> tuple[torch.Tensor, str]:
    from PIL import Image
    if path is None:
        from skimage import data
        array = data.astronaut()
        source = "scikit-image's astronaut (NASA photo of Eileen Collins, public domain)"
    else:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        source = str(path)
    return torch.from_numpy(array.astype(np.float32) / 255.0)[None], source


def save_grid(images: torch.Tensor, path: Path, columns: int = 2) -> None:
    from PIL import Image
    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.5 or SDXL .safetensors checkpoint")
    parser.add_argument("--photo", type=Path, help="a face photo (default: the bundled astronaut)")
    parser.add_argument("--out", type=Path, default=embedded_host.REPO_ROOT / "demo-output")
    parser.add_argument("--steps", type=int, help="training steps (default: 600 real, world's own, 30 tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight model instead of the world")
    parser.add_argument("--world", choices=("second", "third"), default="second",
                        help="which miniature world (the third is in pretraining: docs/world.md)")
    parser.add_argument("--unet", type=Path, help="the third world's U-Net weights (a pretraining run's "
                                                  "weights/unet.safetensors until a round is committed)")
    args = parser.parse_args(argv)

    real = args.checkpoint is not None
    if real and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint} does not exist")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not real and not args.tiny and args.world == "third":
        from world.third.demo import main as third_world_demo
        return third_world_demo(out, args.steps, args.unet)
    if not real and not args.tiny:
        from world.demo import main as world_demo
        return world_demo(out, args.steps)
    base = Path(tempfile.mkdtemp(prefix="sefi-demo-"))
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if real:
        ckpt = args.checkpoint.resolve()
    else:
        cache = embedded_host.REPO_ROOT / ".cache" / "tiny"
        print("No --checkpoint given: using the tiny random-weight SD1.5 model. This proves the install "
              "(every node runs inside a real ComfyUI) but cannot learn a likeness; run\n"
              "  make demo CKPT=/path/to/sd15_or_sdxl.safetensors\nfor real results.", flush=True)
        ckpt = cache / tiny_checkpoints.SD15_NAME
        if not ckpt.exists():
            import subprocess
            subprocess.run([sys.executable, "-m", "tools.tiny_checkpoints", str(cache)], check=True)
    (checkpoints / ckpt.name).symlink_to(ckpt)
    (base / "models" / "sefi_identities").mkdir(parents=True)

    started = time.perf_counter()
    host = embedded_host.boot_in_process(base, device="auto")  # train on the accelerator when there is one
    print(f"host: {embedded_host.host_label()}", flush=True)
    photo, source = load_photo(args.photo)
    print(f"face photo: {source}", flush=True)
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]

    mask, crops, crop_masks, count = host.run(
        "SeFiFaceMask", image=photo, backend="auto", which_face="largest", face_index=0,
        mask_shape="landmark hull", grow=0, feather=4, crop_size=512, crop_margin=0.25, on_no_face="error",
        insightface_pack="antelopev2")
    print(f"faces found: {count}; training on the aligned crop", flush=True)

    steps = args.steps or (600 if real else 30)
    resolution = 512 if real else 64
    settings = dict(name="demo_identity", trigger="sks", initializer="person", steps=steps, learning_rate=0.0,
                    stages=5, vectors_per_token=1, parametrisation="self-attention generator", kv_split=True,
                    attention_loss="reference", attention_weight=0.003, loss_sites="quarter",
                    masked_diffusion_loss=False, prompt_templates="a photo of the face of {}",
                    flip_augmentation=False, scale_augmentation=False, seed=0, resolution=resolution,
                    batch_size=1, checkpoint_every=max(steps // 4, 1), resume_from="", overwrite=True)
    if not real:  # the tiny model needs a bigger step size to move visibly in a few steps
        settings.update(parametrisation="direct tokens", learning_rate=0.05, loss_sites="all")
    hook = lambda step, total, loss, parts: print(  # noqa: E731
        f"\r  training step {step}/{total}  loss {loss:.4f}", end="\n" if step == total else "", flush=True)
    identity, curve, filename = host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=crops,
                                         mask=crop_masks, observer=hook, **settings)[:3]
    identity_file = base / "models" / "sefi_identities" / filename
    kept_identity = out / filename
    kept_identity.write_bytes(identity_file.read_bytes())

    size = 512 if real else 64
    negative = host.run("CLIPTextEncode", clip=clip, text="blurry, lowres, deformed")[0]
    images = []
    for i, prompt in enumerate(PROMPTS):
        text = prompt.format(t=identity.trigger)
        print(f"[{i + 1}/{len(PROMPTS)}] {text}", flush=True)
        patched, positive = host.run("SeFiApplyIdentity", model=model, clip=clip, identity=identity, text=text,
                                     strength=1.0, start_percent=0.0, end_percent=1.0)
        latent = host.run("EmptyLatentImage", width=size, height=size, batch_size=1)[0]
        samples = host.run("KSampler", model=patched, seed=42, steps=25 if real else 4, cfg=6.0,
                           sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                           latent_image=latent, denoise=1.0)[0]
        images.append(host.run("VAEDecode", vae=vae, samples=samples)[0])
    grid = out / "demo_grid.png"
    save_grid(torch.cat(images), grid)
    save_grid(curve, out / "demo_loss_curve.png", columns=1)
    save_grid(crops[:1], out / "demo_face_crop.png", columns=1)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    print(f"identity file : {kept_identity}")
    print(f"image grid    : {grid}  (prompts: {'; '.join(p.format(t='sks') for p in PROMPTS)})")
    print(f"loss curve    : {out / 'demo_loss_curve.png'}")
    print(f"face crop     : {out / 'demo_face_crop.png'}")
    if not real:
        print("Reminder: these images come from the tiny random model and are noise by design. "
              "Run `make demo CKPT=/path/to/checkpoint.safetensors` for real pictures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
