"""The third world's gates: plain prompts (no trained identity) through the host's own nodes, read back — and the
expressibility gate, textual inversion on four photos of a held-out person.

`python -m world gates --world third --unet RUN/weights/unet.safetensors` (docs/world.md, "The third world"). Every
prompt runs CheckpointLoaderSimple → CLIPTextEncode → KSampler → VAEDecode as a user's graph does (world.gates.
sample_texts); the reader says what each picture shows, a rejected picture counts as wrong for every item. Gates:
the second world's (person ≥ 95 %, scene ≥ 90 %, each worded attribute ≥ 80 %), plus
- a named person's wordless traits drawn right ≥ 90 % (of the traits each picture's view shows; skin within
  score.SKIN_RIGHT);
- the view asked for ≥ 85 %;
- two named people both right ≥ 80 %: per prompt the smaller of the two sides' trait shares, each person read on
  the side the caption names them (the first on the left);
- the median fit error under the reader's threshold, and under 5 % of the pictures rejected.
The expressibility gate (`--expressibility`): SeFi Train Identity as textual inversion (one direct token, no stages,
no K/V split, no attention loss), EXPRESSIBILITY_STEPS steps on four photos of one held-out person in different
scenes and views, then EXPRESSIBILITY_PROMPTS prompts: identity ≥ 80 % — the world can carry an identity at all.
Its person is a validation person by default (roster.VALIDATION_PEOPLE), never a test person's settings.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from ..gates import NEGATIVE, SAMPLER, Sampled, random_request_look, sample_texts, save_grid
from ..render import SCENES
from .captions import Request, prompt, request_facts
from .read import REJECT_THRESHOLD, read
from .render import CELL, FRAMING_LAYOUT, FRAMINGS, GRID, face_mask, render, visible_look
from .roster import ROSTER, VALIDATION_PEOPLE, held_out_identities
from .score import LOOK_ITEMS, chance_fidelity, identity_fidelity, shown, traits_right

GATES = {"person": 0.95, "scene": 0.90, "attribute": 0.80, "named_traits": 0.90, "view": 0.85, "pair_both": 0.80,
         "rejected": 0.05, "identity": 0.80}
SIZE = GRID * CELL
EXPRESSIBILITY_STEPS = 600
EXPRESSIBILITY_PROMPTS = 8
TI_SETTINGS = dict(parametrisation="direct tokens", stages=1, kv_split=False, attention_loss="off")
WORLD_SETTINGS = dict(resolution=SIZE, loss_sites="all", flip_augmentation=False)
"""The world needs: 80 px pictures, all its attention sites (each at the full latent), and no flips (a flip moves a
mark to the other cheek and turns a view to the other side)."""
NAMES = tuple(ROSTER)


def gate_requests(count: int, seed: int = 7) -> list[Request]:
    """Plain prompts: one in ten an empty scene, one in five two named people, the rest one person in a named scene
    and framing — half of them by name, most with a view the framing can show — with up to two worded attributes
    that framing and view show."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        scene = str(list(SCENES)[rng.integers(len(SCENES))])
        framing = FRAMINGS[i % len(FRAMINGS)]
        if i % 10 == 9:
            requests.append(Request(scene=scene, person=False))
            continue
        if i % 5 == 2:
            first, second = (str(n) for n in rng.choice(NAMES, 2, replace=False))
            requests.append(Request(scene=scene, framing=framing, pair=True, name=first, partner=second))
            continue
        views = FRAMING_LAYOUT[framing].views
        view = str(views[rng.integers(len(views))]) if len(views) > 1 and rng.random() < 0.8 else None
        name = str(NAMES[rng.integers(len(NAMES))]) if rng.random() < 0.5 else None
        shows = visible_look(framing, view or "front")
        look = random_request_look(rng, [k for k in LOOK_ITEMS if k in shows or k == "old"], 2)
        requests.append(Request(scene=scene, framing=framing, view=view, name=name, look=look))
    return requests


def sample(host, ckpt_name: str, requests: list[Request], seed: int = 0, sampler: dict = SAMPLER,
           batch: int = 50) -> list[Sampled]:
    texts = [prompt(r) for r in requests]
    images = sample_texts(host, ckpt_name, texts, seed=seed, sampler=sampler, batch=batch, size=SIZE)
    return [Sampled(r, t, im, read(im)) for r, t, im in zip(requests, texts, images)]


def rates(results: list[Sampled]) -> dict[str, tuple[float, int]]:
    """item → (share right, how many prompts it was asked of); fit error as its median and the rejected share."""
    tally: dict[str, list[float]] = {}

    def add(item, value):
        tally.setdefault(item, []).append(float(value))

    for r in results:
        request, reading = r.request, r.reading
        add("person", shown(reading, "person", request.person))
        add("scene", shown(reading, "scene", request.scene))
        add("rejected", reading.rejected)
        add("fit_error", reading.error)
        if not request.person:
            continue
        add("framing", shown(reading, "framing", request.framing))
        if request.pair:
            add("two_people", shown(reading, "people", 2))
            sides = [traits_right(reading, ROSTER[n], i) for i, n in enumerate((request.name, request.partner))]
            add("pair_both", min(right / total if total else 0.0 for right, total in sides))
            continue
        if request.view is not None:
            add("view", shown(reading, "view", request.view))
        for item, value in request.look.items():
            add(item, shown(reading, item, value))
        if request.name is not None:
            right, total = traits_right(reading, ROSTER[request.name])
            add("named_traits", right / total if total else 0.0)
    out = {k: (float(np.mean(v)), len(v)) for k, v in tally.items()}
    out["fit_error"] = (float(np.median(tally.get("fit_error", [np.nan]))), len(tally.get("fit_error", [])))
    return out


def kind(request: Request) -> str:
    """What a prompt asks the picture to hold, for telling which layouts fail."""
    if not request.person:
        return "empty scene"
    return f"{'two people' if request.pair else 'one person'}, {request.framing}"


def by_kind(results: list[Sampled]) -> dict[str, dict[str, float]]:
    """kind → the share rejected, the median fit error and how many prompts: where the pictures leave the world."""
    groups: dict[str, list[Sampled]] = {}
    for r in results:
        groups.setdefault(kind(r.request), []).append(r)
    return {k: {"rejected": float(np.mean([r.reading.rejected for r in g])),
                "fit_error": float(np.median([r.reading.error for r in g])), "prompts": len(g)}
            for k, g in sorted(groups.items())}


def verdict(table: dict[str, tuple[float, int]]) -> dict[str, bool]:
    out = {"person": table["person"][0] >= GATES["person"], "scene": table["scene"][0] >= GATES["scene"],
           "rejected": table["rejected"][0] < GATES["rejected"], "fit_error": table["fit_error"][0] < REJECT_THRESHOLD}
    for item in ("named_traits", "view", "pair_both"):
        if item in table:
            out[item] = table[item][0] >= GATES[item]
    for item in LOOK_ITEMS:
        if item in table:
            out[item] = table[item][0] >= GATES["attribute"]
    return out


def expressibility_photos(person: int, seed: int = 0):
    """Four photos of held-out person `person` in different scenes, framings and views (IMAGE [4, 80, 80, 3], face
    MASK [4, 80, 80]), and the identity."""
    import torch
    identity = held_out_identities()[person]
    rng = np.random.default_rng(seed)
    requests = (Request(scene="studio", framing="close-up", view="front"),
                Request(scene="beach", framing="head-and-shoulders", view="three-quarter-left"),
                Request(scene="forest", framing="close-up", view="profile-right"),
                Request(scene="library", framing="head-and-shoulders", view="three-quarter-right"))
    facts = [request_facts(r, identity, rng) for r in requests]
    images = torch.from_numpy(np.stack([render(f) for f in facts]))
    masks = torch.from_numpy(np.stack([face_mask(f) for f in facts]))
    return images, masks, identity


def expressibility_requests(count: int = EXPRESSIBILITY_PROMPTS, seed: int = 11) -> list[Request]:
    """Prompts for the trained token: every framing, views to both sides, scenes the photos do not show."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        framing = FRAMINGS[i % 2]    # close-ups and portraits show the most traits
        views = FRAMING_LAYOUT[framing].views
        out.append(Request(scene=str(list(SCENES)[rng.integers(len(SCENES))]), framing=framing,
                           view=str(views[i % len(views)])))
    return out


def expressibility(host, model, clip, vae, person: int, steps: int = EXPRESSIBILITY_STEPS, seed: int = 0,
                   observer=None, prompts: int = EXPRESSIBILITY_PROMPTS, sampler: dict = SAMPLER) -> dict:
    """Train textual inversion on four photos of `person`, render the expressibility prompts, score identity."""
    from .. import sampling
    images, masks, truth = expressibility_photos(person, seed)
    identity = host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=images, mask=masks,
                        name=f"world3_expressibility_{person}", trigger="sks", initializer="person", steps=steps,
                        learning_rate=0.0, overwrite=True, seed=seed, checkpoint_every=0, preview_every=0,
                        observer=observer, **WORLD_SETTINGS, **TI_SETTINGS)[0]
    requests = expressibility_requests(prompts)
    texts = [prompt(r, subject="sks person") for r in requests]
    seeds = [sampling.sample_seed(seed, person, i) for i in range(len(texts))]
    pictures = sampling.render(host, model, clip, vae, texts, seeds, identity=identity, size=SIZE, sampler=sampler)
    readings = [read(p) for p in pictures]
    scores = [identity_fidelity(r, truth) for r in readings]
    counted = [s if s is not None else 0.0 for s in scores]   # nobody drawn counts as nothing of the identity
    chance = [chance_fidelity(r.framing, r.view) for r in requests]
    return {"person": person, "steps": steps, "identity": float(np.mean(counted)), "chance": float(np.mean(chance)),
            "pictures": [{"prompt": t, "identity": s, "rejected": r.rejected, "error": r.error}
                         for t, s, r in zip(texts, scores, readings)],
            "passed": float(np.mean(counted)) >= GATES["identity"], "images": pictures}


def run(args: argparse.Namespace) -> int:
    from host_boot import embedded_host
    from . import checkpoint
    base = Path(tempfile.mkdtemp(prefix="sefi-world3-gates-"))
    for folder in ("checkpoints", "sefi_identities"):
        (base / "models" / folder).mkdir(parents=True)
    host = embedded_host.boot_in_process(base)
    ckpt = checkpoint.ensure(base / "models" / "checkpoints", args.unet)
    sampler = {**SAMPLER, "steps": args.sampler_steps, "cfg": args.cfg, "sampler_name": args.sampler}
    report: dict = {"sampler": sampler, "samples": args.samples, "seed": args.seed, "negative": NEGATIVE}
    passed: dict[str, bool] = {}
    if args.samples:
        results = sample(host, ckpt.name, gate_requests(args.samples, args.seed), seed=args.seed, sampler=sampler)
        table = rates(results)
        passed.update(verdict(table))
        for item, (share, n) in table.items():
            mark = "" if item not in passed else ("  pass" if passed[item] else "  FAIL")
            value = f"{share:6.3f}  " if item == "fit_error" else f"{share * 100:5.1f} %"
            print(f"{item:>13}: {value} of {n}{mark}")
        report["rates"] = table
        report["by_kind"] = by_kind(results)
        for name, row in report["by_kind"].items():
            print(f"{name:>29}: {row['rejected'] * 100:5.1f} % rejected, median fit error {row['fit_error']:.3f} "
                  f"of {row['prompts']}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            save_grid(results, args.out / "gates_grid.png")
    if args.expressibility:
        model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]
        result = expressibility(host, model, clip, vae, args.person, steps=args.ti_steps, seed=args.seed,
                                sampler=sampler)
        result.pop("images")
        passed["expressibility"] = result["passed"]
        print(f"expressibility (textual inversion, {result['steps']} steps, held-out person {args.person}): "
              f"identity {result['identity'] * 100:.1f} % (chance {result['chance'] * 100:.1f} %)"
              f"{'  pass' if result['passed'] else '  FAIL'}")
        report["expressibility"] = result
    report["passed"] = passed
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gates.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out / 'gates.json'}")
    return 0 if all(passed.values()) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--person", type=int, default=VALIDATION_PEOPLE[0],
                        help="the held-out person of the expressibility gate (default: the first validation person)")
    parser.add_argument("--expressibility", action="store_true",
                        help="also run the expressibility gate (textual inversion on four photos)")
    parser.add_argument("--ti-steps", type=int, default=EXPRESSIBILITY_STEPS)
