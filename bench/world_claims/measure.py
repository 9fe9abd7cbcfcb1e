"""One run of the claims benchmark: train an identity through SeFi Train Identity on one studio photo of a held-out
person, render every prompt through SeFi Apply Identity and KSampler, read each picture back, and measure where the
identity token's cross-attention falls (the paper's "attention overfit" as a number)."""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np
import torch

from world import sampling
from world.captions import prompt
from world.demo import TRAIN_SETTINGS, studio_photo
from world.read import read
from world.render import CELL, GRID
from world.score import asked, identity_fidelity, prompt_fidelity, shown

from .plan import MOVES, TRIGGER, Run, variant
from .provenance import cache_key, provenance

PROBE_FRACTIONS = (0.25, 0.5, 0.75)
"""Where in the schedule the attention is probed: one timestep in each of the early, middle and late bands (the
stages hand the identity different tokens there)."""
PICTURE_FRACTION = 0.5


class World:
    """A booted host with the world checkpoint loaded: what every run shares. `weights`: the U-Net weights the
    checkpoint was built from (its recipe and hash go into every run's cache key and provenance)."""

    def __init__(self, host, checkpoint_name: str, host_label: str, weights: Path | None = None):
        from world import checkpoint
        self.host, self.host_label = host, host_label
        self.weights = Path(weights) if weights is not None else checkpoint.UNET_WEIGHTS
        self.recipe = checkpoint.recipe(self.weights)
        self.model, self.clip, self.vae = host.run("CheckpointLoaderSimple", ckpt_name=checkpoint_name)[:3]
        pack = host.pack_module.__name__
        self.training = importlib.import_module(f"{pack}.nodes.training")
        # the class, from the pack as the host loaded it (the trainer's own TrainSettings, not a second copy)
        self.TrainSettings = importlib.import_module(f"{pack}.sefi_core.training").TrainSettings
        self.maps = importlib.import_module(f"{pack}.sefi_core.attention_picture")
        self.negative = host.run("CLIPTextEncode", clip=self.clip, text="")[0]


def boot_world(base: Path) -> World:
    """Boot the host in this process (base directory `base`) and load the world checkpoint, assembled if needed."""
    from host_boot import embedded_host
    from world import checkpoint
    base = Path(base)
    for folder in ("checkpoints", "sefi_identities"):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    host = embedded_host.boot_in_process(base, device="auto")
    ckpt = checkpoint.ensure(checkpoint.CACHE_FOLDER)
    link = base / "models" / "checkpoints" / ckpt.name
    if not link.exists():
        link.symlink_to(ckpt)
    return World(host, ckpt.name, embedded_host.host_label())


def run_key(run: Run, steps: int, recipe: str, moves=MOVES) -> str:
    """The cache key of one run: its variant's settings, person, seed, steps, prompts and the world's recipe."""
    v = variant(run.variant)
    settings = {"name": v.name, "train": {**TRAIN_SETTINGS, **v.settings}, "weight": v.weight}
    prompts = [[prompt(m.request, subject=f"{TRIGGER} person"), list(m.moves)] for m in moves]
    return cache_key(settings, run.person, run.seed, steps, prompts, recipe)


def sample_seed(run: Run, index: int) -> int:
    """The same sampling noise for every variant at one (person, seed, prompt): variants differ only in training
    (world.sampling's one seed rule, which the demo uses too)."""
    return sampling.sample_seed(run.seed, run.person, index)


def train(world: World, run: Run, steps: int):
    """The identity of `run` and the gradient shares the trainer logged: [(step, attention share)]."""
    photo, mask, _ = studio_photo(run.person)
    shares = []

    def hook(step, total, loss, parts):
        if "grad_share_attention" in parts:
            shares.append((int(step), float(parts["grad_share_attention"])))

    identity = world.host.run(
        "SeFiTrainIdentity", model=world.model, clip=world.clip, vae=world.vae, images=photo, mask=mask,
        name=run.key, trigger=TRIGGER, initializer="person", steps=steps, learning_rate=0.0, overwrite=True,
        seed=run.seed, checkpoint_every=0, preview_every=0, observer=hook, **TRAIN_SETTINGS,
        **variant(run.variant).settings)[0]
    return identity, shares


def render(world: World, identity, run: Run, moves=MOVES) -> list[np.ndarray]:
    """Each move's prompt with the identity's trigger: [64, 64, 3] pictures in 0..1."""
    texts = [prompt(move.request, subject=f"{TRIGGER} person") for move in moves]
    return sampling.render(world.host, world.model, world.clip, world.vae, texts,
                           [sample_seed(run, i) for i in range(len(moves))], identity=identity,
                           size=GRID * CELL, negative=world.negative)


def face_cells(face_box) -> np.ndarray:
    """The reader's face box as a [GRID, GRID] cell mask (zeros when there is no face)."""
    cells = np.zeros((GRID, GRID), np.float32)
    if face_box is not None:
        r0, c0, r1, c1 = face_box
        cells[r0:r1, c0:c1] = 1.0
    return cells


def face_shares(world: World, identity, pictures: list[np.ndarray], faces: list[np.ndarray], seed: int):
    """For each picture, the share of the identity token's cross-attention mass that falls inside its face cells
    (mean over PROBE_FRACTIONS of the schedule, fixed noise from `seed`; None where there is no face), measured with
    the trainer's own step at its loss sites; and the (identity, reference) maps of the first picture at
    PICTURE_FRACTION, for the attention picture."""
    th, res = world.training, GRID * CELL
    settings = world.TrainSettings(steps=1, resolution=res, loss_sites=TRAIN_SETTINGS["loss_sites"], flip=False,
                                   seed=0, checkpoint_every=0, precision="fp32")
    images = torch.from_numpy(np.stack(pictures)).float()
    masks = torch.from_numpy(np.stack([np.repeat(np.repeat(f, CELL, 0), CELL, 1) for f in faces]))
    vectors = identity.tokens["clip_l"].shape[2]
    shares, first_maps = [], None
    with torch.inference_mode(), th.training_context(world.model, world.clip):
        step = th.SefiStep(world.model, world.clip, world.vae, images, masks, settings, identity.trigger, vectors,
                           initializer=identity.initializer)
        tokens = {k: v.float().to(world.model.load_device) for k, v in identity.tokens.items()}
        positions = step.identity_positions()
        noise = torch.randn(step.latents.shape[1:], generator=torch.Generator().manual_seed(seed))[None]
        for i, face in enumerate(faces):
            if face.sum() == 0:
                shares.append(None)
                continue
            grid = torch.from_numpy(face)
            values = []
            for fraction in PROBE_FRACTIONS:
                records = step.attention_records(tokens, i, int(len(step.sigmas) * fraction), noise)
                id_map, ref_map = world.maps.face_maps([r[3] for r in records], [r[4] for r in records], positions,
                                                       step.latent_hw, (GRID, GRID))
                values.append(float((id_map * grid).sum() / id_map.sum().clamp_min(1e-30)))
                if i == 0 and fraction == PICTURE_FRACTION:
                    first_maps = (id_map, ref_map)
            shares.append(float(np.mean(values)))
    return shares, first_maps


def measure(world: World, run: Run, steps: int, moves=MOVES) -> tuple[dict, dict]:
    """Train, render, read and probe one run. Returns (result, pictures): the JSON-able result and the arrays
    worth keeping for the report (the row of pictures, the photo's attention maps)."""
    started = time.perf_counter()
    identity, grad_shares = train(world, run, steps)
    trained = time.perf_counter() - started
    photo, mask, facts = studio_photo(run.person)
    truth = facts.person.identity
    pictures = render(world, identity, run, moves)
    readings = [read(p) for p in pictures]
    photo_face = mask[0].numpy().reshape(GRID, CELL, GRID, CELL).mean(axis=(1, 3))
    faces = [photo_face] + [face_cells(r.face_box) for r in readings]
    overfit, photo_maps = face_shares(world, identity, [photo[0].numpy()] + pictures, faces, seed=run.seed)
    rows = []
    for move, reading, share in zip(moves, readings, overfit[1:]):
        items = asked(move.request)
        rows.append({
            "prompt": prompt(move.request, subject=f"{TRIGGER} person"),
            "moves": list(move.moves),
            "identity": identity_fidelity(reading, truth),
            "prompt_fidelity": prompt_fidelity(reading, move.request),
            "items": {k: bool(shown(reading, k, v)) for k, v in items.items()},
            "face_share": share,
            "read": {"scene": reading.scene, "framing": reading.framing, "look": reading.look,
                     "identity": reading.identity},
        })
    result = {
        "run": run.key, "variant": run.variant, "person": run.person, "seed": run.seed, "steps": steps,
        "cache_key": run_key(run, steps, world.recipe, moves),
        "provenance": provenance(world.host_label, world.weights, world.recipe),
        "host": world.host_label, "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": identity.training.get("final_loss"), "grad_shares": grad_shares,
        "photo_face_share": overfit[0], "pictures": rows,
    }
    return result, {"photo": photo[0].numpy(), "pictures": pictures, "photo_maps": photo_maps}
