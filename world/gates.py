"""The world checkpoint's gates: sample plain prompts (no identity) through the host's own nodes, read them back.

`python -m world gates [--samples 200]` boots the host in-process, assembles the world checkpoint, and for each
prompt runs CheckpointLoaderSimple → CLIPTextEncode → KSampler → VAEDecode exactly as a user's graph does; the reader
then says what each picture shows. Gates (docs/world.md): scene right ≥ 90 %, each worded attribute right ≥ 80 %,
a person (face) present where the prompt asks for one ≥ 95 %.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captions import Request, prompt
from .read import Reading, read
from .render import FRAMINGS, SCENES, VISIBLE_LOOK, WORDED_HAIR, EYES
from .score import LOOK_ITEMS, shown

GATES = {"scene": 0.90, "attribute": 0.80, "person": 0.95}
SAMPLER = dict(sampler_name="euler", scheduler="normal", steps=20, cfg=5.0)
NEGATIVE = ""


def gate_requests(count: int, seed: int = 7) -> list[Request]:
    """Plain prompts: one in ten asks for an empty scene; the rest a person in a named scene and framing with up to
    three worded attributes that framing shows."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        scene = str(rng.choice(list(SCENES)))
        if i % 10 == 9:
            requests.append(Request(scene=scene, person=False))
            continue
        framing = FRAMINGS[i % len(FRAMINGS)]
        options = [k for k in LOOK_ITEMS if k in VISIBLE_LOOK[framing] or k == "old"]
        requests.append(Request(scene=scene, framing=framing, look=random_request_look(rng, options, 3)))
    return requests


def random_request_look(rng: np.random.Generator, options: list[str], most: int) -> dict:
    """Up to `most` worded attributes of `options` for a gate prompt (never old with a hair colour)."""
    look: dict = {}
    for name in rng.permutation(options)[: int(rng.integers(0, most + 1))]:
        if name == "hair" and "old" not in look:
            look["hair"] = str(rng.choice(WORDED_HAIR))
        elif name == "eyes":
            look["eyes"] = str(rng.choice(list(EYES)))
        elif name == "old" and "hair" not in look:
            look["old"] = True
        elif name in ("glasses", "hat", "smiling"):
            look[str(name)] = True
    return look


@dataclass
class Sampled:
    request: Request
    prompt: str
    image: np.ndarray
    reading: Reading


def sample_texts(host, ckpt_name: str, texts: list[str], seed: int = 0, sampler: dict = SAMPLER, batch: int = 50,
                 size: int = 64) -> list[np.ndarray]:
    """Render plain prompts through the host's nodes, `batch` at a time: each prompt's CLIPTextEncode output becomes
    one row of a batched conditioning (the host pairs row i with latent i), then one KSampler and one VAEDecode per
    batch — a 13.6 M-parameter U-Net on a small latent is ~10× cheaper per picture in batches on a CPU.
    [size, size, 3] pictures in 0..1 (the third world's are 80 px)."""
    import torch
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=ckpt_name)[:3]
    negative = host.run("CLIPTextEncode", clip=clip, text=NEGATIVE)[0]
    out = []
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        encoded = [host.run("CLIPTextEncode", clip=clip, text=t)[0][0] for t in chunk]
        positive = [[torch.cat([c for c, _ in encoded]),
                     {"pooled_output": torch.cat([extra["pooled_output"] for _, extra in encoded])}]]
        latent = host.run("EmptyLatentImage", width=size, height=size, batch_size=len(chunk))[0]
        samples = host.run("KSampler", model=model, seed=seed + start, positive=positive, negative=negative,
                           latent_image=latent, denoise=1.0, **sampler)[0]
        out += list(host.run("VAEDecode", vae=vae, samples=samples)[0].clamp(0, 1).numpy())
    return out


def sample(host, ckpt_name: str, requests: list[Request], seed: int = 0, sampler: dict = SAMPLER,
           subject: str = "person", batch: int = 50) -> list[Sampled]:
    """The second world's plain prompts through the host (sample_texts), each read back."""
    texts = [prompt(r, subject=subject) for r in requests]
    images = sample_texts(host, ckpt_name, texts, seed=seed, sampler=sampler, batch=batch)
    return [Sampled(r, t, im, read(im)) for r, t, im in zip(requests, texts, images)]


def rates(results: list[Sampled]) -> dict[str, tuple[float, int]]:
    """item → (share right, how many prompts asked for it)."""
    tally: dict[str, list[bool]] = {}
    for r in results:
        tally.setdefault("person", []).append(shown(r.reading, "person", r.request.person))
        tally.setdefault("scene", []).append(shown(r.reading, "scene", r.request.scene))
        if r.request.person:
            tally.setdefault("framing", []).append(shown(r.reading, "framing", r.request.framing))
            for item, value in r.request.look.items():
                tally.setdefault(item, []).append(shown(r.reading, item, value))
    return {k: (float(np.mean(v)), len(v)) for k, v in tally.items()}


def verdict(table: dict[str, tuple[float, int]]) -> dict[str, bool]:
    out = {"scene": table["scene"][0] >= GATES["scene"], "person": table["person"][0] >= GATES["person"]}
    for item in LOOK_ITEMS:
        if item in table:
            out[item] = table[item][0] >= GATES["attribute"]
    return out


def save_grid(results: list[Sampled], path: Path, columns: int = 20) -> None:
    from PIL import Image
    rows = (len(results) + columns - 1) // columns
    size = results[0].image.shape[0] if results else 64
    grid = np.ones((rows * (size + 2), columns * (size + 2), 3))
    for i, r in enumerate(results):
        y, x = divmod(i, columns)
        grid[y * (size + 2) + 1:y * (size + 2) + size + 1, x * (size + 2) + 1:x * (size + 2) + size + 1] = r.image
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)


def run(args: argparse.Namespace) -> int:
    from host_boot import embedded_host
    from . import checkpoint
    base = Path(tempfile.mkdtemp(prefix="sefi-world-gates-"))
    folder = base / "models" / "checkpoints"
    folder.mkdir(parents=True)
    host = embedded_host.boot_in_process(base)
    ckpt = checkpoint.build(folder / checkpoint.NAME, args.unet) if args.unet else checkpoint.ensure(folder)
    sampler = {**SAMPLER, "steps": args.sampler_steps, "cfg": args.cfg, "sampler_name": args.sampler}
    results = sample(host, ckpt.name, gate_requests(args.samples, args.seed), seed=args.seed, sampler=sampler)
    table = rates(results)
    passed = verdict(table)
    for item, (share, n) in table.items():
        mark = "" if item not in passed else ("  pass" if passed[item] else "  FAIL")
        print(f"{item:>8}: {share * 100:5.1f} %  of {n}{mark}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gates.json").write_text(json.dumps({"sampler": sampler, "samples": args.samples,
                                                         "seed": args.seed, "rates": table, "passed": passed},
                                                        indent=1))
        save_grid(results, args.out / "gates_grid.png")
        print(f"wrote {args.out / 'gates.json'} and gates_grid.png")
    return 0 if all(passed.values()) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=("second", "third"), default="second",
                        help="the second world (shipped) or the third (world/third/; give --unet until a round of "
                             "its weights is committed)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cfg", type=float, default=SAMPLER["cfg"])
    parser.add_argument("--sampler", default=SAMPLER["sampler_name"])
    parser.add_argument("--sampler-steps", type=int, default=SAMPLER["steps"])
    parser.add_argument("--unet", type=Path, help="U-Net weights to test (default: the committed ones)")
    parser.add_argument("--out", type=Path, help="folder for gates.json and a grid of the samples")
