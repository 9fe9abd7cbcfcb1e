"""The main job on the miniature world: one studio photo of a held-out person → a trained identity → new scenes.

What `make demo` runs when no real checkpoint is given. The person is one the world checkpoint never saw in
pretraining (world/render.held_out_identities); their skin tone, jaw, birthmark and hairline are named by no word,
so any of them appearing in a generated picture was learned from the photo. Each picture gets two scores from the
world's reader: identity (the person's wordless traits recovered) and prompt (scene, framing, attributes as asked).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import sampling
from .captions import Request, prompt
from .read import read
from .render import Facts, Look, Person, face_mask, held_out_identities, render
from .score import identity_fidelity, prompt_fidelity

TRIGGER = "sks"
DEMO_PERSON = 0
# Four prompts, each in another scene than the studio photo; the last two also change a worded attribute.
REQUESTS = (
    Request(scene="beach", framing="head-and-shoulders"),
    Request(scene="forest", framing="close-up"),
    Request(scene="night", framing="head-and-shoulders", look={"hat": True}),
    Request(scene="snow", framing="close-up", look={"glasses": True}),
)
# The identity settings the world needs: its one cross-attention site sits at the full 8 × 8 latent ("all"), and
# its pictures are 64 px. Everything else is the node's default (the paper's method).
TRAIN_SETTINGS = dict(resolution=64, loss_sites="all")
DEMO_STEPS = 150
DEMO_SEED = 0


def studio_photo(person_index: int = DEMO_PERSON) -> tuple[torch.Tensor, torch.Tensor, Facts]:
    """The training photo: a close-up in the plain studio, black hair, brown eyes, no glasses or hat, not smiling.
    Returns IMAGE [1, 64, 64, 3], its face MASK [1, 64, 64] (the world's own: the renderer knows where the face is)
    and the facts."""
    identity = held_out_identities()[person_index]
    look = Look(hair="black", eyes="brown", glasses=False, hat=False, smiling=False, old=False)
    facts = Facts(scene="studio", horizon=5, person=Person(identity=identity, look=look, framing="close-up", x=2,
                                                           y=2, clothes=0))
    return torch.from_numpy(render(facts))[None], torch.from_numpy(face_mask(facts))[None], facts


def write_photo(folder, person_index: int = DEMO_PERSON) -> tuple[str, str]:
    """The studio photo and its face mask as PNG files in `folder` (a ComfyUI input folder), for LoadImage and
    LoadImageMask (channel red). Returns the two file names."""
    from pathlib import Path

    from PIL import Image

    from sefi_core.atomic import atomic_write
    Path(folder).mkdir(parents=True, exist_ok=True)
    photo, mask, _ = studio_photo(person_index)
    names = (f"world_person_{person_index}.png", f"world_person_{person_index}_mask.png")
    pictures = ((photo[0].numpy() * 255).round().astype(np.uint8),
                (mask[0].numpy() * 255).round().astype(np.uint8))
    for name, pixels in zip(names, pictures):
        atomic_write(Path(folder) / name, lambda f, pixels=pixels: Image.fromarray(pixels).save(f, format="PNG"))
    return names


@dataclass
class Scored:
    text: str
    image: np.ndarray
    identity: float | None
    prompt: float


def render_identity(host, model, clip, vae, identity, truth, requests=REQUESTS, seed: int = DEMO_SEED,
                    person: int = DEMO_PERSON) -> list[Scored]:
    """Each request with the identity's trigger, through SeFi Apply Identity and the host's KSampler (world.sampling:
    the benchmark's seed rule), scored against the person's true traits `truth`."""
    texts = [prompt(request, subject=f"{TRIGGER} person") for request in requests]
    seeds = [sampling.sample_seed(seed, person, i) for i in range(len(requests))]
    images = sampling.render(host, model, clip, vae, texts, seeds, identity=identity)
    out = []
    for text, image, request in zip(texts, images, requests):
        reading = read(image)
        out.append(Scored(text, image, identity_fidelity(reading, truth), prompt_fidelity(reading, request)))
    return out


def print_progress(step: int, total: int, loss: float, parts: dict) -> None:
    """The trainer's observer: one line that counts the steps up."""
    print(f"\r  training step {step}/{total}  loss {loss:.4f}", end="\n" if step == total else "", flush=True)


def save_row(images: list[np.ndarray], path) -> None:
    from PIL import Image
    row = np.concatenate([np.pad(im, ((2, 2), (2, 2), (0, 0)), constant_values=1.0) for im in images], axis=1)
    Image.fromarray((row * 255).round().astype(np.uint8)).resize((row.shape[1] * 4, row.shape[0] * 4),
                                                                 Image.NEAREST).save(path)


def main(out, steps: int | None = None) -> int:
    """Boot the host, assemble the world checkpoint, train the demo identity, render and score; print the files."""
    import tempfile
    import time
    from pathlib import Path
    from host_boot import embedded_host
    from . import checkpoint
    print("Miniature world (docs/world.md): a checkpoint trained here from scratch on 8×8-cell pictures of people in "
          "scenes.\nIt shows the method's mechanics with exact scores, not photographs. For real pictures run\n"
          "  make demo CKPT=/path/to/sd15_or_sdxl.safetensors", flush=True)
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="sefi-world-demo-"))
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "sefi_identities").mkdir(parents=True)
    host = embedded_host.boot_in_process(base, device="auto")
    ckpt = checkpoint.ensure(embedded_host.REPO_ROOT / ".cache" / "world")
    (base / "models" / "checkpoints" / ckpt.name).symlink_to(ckpt)
    print(f"host: {embedded_host.host_label()}; checkpoint: {ckpt}", flush=True)
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]

    photo, world_mask, facts = studio_photo()
    truth = facts.person.identity
    print(f"held-out person {DEMO_PERSON} (never seen in pretraining): skin tone {truth.skin:.2f}, {truth.jaw} jaw, "
          f"birthmark {truth.mark}, {truth.hairline} hairline — no word names these", flush=True)
    found = host.run("SeFiFaceMask", image=photo, backend="auto", which_face="largest", face_index=0,
                     mask_shape="box", grow=0, feather=0, crop_size=64, crop_margin=0.25, on_no_face="skip",
                     insightface_pack="antelopev2")[3]
    if found:
        print(f"SeFi Face Mask found {found} face(s); the trainer gets the world's exact mask all the same", flush=True)
    else:
        print("SeFi Face Mask finds no face in an 8×8-cell drawing (its detectors are trained on photographs): the "
              "trainer gets the world's own face mask, which the renderer knows exactly", flush=True)
    identity, curve, filename = host.run(
        "SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, mask=world_mask, name="world_demo",
        trigger=TRIGGER, initializer="person", steps=steps or DEMO_STEPS, learning_rate=0.0, overwrite=True,
        seed=0, checkpoint_every=max((steps or DEMO_STEPS) // 2, 1), observer=print_progress, **TRAIN_SETTINGS)[:3]
    scored = render_identity(host, model, clip, vae, identity, truth)
    out = Path(out)
    (out / filename).write_bytes((base / "models" / "sefi_identities" / filename).read_bytes())
    save_row([photo[0].numpy()] + [s.image for s in scored], out / "demo_grid.png")
    curve_image = (curve[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    from PIL import Image
    Image.fromarray(curve_image).save(out / "demo_loss_curve.png")
    print(f"\n{'picture':<72} identity  prompt")
    for s in scored:
        ident = "   -  " if s.identity is None else f"{s.identity * 100:5.0f} %"
        print(f"{s.text:<72} {ident}  {s.prompt * 100:4.0f} %")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    print(f"identity file : {out / filename}")
    print(f"image grid    : {out / 'demo_grid.png'} (the studio photo, then the four prompts above)")
    print(f"loss curve    : {out / 'demo_loss_curve.png'}")
    print("identity = share of the person's wordless traits the picture shows (skin tone by closeness); prompt = "
          "share of what the prompt asks (scene, framing, attributes) that the picture shows.")
    return 0
