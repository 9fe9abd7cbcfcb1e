"""The demo on the third world: one studio photo of a held-out, unnamed person → SeFi Train Identity → four prompts,
each beside the same prompt with plain "person" and the same seed (the control), with identity, prompt and chance.

`make demo DEMO_ARGS="--world third --unet RUN/weights/unet.safetensors"` until a round of the third world's weights
is committed (then `--world third` alone). The person is test person DEMO_PERSON (world/third/roster.py): never in
pretraining, named by no caption, so whatever of their skin tone, brow, nose, ear and mark the pictures show beyond
the control's was learned from the photo. The control shows what the prompt alone draws; chance is what a random
person's traits would score in that framing and view (world/third/score.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import sampling
from ..demo import print_progress, save_row
from ..render import Look
from .captions import Request, prompt
from .read import read
from .render import CELL, GRID, Facts, Person, face_mask, render
from .roster import held_out_identities
from .score import chance_fidelity, identity_fidelity, prompt_fidelity

TRIGGER = "sks"
DEMO_PERSON = 0
DEMO_SEED = 0
DEMO_STEPS = 150
SIZE = GRID * CELL
# Another scene; a side view; an attribute edit; a second scene and framing (with a turned head).
REQUESTS = (
    Request(scene="beach", framing="close-up"),
    Request(scene="forest", framing="close-up", view="profile-left"),
    Request(scene="night", framing="close-up", look={"hat": True}),
    Request(scene="snow", framing="head-and-shoulders", view="three-quarter-right"),
)
TRAIN_SETTINGS = dict(resolution=SIZE, loss_sites="all", flip_augmentation=False)
"""What the world needs of the node (everything else is its default, the paper's method): 80 px pictures, its one
attention site at the full latent, and no flips (a flip moves the mark to the other cheek)."""


def studio_photo(person_index: int = DEMO_PERSON) -> tuple[torch.Tensor, torch.Tensor, Facts]:
    """The training photo: a front close-up in the plain studio, black hair, brown eyes, no glasses, hat or smile.
    IMAGE [1, 80, 80, 3], its face MASK [1, 80, 80] (the world's own) and the facts."""
    identity = held_out_identities()[person_index]
    look = Look(hair="black", eyes="brown", glasses=False, hat=False, smiling=False, old=False)
    person = Person(identity=identity, look=look, framing="close-up", view="front", x=3, y=GRID - 6, clothes=0)
    facts = Facts(scene="studio", people=(person,))
    return torch.from_numpy(render(facts))[None], torch.from_numpy(face_mask(facts))[None], facts


@dataclass
class Pair:
    request: Request
    text: str
    control_text: str
    image: np.ndarray
    control: np.ndarray
    identity: float | None
    control_identity: float | None
    prompt: float
    control_prompt: float
    chance: float


def render_pairs(host, model, clip, vae, identity, truth, requests=REQUESTS, seed: int = DEMO_SEED,
                 person: int = DEMO_PERSON) -> list[Pair]:
    """Each request with the trained identity and, at the same seed, with plain "person" (world.sampling's rule)."""
    texts = [prompt(r, subject=f"{TRIGGER} person") for r in requests]
    controls = [prompt(r) for r in requests]
    seeds = [sampling.sample_seed(seed, person, i) for i in range(len(requests))]
    images = sampling.render(host, model, clip, vae, texts, seeds, identity=identity, size=SIZE)
    control_images = sampling.render(host, model, clip, vae, controls, seeds, size=SIZE)
    out = []
    for r, t, c, im, cim in zip(requests, texts, controls, images, control_images):
        reading, control = read(im), read(cim)
        out.append(Pair(r, t, c, im, cim, identity_fidelity(reading, truth), identity_fidelity(control, truth),
                        prompt_fidelity(reading, r), prompt_fidelity(control, r),
                        chance_fidelity(r.framing, r.view or "front")))
    return out


def _percent(value: float | None) -> str:
    return "   -  " if value is None else f"{value * 100:5.0f} %"


def report(pairs: list[Pair]) -> str:
    lines = [f"{'prompt':<66} {'identity':>9} {'control':>8} {'chance':>7} {'prompt':>7} {'control':>8}"]
    for p in pairs:
        lines.append(f"{p.text:<66} {_percent(p.identity):>9} {_percent(p.control_identity):>8} "
                     f"{p.chance * 100:6.0f} % {p.prompt * 100:6.0f} % {p.control_prompt * 100:7.0f} %")

    def mean(values):
        return float(np.mean([v or 0.0 for v in values]))

    lines.append(f"{'mean':<66} {mean(p.identity for p in pairs) * 100:7.0f} % "
                 f"{mean(p.control_identity for p in pairs) * 100:6.0f} % "
                 f"{mean(p.chance for p in pairs) * 100:6.0f} % {mean(p.prompt for p in pairs) * 100:6.0f} % "
                 f"{mean(p.control_prompt for p in pairs) * 100:7.0f} %")
    return "\n".join(lines)


def main(out, steps: int | None = None, unet_weights: Path | None = None) -> int:
    """Boot the host, assemble the third world's checkpoint, train the demo identity, render, score, print."""
    import tempfile
    from host_boot import embedded_host
    from . import checkpoint
    print("Third miniature world (docs/world.md): named people, head views and two people on 10×10 cells; the demo "
          "person is held out of pretraining and named by no caption.", flush=True)
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="sefi-world3-demo-"))
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "sefi_identities").mkdir(parents=True)
    ckpt = checkpoint.ensure(embedded_host.REPO_ROOT / ".cache" / "world", unet_weights)
    host = embedded_host.boot_in_process(base, device="auto")
    (base / "models" / "checkpoints" / ckpt.name).symlink_to(ckpt)
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]
    photo, mask, facts = studio_photo()
    truth = facts.people[0].identity
    print(f"held-out person {DEMO_PERSON}: skin tone {truth.skin:.2f}, brow tint {truth.brow}, nose tint "
          f"{truth.nose}, ear tint {truth.ear}, mark {truth.mark} — no word names these", flush=True)
    identity, curve, filename = host.run(
        "SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, mask=mask, name="world3_demo",
        trigger=TRIGGER, initializer="person", steps=steps or DEMO_STEPS, learning_rate=0.0, overwrite=True,
        seed=DEMO_SEED, checkpoint_every=0, observer=print_progress, **TRAIN_SETTINGS)[:3]
    pairs = render_pairs(host, model, clip, vae, identity, truth)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / filename).write_bytes((base / "models" / "sefi_identities" / filename).read_bytes())
    save_row([photo[0].numpy()] + [im for p in pairs for im in (p.image, p.control)], out / "demo3_grid.png")
    print("\n" + report(pairs))
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    print(f"image grid : {out / 'demo3_grid.png'} (the studio photo, then each prompt: SeFi, then the control)")
    print("identity = share of the person's wordless traits the picture's view shows (skin by closeness); control = "
          "the same prompt with plain 'person', same seed, no identity; chance = a random person's traits in that "
          "framing and view; prompt = share of what the prompt asks that the picture shows. A picture the reader "
          "rejects (off the world's palette) scores 0.")
    return 0
