"""Models the method fits are accepted, the others refused — by SeFi Apply Identity and SeFi Train Identity.

The tiny SD1.5 model gets each sampling type through the host's own ModelSampling* nodes, as a user's graph
would give it."""
from __future__ import annotations

import pytest
import torch

STAGES = 5

ACCEPTED = [
    ("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": False}),
    ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}),
    ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}),
]
REFUSED = [
    ("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}, "LCM prediction"),
    ("ModelSamplingDiscrete", {"sampling": "x0", "zsnr": False}, "X0 prediction"),
    ("ModelSamplingContinuousEDM", {"sampling": "v_prediction", "sigma_max": 120.0, "sigma_min": 0.002},
     "ModelSamplingContinuousEDM schedule"),
    ("ModelSamplingContinuousEDM", {"sampling": "edm_playground_v2.5", "sigma_max": 120.0, "sigma_min": 0.002},
     "EDM prediction"),
    ("ModelSamplingSD3", {"shift": 3.0}, "CONST prediction"),
    ("ModelSamplingContinuousV", {"sampling": "v_prediction", "sigma_max": 500.0, "sigma_min": 0.03},
     "ModelSamplingContinuousV schedule"),
]


def _identity(pack):
    g = torch.Generator().manual_seed(0)
    return pack.core("identity").Identity("sd1", {"clip_l": torch.randn(STAGES, 2, 1, 768, generator=g) * 0.02},
                                          "sks", "person")


def _with_sampling(host, model, node, args):
    if node not in host.nodes:
        pytest.skip(f"this host has no {node} node")
    options = host.nodes[node].INPUT_TYPES()["required"].get("sampling")
    if options is not None and args.get("sampling") not in options[0]:
        pytest.skip(f"{node} on this host has no sampling={args['sampling']!r}")
    return host.run(node, model=model, **args)[0]


@pytest.mark.parametrize("node,args", ACCEPTED, ids=[f"{n}-{a}" for n, a in ACCEPTED])
def test_accepted_samplings_use_every_stage(host, sd15, pack, node, args):
    """On an accepted model the sampler's sigma range maps onto all S stages, in order (no collapse)."""
    model = _with_sampling(host, sd15[0], node, args)
    patched, _ = host.run("SeFiApplyIdentity", model=model, clip=sd15[1], identity=_identity(pack),
                          text="a photo of sks person", strength=1.0, start_percent=0.0, end_percent=1.0)
    patch = patched.model_options["transformer_options"]["patches"]["attn2_patch"][-1]
    sigmas = model.get_model_object("model_sampling").sigmas
    routers = [patch.router_for(s.reshape(1).clone()) for s in sigmas.flip(0)]  # high noise first
    order = list(dict.fromkeys(routers))
    assert len(order) == STAGES
    assert order == [patch.routers[(s,)] for s in reversed(range(STAGES))]


@pytest.mark.parametrize("node,args,problem", REFUSED, ids=[f"{n}-{a.get('sampling', '')}" for n, a, _ in REFUSED])
def test_other_samplings_are_refused_by_both_nodes(host, sd15, pack, tmp_path, face_photo, node, args, problem):
    model = _with_sampling(host, sd15[0], node, args)
    errors = pack.glue("sampling_support").UnsupportedModelError
    with pytest.raises(errors, match=problem) as apply_error:
        host.run("SeFiApplyIdentity", model=model, clip=sd15[1], identity=_identity(pack), text="a photo of sks",
                 strength=1.0, start_percent=0.0, end_percent=1.0)
    assert "SeFi Apply Identity" in str(apply_error.value) and "eps or v-prediction" in str(apply_error.value)
    image = face_photo("obama_1.jpg", 160)
    with pytest.raises(errors, match=problem) as train_error:
        host.run("SeFiTrainIdentity", model=model, clip=sd15[1], vae=sd15[2], images=image,
                 name=f"refused_{tmp_path.name}", steps=1, resolution=64, checkpoint_every=0)
    assert "SeFi Train Identity" in str(train_error.value)
    assert not list(pack.glue("train").identity_dir().glob(f"refused_{tmp_path.name}*"))
