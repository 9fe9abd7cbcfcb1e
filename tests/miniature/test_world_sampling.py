"""One render function and one seed rule for the demo and the claims benchmark (world/sampling.py), and the trainer's
progress reaching a caller through an observer passed in, not through module state."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from bench.world_claims import measure
from bench.world_claims.plan import MOVES, Run
from world import demo, sampling


def _recording(monkeypatch) -> list[dict]:
    calls = []

    def render(host, model, clip, vae, texts, seeds, identity=None, size=64, sampler=sampling.SAMPLER,
               negative=None):
        calls.append({"texts": list(texts), "seeds": list(seeds), "identity": identity, "size": size})
        return [np.zeros((size, size, 3), np.float32) for _ in texts]

    monkeypatch.setattr(sampling, "render", render)
    return calls


def test_the_demo_and_the_benchmark_render_through_one_function_with_one_seed_rule(monkeypatch):
    calls = _recording(monkeypatch)
    identity, person, seed = object(), 3, 1
    truth = demo.held_out_identities()[person]
    demo.render_identity(None, None, None, None, identity, truth, seed=seed, person=person)
    world = SimpleNamespace(host=None, model=None, clip=None, vae=None, negative=None)
    measure.render(world, identity, Run("sefi", person, seed))
    assert len(calls) == 2 and all(c["identity"] is identity for c in calls)
    for call in calls:
        assert call["seeds"] == [100_000 * seed + 100 * person + i for i in range(len(call["texts"]))]
    assert len(calls[1]["texts"]) == len(MOVES)
    # the same (seed, person, prompt index) gets the same noise in both
    assert calls[0]["seeds"] == calls[1]["seeds"][:len(calls[0]["seeds"])]


def test_the_trainer_has_no_module_wide_progress_hooks(host):
    import importlib
    train = importlib.import_module(f"{host.pack_module.__name__}.nodes.train")
    assert not hasattr(train, "PROGRESS_HOOKS")
    import inspect
    assert "observer" in inspect.signature(train.SeFiTrainIdentity.train).parameters
