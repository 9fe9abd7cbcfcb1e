"""What reaches a node's inputs is checked at its edge (nodes/edges.py), and a refusal names the input (issue 20):
wrong things linked through the API (a wildcard output, a hand-written graph), and BOOLEAN inputs sent as strings.

The server tests send API graphs as a careless client would; the host's own validation runs in front of the node."""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from batch.comfy_client import PromptFailed

from .server_training import ready_to_train, train_graph

IMAGE = torch.full((1, 64, 64, 3), 0.5)
MASK = torch.ones(1, 64, 64)


def _identity(pack):
    g = torch.Generator().manual_seed(0)
    return pack.core("identity").Identity("sd1", {"clip_l": torch.randn(2, 2, 1, 768, generator=g) * 0.02}, "sks",
                                          "person")


def _apply(host, **kw):
    args = dict(text="a photo of sks", strength=1.0, start_percent=0.0, end_percent=1.0)
    args.update(kw)
    return host.run("SeFiApplyIdentity", **args)


def test_apply_identity_names_the_input_that_got_the_wrong_thing(host, sd15, pack):
    model, clip, _ = sd15
    identity = _identity(pack)
    with pytest.raises(TypeError, match=r"SeFi Apply Identity: input 'model' got an IMAGE \[1, 64, 64, 3\], but it "
                                        r"takes a MODEL"):
        _apply(host, model=IMAGE, clip=clip, identity=identity)
    with pytest.raises(TypeError, match="input 'identity' got a MODEL, but it takes an identity"):
        _apply(host, model=model, clip=clip, identity=model)
    with pytest.raises(TypeError, match="input 'clip' got a VAE"):
        _apply(host, model=model, clip=sd15[2], identity=identity)
    with pytest.raises(TypeError, match="input 'identity_3' got a CLIP"):
        _apply(host, model=model, clip=clip, identity=identity, identity_3=clip)
    with pytest.raises(TypeError, match="input 'text' got a MASK"):
        _apply(host, model=model, clip=clip, identity=identity, text=MASK)
    _apply(host, model=model, clip=clip, identity=identity, identity_2=None)  # an unconnected optional input


def test_load_face_and_score_nodes_name_the_input(host, sd15):
    with pytest.raises(TypeError, match="SeFi Load Identity: input 'identity_name' got an IMAGE"):
        host.run("SeFiLoadIdentity", identity_name=IMAGE)
    with pytest.raises(TypeError, match=r"SeFi Face Mask: input 'image' got a MASK \[1, 64, 64\], but it takes an "
                                        r"IMAGE"):
        host.run("SeFiFaceMask", image=MASK)
    with pytest.raises(TypeError, match="SeFi Identity Score: input 'reference_images' got a MODEL"):
        host.run("SeFiIdentityScore", images=IMAGE, reference_images=sd15[0])


def test_booleans_take_true_false_and_their_strings_only(pack):
    edges = pack.glue("edges")
    assert [edges.as_boolean(v, "x") for v in (True, False, "true", "false", "TRUE", " False ")] == \
        [True, False, True, False, True, False]
    for bad in ("maybe", "", "0", 1, 0, None, 0.0, ["true"]):
        with pytest.raises(ValueError, match="overwrite must be true or false"):
            edges.as_boolean(bad, "overwrite")


def test_the_prompt_handler_normalises_only_this_packs_boolean_widgets(pack):
    edges, nodes = pack.glue("edges"), pack.module.nodes
    prompt = {"prompt": {
        "1": {"class_type": "SeFiTrainingOptions", "inputs": {"overwrite": "false", "kv_split": "TRUE",
                                                              "keep_checkpoint": ["9", 0], "compile_unet": 0,
                                                              "resume_from": "false"}},
        "2": {"class_type": "SomeOtherPackNode", "inputs": {"overwrite": "false"}}}}
    edges.normalise_prompt_booleans(prompt, nodes.NODE_CLASS_MAPPINGS)
    inputs = prompt["prompt"]["1"]["inputs"]
    assert inputs["overwrite"] is False and inputs["kv_split"] is True
    assert inputs["keep_checkpoint"] == ["9", 0] and inputs["resume_from"] == "false"  # a link, a STRING
    refused = inputs["compile_unet"]
    assert json.loads(json.dumps(refused)) == "0"  # still plain JSON for the host's error reply
    # the hosts deep-copy queued prompts (and may pickle them): a copy must still refuse, never break the queue
    for same in (refused, copy.deepcopy(refused), pickle.loads(pickle.dumps(refused))):
        with pytest.raises(ValueError, match="compile_unet must be true or false, got '0'"):
            bool(same)
    assert prompt["prompt"]["2"]["inputs"]["overwrite"] == "false"  # other packs' nodes are theirs


def test_boolean_strings_through_the_api_mean_what_they_say(server, faces_dir):
    """'"overwrite": "false"' replaced an existing identity and '"kv_split": "false"' trained with the split on:
    upstream validation makes every string True, the PyPI host passes the (true) string on."""
    client, ckpt_name, image = ready_to_train(server, faces_dir / "obama_1.jpg", "bools_face.jpg")
    folder = server.models_dir / "sefi_identities"
    folder.mkdir(parents=True, exist_ok=True)
    existing = folder / "bools_taken.safetensors"
    existing.write_bytes(b"someone's identity")
    with pytest.raises(PromptFailed, match="an identity named 'bools_taken' already exists"):
        client.run(train_graph(ckpt_name, image, name="bools_taken", overwrite="false"))
    assert existing.read_bytes() == b"someone's identity"
    with pytest.raises(PromptFailed, match=r"overwrite must be true or false, got \\*'maybe"):
        client.run(train_graph(ckpt_name, image, name="bools_taken", overwrite="maybe"))
    assert existing.read_bytes() == b"someone's identity"

    client.run(train_graph(ckpt_name, image, name="bools_split", kv_split="false",
                      keep_checkpoint="true"))
    from safetensors import safe_open
    with safe_open(str(folder / "bools_split.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["sefi.training"])["generator"]["kv_split"] is False
    assert (folder / "checkpoints" / "bools_split.sefi-train").is_file()
