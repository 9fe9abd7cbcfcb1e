"""No input of the trainer is silently ignored or reaches torch raw (issue 32's RAW and SILENT inputs; issue 33's
stale widget layout): each refusal names the widget and what to do.

Refusals that must come before any work are called with model, clip and vae set to None (as in
test_train_safety.py): reaching the model would fail with another error than the expected one."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from batch.comfy_client import PromptFailed

from .server_training import ready_to_train, train_graph
from .test_train_safety import _args  # the same short, direct-token run

OLD_01 = Path(__file__).resolve().parents[1] / "data" / "workflows" / "01_train_identity.before_options.json"


@pytest.fixture(scope="module")
def photo(face_photo):
    return face_photo("obama_1.jpg", 160)


def _refused(host, images, **kw):
    return host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=images, **_args(**kw))


def _options(pack, **kw):
    return {**pack.glue("train_options").OPTION_DEFAULTS, **kw}


@pytest.fixture
def taken_wide(pack):
    """An identity file named taken_wide: a run of that name is refused after its input checks, before any work."""
    path = pack.glue("train_policies").identity_dir() / "taken_wide.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    yield path
    path.unlink()


# --- RAW: values that reached torch or a Python error ---------------------------------------------------------

def test_a_seed_beyond_its_declared_maximum_is_refused_naming_it(host, pack, photo):
    """seed 2**64 through a link (the host checks only typed widget values): 'Overflow when unpacking long
    long'."""
    message = r"seed=18446744073709551616 is above its maximum 9223372036854775807; set seed between 0 and"
    with pytest.raises(ValueError, match=message):
        host.run("SeFiTrainingOptions", **_options(pack, seed=2**64))
    with pytest.raises(ValueError, match=message):
        _refused(host, photo, seed=2**64)
    with pytest.raises(ValueError, match=r"steps=0 is below its minimum 1; set steps between 1 and 100000"):
        _refused(host, photo, steps=0)
    with pytest.raises(ValueError, match=r"attention_weight=nan is not a finite number"):
        _refused(host, photo, attention_weight=float("nan"))


def test_a_wrong_output_wired_into_options_is_named(host, sd15, photo):
    """A tensor gave a 1,445-character dump, a CLIP "'CLIP' object is not iterable"."""
    clip = sd15[1]
    for wrong, shown in ((clip, "a CLIP"), (torch.zeros(17, 33), r"a MASK \[17, 33\]"),
                         (torch.zeros(2, 3, 4, 5, 6), r"a tensor \[2, 3, 4, 5, 6\] \(float32\)")):
        with pytest.raises(TypeError, match=rf"SeFi Train Identity: input 'options' got {shown}, but it takes the "
                                            r"options output of a SeFi Training Options node") as refused:
            host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=photo, name="opt",
                     options=wrong)
        assert len(str(refused.value)) < 300


# --- SILENT: the trigger ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trigger, initializer, why", [
    ("person", "person", "is the same word as the initializer"),
    ("Man", "man", "is the same word as the initializer"),
    ("person", "man", "is the reference word of the attention loss"),
    ("the", "person", "is a function word"),
    ("The", "person", "is a function word"),
    ("of", "person", "is a function word"),
    ("photo", "person", "is a word every portrait prompt uses"),
    ("portrait", "person", "is a word every portrait prompt uses"),
])
def test_a_trigger_that_prompts_already_use_is_refused(host, photo, trigger, initializer, why):
    """trigger = initializer or reference word turned the attention loss off (1.5e-7); 'the' was accepted."""
    with pytest.raises(ValueError, match=rf"trigger '{trigger}' {why}.*pick a rare made-up word such as 'sks' for "
                                         r"trigger"):
        _refused(host, photo, trigger=trigger, initializer=initializer)


def test_every_refused_function_word_is_one_clip_token(sd15, pack):
    """The list is CLIP's: each word is a single whole-word token of the host's own tokenizer."""
    words, encoding = pack.core("trigger_words"), pack.glue("prompt_encoding")
    clip = sd15[1]
    split = [w for w in sorted(words.FUNCTION_WORDS) if len(encoding.word_token_ids(clip, w, "l")) != 1]
    assert not split
    assert "sks" not in words.common_prompt_words()


# --- SILENT: masks and photos -----------------------------------------------------------------------------------

def test_a_mask_of_another_size_is_refused(host, photo):
    """A 1126×661 mask for a 910×1137 photo trained."""
    h, w = photo.shape[1:3]
    with pytest.raises(ValueError, match=rf"mask 0 \(counted from 0\) is {h}×{w} pixels but its photo is "
                                         rf"{w}×{h}: it cannot belong to it"):
        _refused(host, photo, mask=torch.ones(1, w, h))


def test_an_inverted_mask_is_refused(host, photo):
    h, w = photo.shape[1:3]
    inverted = torch.ones(1, h, w)
    inverted[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0
    with pytest.raises(ValueError, match=r"mask 0 \(counted from 0\) covers 7\d% of its photo and reaches all "
                                         r"four borders: it looks inverted.*invert it \(InvertMask\)"):
        _refused(host, photo, mask=inverted)


def test_a_face_mask_at_another_scale_still_trains(host, sd15, photo, face_photo):
    """The same picture's mask at half size lines up after the centre crop: accepted."""
    model, clip, vae = sd15
    h, w = photo.shape[1:3]
    mask = torch.zeros(1, h // 2, w // 2)
    mask[:, h // 8: 3 * h // 8, w // 8: 3 * w // 8] = 1
    identity = host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo,
                        **_args(name="scaled_mask", mask=mask, overwrite=True))[0]
    assert identity.training["steps_done"] == 1


def test_a_sliver_of_a_photo_is_refused_and_a_wide_one_warned(host, photo, caplog):
    """A 10000×10 image trained on its centre square without a word."""
    with pytest.raises(ValueError, match=r"images: photo 0 \(counted from 0\) is 1000×10 pixels; training uses its "
                                         r"centre square, 1% of it.*crop it around the face first"):
        _refused(host, torch.rand(1, 10, 1000, 3))
    h, w = photo.shape[1:3]
    wide = torch.full((1, h, round(h * 2.5), 3), 0.5)
    wide[:, :, :w] = photo
    with caplog.at_level("WARNING", logger="sefi"), pytest.raises(TypeError, match="input 'model' got nothing"):
        _refused(host, wide, name="wide")  # trained (the face is found) up to the missing model
    assert re.search(r"photo 0 is \d+×\d+ pixels; training uses only its centre square \(40%", caplog.text)


# --- SILENT: sample prompts --------------------------------------------------------------------------------------

def test_more_sample_prompts_than_the_cap_are_refused_and_the_cost_is_logged(host, photo, pack, caplog,
                                                                              taken_wide):
    """500 sample prompts were accepted (29 min a sampling point, the preview frozen)."""
    cap = pack.glue("train_inputs").MAX_SAMPLE_PROMPTS
    many = "\n".join(f"a photo of sks person number {i}" for i in range(cap + 1))
    with pytest.raises(ValueError, match=rf"sample_prompt has {cap + 1} prompts; at most {cap} are rendered at "
                                         r"each sampling point"):
        _refused(host, photo, sample_prompt=many, sample_every=1)
    with caplog.at_level("INFO", logger="sefi"), pytest.raises(FileExistsError):
        _refused(host, photo, name="taken_wide", steps=600, sample_every=100,
                 sample_prompt="a photo of sks person\na photo of sks person, smiling")
    # 2 prompts × 12 sampler steps × 2 passes / 3 passes a training step = 16 training steps a point, 6 points
    assert "sample renders: 2 prompt(s) x 12 sampler steps at 6 sampling point(s) take about as long as 96 " \
           "training steps (16% on top of the 600 steps" in caplog.text


# --- SILENT: settings the trainer does not take ------------------------------------------------------------------

def test_settings_set_on_the_trainer_that_moved_to_the_options_are_refused(host, pack, photo):
    """The host drops inputs a node does not declare: a 'resume' trained from step 0."""
    graph = {"7": {"class_type": "SeFiTrainIdentity",
                   "inputs": {"name": "moved", "resume_from": "moved", "overwrite": True, "stpes": 3}}}
    with pytest.raises(ValueError, match=r"SeFi Train Identity \(node 7\): the graph sets overwrite, resume_from, "
                                         r"stpes on this node, which does not take them.*overwrite, resume_from are "
                                         r"settings of SeFi Training Options \(wire its options output to this "
                                         r"node's options input\): set them there; stpes is not an input of SeFi "
                                         r"Train Identity: remove it or correct the spelling"):
        host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=[photo], name=["moved"],
                 sefi_prompt=[graph], sefi_node_id=["7"])
    options_graph = {"2": {"class_type": "SeFiTrainingOptions", "inputs": {**_options(pack), "resolution": 256}}}
    with pytest.raises(ValueError, match=r"resolution is a setting of SeFi Train Identity"):
        host.run("SeFiTrainingOptions", **_options(pack), sefi_prompt=options_graph, sefi_node_id="2")


def test_moved_settings_through_the_api_are_refused(server, faces_dir):
    client, ckpt_name, image = ready_to_train(server, faces_dir / "obama_1.jpg", "moved_face.jpg")
    graph = train_graph(ckpt_name, image, name="api_moved")
    graph["3"]["inputs"]["resume_from"] = "api_moved"
    with pytest.raises(PromptFailed, match=r"resume_from is a setting of SeFi Training Options"):
        client.run(graph)
    assert not (server.models_dir / "sefi_identities" / "api_moved.safetensors").exists()


# --- SILENT: a finished training re-queued ------------------------------------------------------------------------

def test_a_deleted_identity_is_trained_again_on_requeue(server, faces_dir):
    """The host's cache answered "success" and wrote no file: the trainer declared no change check."""
    client, ckpt_name, image = ready_to_train(server, faces_dir / "obama_1.jpg", "requeue_face.jpg")
    graph = train_graph(ckpt_name, image, name="requeued")
    out = server.models_dir / "sefi_identities" / "requeued.safetensors"
    client.run(graph)
    first = out.stat().st_mtime_ns
    client.run(graph)  # unchanged: answered from the cache, not trained again (nor refused: the file exists)
    assert out.stat().st_mtime_ns == first
    out.unlink()
    client.run(graph)
    assert out.is_file()


# --- issue 33: a workflow saved with an earlier widget layout ---------------------------------------------------

def _old_trainer_values(pack) -> dict:
    """What the frontend gives the trainer of the old workflows/01: its widgets_values by position."""
    layouts = pack.glue("widget_layouts")
    old = json.loads(OLD_01.read_text())
    node = next(n for n in old["nodes"] if n["type"] == "SeFiTrainIdentity")
    order = layouts.widget_order(pack.glue("train").SeFiTrainIdentity)
    return dict(zip(order, node["widgets_values"]))


def test_the_old_workflow_01_is_recognised_as_an_earlier_layout(pack):
    layouts, train = pack.glue("widget_layouts"), pack.glue("train")
    values = _old_trainer_values(pack)
    assert values["resolution"] == 5 and values["sample_prompt"] == "self-attention generator"
    message = layouts.stale_layout_message(train.SeFiTrainIdentity, "SeFi Train Identity", values,
                                           pack.glue("train_options").OPTION_INPUTS)
    assert message is not None
    assert "saved with the layout it had before SeFi Training Options existed" in message
    assert "resolution=5 (below its minimum 64)" in message and "save_every='reference' (not a number)" in message
    assert "resolution holds what was stages" in message and "sample_prompt holds what was parametrisation" in message
    assert "re-load the shipped workflows/01_train_identity.json" in message
    # a value that fits no earlier layout is an ordinary wrong value (its widget's own message), not a stale one
    assert layouts.stale_layout_message(train.SeFiTrainIdentity, "SeFi Train Identity",
                                        {**values, "resolution": 3000},
                                        pack.glue("train_options").OPTION_INPUTS) is None
    # today's workflow fits today's layout
    shipped = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "01_train_identity.json").read_text())
    node = next(n for n in shipped["nodes"] if n["type"] == "SeFiTrainIdentity")
    now = dict(zip(layouts.widget_order(train.SeFiTrainIdentity), node["widgets_values"]))
    assert layouts.stale_layout_message(train.SeFiTrainIdentity, "SeFi Train Identity", now,
                                        pack.glue("train_options").OPTION_INPUTS) is None


def test_the_old_layout_is_refused_in_process(host, pack, photo):
    values = _old_trainer_values(pack)
    with pytest.raises(ValueError, match=r"saved with the layout it had before SeFi Training Options existed"):
        host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=photo, **values)


def test_the_old_layout_is_refused_by_the_server_before_anything_runs(server, faces_dir, pack):
    """The old 01 loads resolution=5, sample_prompt='self-attention generator': refused with what to do."""
    client, ckpt_name, image = ready_to_train(server, faces_dir / "obama_1.jpg", "old_layout_face.jpg")
    graph = train_graph(ckpt_name, image, name="old_layout")
    del graph["4"], graph["3"]["inputs"]["options"]  # the old workflow has no options node
    graph["3"]["inputs"].update(_old_trainer_values(pack))
    with pytest.raises(PromptFailed, match=r"resolution.*saved with the layout it had before SeFi Training Options "
                                           r"existed.*re-create the node"):
        client.run(graph)
