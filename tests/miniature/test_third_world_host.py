"""The third world's host paths run on its committed round: its checkpoint through the gates' sampling and rates,
the expressibility gate's textual inversion on four photos, and the demo's identity-beside-control rows. Mechanics
only: what the numbers are is measured in docs/world.md; a CI test will hold the weights to a reduced gate once a
round holds the gates."""
from __future__ import annotations

import numpy as np
import pytest

from world.third import checkpoint as third_checkpoint, demo as third_demo, gates as third_gates
from world.third.render import CELL, GRID

SIZE = GRID * CELL


@pytest.fixture(scope="module")
def world3(host, world3_sd15):
    assert world3_sd15.name == third_checkpoint.NAME
    return world3_sd15, host.run("CheckpointLoaderSimple", ckpt_name=world3_sd15.name)[:3]


def test_third_world_gates_sample_read_and_rate_every_item(host, world3):
    requests = third_gates.gate_requests(10, seed=7)
    assert any(r.pair for r in requests) and any(r.view for r in requests) and any(r.name for r in requests)
    results = third_gates.sample(host, world3[0].name, requests, seed=1,
                                 sampler={**third_gates.SAMPLER, "steps": 3}, batch=len(requests))
    assert all(r.image.shape == (SIZE, SIZE, 3) for r in results)
    table = third_gates.rates(results)
    assert {"person", "scene", "rejected", "fit_error", "framing", "pair_both", "named_traits"} <= set(table)
    assert all(0.0 <= share <= 1.0 for item, (share, _) in table.items() if item != "fit_error")
    verdict = third_gates.verdict(table)
    assert {"person", "scene", "rejected", "fit_error", "pair_both", "named_traits"} <= set(verdict)
    kinds = third_gates.by_kind(results)
    assert sum(row["prompts"] for row in kinds.values()) == len(results)
    assert {third_gates.kind(r) for r in requests} == set(kinds)
    rejected = [r.reading.rejected for r in results if third_gates.kind(r.request) == "empty scene"]
    assert kinds["empty scene"]["rejected"] == pytest.approx(np.mean(rejected))


def test_expressibility_gate_trains_textual_inversion_on_four_photos(host, world3):
    images, masks, truth = third_gates.expressibility_photos(16)
    assert images.shape == (4, SIZE, SIZE, 3) and masks.shape == (4, SIZE, SIZE)
    assert len({tuple(np.round(im.numpy()[0, 0], 3)) for im in images}) == 4     # four scenes
    steps = []
    result = third_gates.expressibility(host, *world3[1], person=16, steps=2, prompts=2,
                                        sampler={**third_gates.SAMPLER, "steps": 3},
                                        observer=lambda step, total, loss, parts: steps.append(step))
    assert steps == [1, 2]
    assert 0.0 <= result["identity"] <= 1.0 and 0.0 < result["chance"] <= 0.25
    assert len(result["pictures"]) == 2 and len(result["images"]) == 2


def test_third_world_demo_pairs_each_prompt_with_its_control(host, world3):
    model, clip, vae = world3[1]
    photo, mask, facts = third_demo.studio_photo()
    assert photo.shape == (1, SIZE, SIZE, 3) and mask.sum() == 16 * CELL * CELL
    identity = host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, mask=mask,
                        name="world3_demo_test", trigger="sks", initializer="person", steps=1, learning_rate=0.0,
                        overwrite=True, seed=0, checkpoint_every=0, **third_demo.TRAIN_SETTINGS)[0]
    pairs = third_demo.render_pairs(host, model, clip, vae, identity, facts.people[0].identity,
                                    requests=third_demo.REQUESTS[:2])
    assert [p.text.replace("a sks person", "a person") for p in pairs] == [p.control_text for p in pairs]
    assert all(0.0 < p.chance <= 0.25 for p in pairs)
    assert any(r.view for r in third_demo.REQUESTS)
    table = third_demo.report(pairs)
    assert "control" in table and "chance" in table and len(table.splitlines()) == 4
