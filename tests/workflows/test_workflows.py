"""The example workflows (workflows/*.json and their API twins in workflows/api/) against a real server.

Static checks use the live server's /object_info: node types exist, links join matching types, this pack's
widget values fit their input specs, the UI file and its API twin describe the same graph, and the committed
files are what tools/workflow_builder.py writes. Then the API twins of 01–05 run end to end on the tiny SD1.5
checkpoint (and the tiny ControlNet for 03), with real face photos as face.png / friend.png / driving_face.png:
01 trains the identities that 02, 04 and 05 load. 07 trains and renders on the miniature world's checkpoint, with
the photo and mask `make serve` writes.
"""
from __future__ import annotations

import copy
import json
import urllib.error

import numpy as np
import pytest

from tools import workflow_builder as wb
from tools import workflow_builder as wb
from batch.comfy_client import output_files
from tools.dev_requirements import import_required

NAMES = ("01_train_identity", "02_generate_with_identity", "03_reenactment_controlnet", "04_multiview",
         "05_two_identities", "06_liveportrait_chain", "07_world_identity")
RUNNABLE = NAMES[:5]
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# COMBO inputs that list files of a models folder: the committed value is a user's file name, checked by its
# extension (the run tests put that very file there and the server accepts it).
FILE_COMBOS = {("SeFiLoadIdentity", "identity_name"): ".safetensors"}
PHOTOS = {wb.PHOTO: "obama_1.jpg", wb.PHOTO_2: "biden_2.jpg", wb.DRIVING_PHOTO: "kit_harington_2.jpg"}
TEST_SIZE = 64
SAMPLER_STEPS = 2
TRAIN_STEPS = 2
TRAIN_STAGES = 2  # fewer stages, fewer prompt encodings in every SeFi Apply Identity of 02–05


# ------------------------------------------------------------------------------------------------- helpers

def ordered_inputs(spec: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, kind, options, optional) in INPUT_TYPES order (input_order where the host sends it)."""
    inputs = spec.get("input", {})
    order = spec.get("input_order") or {section: list(inputs.get(section, {})) for section in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = inputs[section][name]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, entry[0], options, section == "optional"))
    return out


def is_widget(kind, options) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_KINDS) and not options.get("forceInput")


def input_type(kind) -> str:
    return "COMBO" if isinstance(kind, list) else kind


def ui_to_api(ui: dict, specs: dict) -> dict:
    """What the frontend's "Export (API)" makes of a UI workflow: links become [source_id, slot], widget values
    are matched to the widget inputs in INPUT_TYPES order; the extra control_after_generate value after a
    seed/noise_seed INT and the upload button's value (last, after all widgets) of an image_upload COMBO are not
    inputs."""
    links = {link[0]: link for link in ui["links"]}
    graph = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        spec = specs[node["type"]]
        inputs = {}
        for slot in node.get("inputs") or []:
            if slot.get("link") is not None:
                _, source, source_slot, _, _, _ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        values = list(node.get("widgets_values") or [])
        for name, kind, options, _ in ordered_inputs(spec):
            if not is_widget(kind, options):
                continue
            assert values, f"{node['type']} #{node['id']}: no widget value left for {name}"
            inputs.setdefault(name, values.pop(0))
            if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                assert values and values.pop(0) in ("fixed", "increment", "decrement", "randomize"), name
            if options.get("image_upload"):  # the upload button's value comes after all the node's widgets
                assert values and values.pop() == "image", name
        assert not values, f"{node['type']} #{node['id']}: widget values left over: {values}"
        entry = {"inputs": inputs, "class_type": node["type"]}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        graph[str(node["id"])] = entry
    return graph


def check_value(where: str, kind, options: dict, value, file_ext: str | None) -> None:
    choices = kind if isinstance(kind, list) else (options.get("options") if kind == "COMBO" else None)
    if choices is not None:
        if file_ext is not None:
            assert isinstance(value, str) and value.endswith(file_ext) and "/" not in value, f"{where}={value!r}"
        else:
            assert value in choices, f"{where}={value!r} is not one of {choices}"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}={value!r}"
        if kind == "INT":
            assert isinstance(value, int), f"{where}={value!r} is not an integer"
        assert options.get("min", value) <= value <= options.get("max", value), \
            f"{where}={value!r} is outside [{options.get('min')}, {options.get('max')}]"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}={value!r}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}={value!r}"


def canonical_ui(ui: dict, specs: dict) -> dict:
    """A UI workflow without what legitimately differs between hosts: unlinked optional sockets, which a host may
    declare or not (upstream's ControlNetApplyAdvanced has an optional vae). Links are keyed by input name."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    nodes = {}
    for n in ui["nodes"]:
        required = {name for name, _, _, optional in ordered_inputs(specs[n["type"]]) if not optional}
        inputs = [(i["name"], i["type"], i["link"]) for i in n.get("inputs") or []
                  if i["link"] is not None or i["name"] in required]
        nodes[n["id"]] = {k: v for k, v in n.items() if k != "inputs"} | {"inputs": inputs}
    links = sorted((link[0], link[1], link[2], link[3], by_id[link[3]]["inputs"][link[4]]["name"], link[5])
                   for link in ui["links"])
    rest = {k: v for k, v in ui.items() if k not in ("nodes", "links")}
    return {"nodes": nodes, "links": links, **rest}


@pytest.fixture(scope="module")
def specs(object_info) -> dict:
    """Node specs by type: the live server's, plus the transcribed third-party ones used by 06."""
    return {**wb.THIRD_PARTY_SPECS, **object_info}


# ------------------------------------------------------------------------------------------------- static

def test_the_workflow_files_are_the_seven_examples_with_api_twins():
    assert tuple(wb.names()) == NAMES
    assert sorted(p.name for p in wb.WORKFLOWS_DIR.glob("*.json")) == [f"{n}.json" for n in NAMES]
    assert sorted(p.name for p in wb.API_DIR.glob("*.json")) == [f"{n}.api.json" for n in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_is_a_well_formed_saved_workflow(name):
    ui = wb.load_ui(name)
    assert ui["version"] == 0.4 and ui["groups"] == [] and isinstance(ui["config"], dict)
    ids = [n["id"] for n in ui["nodes"]]
    assert len(set(ids)) == len(ids) and ui["last_node_id"] == max(ids)
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    for n in ui["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(n), n["type"]
        assert n["properties"]["Node name for S&R"] == n["type"] and n["mode"] == 0
    orders = sorted(n["order"] for n in ui["nodes"])
    assert orders == list(range(len(ids)))


@pytest.mark.parametrize("name", NAMES)
def test_node_types_exist_on_the_server(name, object_info, third_party_allowed):
    allowed = third_party_allowed.get(name, frozenset())
    ui_types = {n["type"] for n in wb.load_ui(name)["nodes"]}
    api_types = {n["class_type"] for n in wb.load_api(name).values()}
    assert ui_types == api_types
    unknown = ui_types - set(object_info)
    assert unknown <= allowed, f"{name}: node types neither on the server nor allowed: {sorted(unknown - allowed)}"
    assert allowed <= ui_types, f"{name}: allow-list names types the workflow does not use"
    assert any(t.startswith("SeFi") for t in ui_types)
    if name in third_party_allowed:
        assert set(third_party_allowed[name]) == set(wb.THIRD_PARTY_SPECS)


@pytest.mark.parametrize("name", NAMES)
def test_links_join_matching_types(name, specs):
    ui = wb.load_ui(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        out = nodes[source]["outputs"][source_slot]
        slot = nodes[target]["inputs"][target_slot]
        assert link_id in out["links"] and slot["link"] == link_id
        declared_out = input_type(specs[nodes[source]["type"]]["output"][source_slot])
        declared_in = {n: input_type(k) for n, k, _, _ in ordered_inputs(specs[nodes[target]["type"]])}[slot["name"]]
        assert out["type"] == declared_out == link_type, f"{name}: link {link_id} type {link_type} ≠ {declared_out}"
        assert declared_in in (link_type, "*") and slot["type"] in (link_type, "*"), \
            f"{name}: link {link_id} ({link_type}) into {nodes[target]['type']}.{slot['name']} ({declared_in})"
    for n in ui["nodes"]:  # every link a node names is in the table
        table = {link[0] for link in ui["links"]}
        assert {i["link"] for i in n["inputs"] if i["link"] is not None} <= table
        assert {lid for o in n["outputs"] for lid in (o["links"] or [])} <= table

    api = wb.load_api(name)
    for node in api.values():
        declared = {n: input_type(k) for n, k, _, _ in ordered_inputs(specs[node["class_type"]])}
        for input_name, value in node["inputs"].items():
            if isinstance(value, list):
                source = api[value[0]]["class_type"]
                out_type = input_type(specs[source]["output"][value[1]])
                assert declared[input_name] in (out_type, "*") or out_type == "*", \
                    f"{name}: {source} output {value[1]} ({out_type}) → {node['class_type']}.{input_name}"


@pytest.mark.parametrize("name", NAMES)
def test_sefi_widget_values_fit_their_input_specs(name, object_info):
    for node_id, node in wb.load_api(name).items():
        node_type = node["class_type"]
        if not node_type.startswith("SeFi"):
            continue
        for input_name, kind, options, optional in ordered_inputs(object_info[node_type]):
            where = f"{name} #{node_id} {node_type}.{input_name}"
            if input_name not in node["inputs"]:
                assert optional, f"{where} is required and missing"
                continue
            value = node["inputs"][input_name]
            if is_widget(kind, options):
                check_value(where, kind, options, value, FILE_COMBOS.get((node_type, input_name)))
            else:
                assert isinstance(value, list) and len(value) == 2, f"{where} must be a link"
        declared = {n for n, *_ in ordered_inputs(object_info[node_type])}
        assert set(node["inputs"]) <= declared, f"{name} #{node_id}: unknown inputs"


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_describe_the_same_graph(name, specs):
    assert ui_to_api(wb.load_ui(name), specs) == wb.load_api(name)


def test_committed_files_are_what_the_builder_writes(object_info, specs):
    """`python -m tools.workflow_builder` regenerates them; this fails when a description or a node changed."""
    for path, text in wb.render(object_info).items():
        assert path.is_file(), f"{path} is missing; run python -m tools.workflow_builder"
        committed = path.read_text()
        if path.parent == wb.API_DIR:
            assert committed == text, f"{path.name} is stale; run python -m tools.workflow_builder"
        else:
            assert canonical_ui(json.loads(committed), specs) == canonical_ui(json.loads(text), specs), \
                f"{path.name} is stale; run python -m tools.workflow_builder"


def test_server_offers_the_ui_workflows_as_templates(server):
    """Upstream lists a pack's workflows/*.json as workflow templates (the API twins stay out of that list)."""
    try:
        templates = server.client.get("/workflow_templates")
    except urllib.error.HTTPError as err:
        pytest.skip(f"this host has no /workflow_templates (HTTP {err.code})")
    assert sorted(templates.get("ComfyUI-SeFi-IDE", [])) == list(NAMES)


# ------------------------------------------------------------------------------------------------- runs

def for_test(graph: dict, ckpt_name: str, controlnet_name: str | None = None) -> dict:
    """A copy of an API twin sized for the tiny checkpoint: 64 px latents, few steps, the fixtures' model files."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = controlnet_name
        elif kind == "EmptyLatentImage":
            inputs.update(width=TEST_SIZE, height=TEST_SIZE)
        elif kind == "KSampler":
            inputs["steps"] = SAMPLER_STEPS
        elif kind == "SeFiFaceMask":
            inputs["crop_size"] = 128
        elif kind == "SeFiTrainIdentity":
            # no sample renders: with prompts the final tokens are always sampled, which costs more than training here
            inputs.update(steps=TRAIN_STEPS, resolution=TEST_SIZE, sample_prompt="")
        elif kind == "SeFiTrainingOptions":
            inputs.update(stages=TRAIN_STAGES, checkpoint_every=0)
    return graph


def node_of(graph: dict, class_type: str) -> dict:
    (node,) = [n for n in graph.values() if n["class_type"] == class_type]
    return node


def images_of(entry: dict, node_id: str) -> list[dict]:
    return entry["outputs"].get(node_id, {}).get("images", [])


@pytest.fixture(scope="module")
def staged(server, faces_dir, tiny_sd15, tiny_controlnet):
    """The photos under the names the workflows use (downscaled: the tests need speed, not detail), and the
    tiny ControlNet in models/controlnet."""
    import_required("dlib", reason="SeFiFaceMask's offline backend needs dlib-bin")
    from PIL import Image
    inputs = server.base_dir / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    for target, source in PHOTOS.items():
        with Image.open(faces_dir / source) as im:
            im = im.convert("RGB")
            im.thumbnail((320, 320))
            im.save(inputs / target)
    server.add_model("controlnet", tiny_controlnet)
    return {"ckpt": tiny_sd15.name, "controlnet": tiny_controlnet.name}


@pytest.fixture(scope="module")
def trained(server, staged):
    """01 run twice: my_identity (trigger sks) from face.png, friend_identity (trigger zwx) from friend.png."""
    base = for_test(wb.load_api("01_train_identity"), staged["ckpt"])
    entries = {}
    for photo, name, trigger in ((wb.PHOTO, "my_identity", "sks"), (wb.PHOTO_2, "friend_identity", "zwx")):
        graph = copy.deepcopy(base)
        node_of(graph, "LoadImage")["inputs"]["image"] = photo
        inputs = node_of(graph, "SeFiTrainIdentity")["inputs"]
        inputs.update(name=name, trigger=trigger, sample_prompt=inputs["sample_prompt"].replace("sks", trigger))
        entries[name] = server.client.run(graph, timeout=300)
    return entries


def test_01_train_identity_saves_identity_and_loss_curve(server, trained):
    """The files 02/04/05 load by their committed names, and the loss curve preview."""
    graph = wb.load_api("01_train_identity")
    (train_id,) = [k for k, n in graph.items() if n["class_type"] == "SeFiTrainIdentity"]
    (curve_id,) = [k for k, n in graph.items() if n["class_type"] == "PreviewImage"
                   and n["inputs"]["images"] == [train_id, 1]]
    for name, file_name in (("my_identity", wb.IDENTITY), ("friend_identity", wb.IDENTITY_2)):
        assert (server.models_dir / "sefi_identities" / file_name).is_file(), server.log()[-3000:]
        assert images_of(trained[name], curve_id), f"no loss curve preview for {name}"


def _run(server, staged, name: str) -> tuple[dict, dict]:
    graph = for_test(wb.load_api(name), staged["ckpt"], staged["controlnet"])
    entry = server.client.run(graph, timeout=300)
    return graph, entry


def _saved(server, graph, entry) -> list:
    from PIL import Image
    files = output_files(entry, server.output_dir)
    assert files and all(f.is_file() for f in files), server.log()[-3000:]
    for f in files:
        with Image.open(f) as im:
            assert im.size == (TEST_SIZE, TEST_SIZE)
    return files


def test_02_generate_with_identity(server, staged, trained):
    graph, entry = _run(server, staged, "02_generate_with_identity")
    assert len(_saved(server, graph, entry)) == 1


def test_03_reenactment_controlnet(server, staged, trained):
    graph, entry = _run(server, staged, "03_reenactment_controlnet")
    assert len(_saved(server, graph, entry)) == 1
    (preview_id,) = [k for k, n in graph.items() if n["class_type"] == "PreviewImage"]
    assert images_of(entry, preview_id), "the control image preview is missing"


def test_04_multiview_one_batch_of_five_views(server, staged, trained):
    graph, entry = _run(server, staged, "04_multiview")
    seeds = {n["inputs"]["seed"] for n in graph.values() if n["class_type"] == "KSampler"}
    assert len(seeds) == 1
    assert len(_saved(server, graph, entry)) == len(wb.VIEWS) == 5


def test_05_two_identities(server, staged, trained):
    graph, entry = _run(server, staged, "05_two_identities")
    apply = node_of(graph, "SeFiApplyIdentity")["inputs"]
    assert "sks" in apply["text"] and "zwx" in apply["text"] and "identity_2" in apply
    assert len(_saved(server, graph, entry)) == 1



def test_07_names_the_files_make_serve_writes():
    from world import checkpoint, demo
    from world.captions import prompt
    assert wb.WORLD_CHECKPOINT == checkpoint.NAME
    assert (wb.WORLD_PHOTO, wb.WORLD_MASK) == (f"world_person_{demo.DEMO_PERSON}.png",
                                               f"world_person_{demo.DEMO_PERSON}_mask.png")
    assert wb.WORLD_PROMPTS == tuple(prompt(r, subject=f"{demo.TRIGGER} person") for r in demo.REQUESTS)


def test_07_world_identity_trains_on_the_world_photo_and_renders_four_prompts(server, world_sd15):
    """The world's photo and mask written as `make serve` writes them, the world checkpoint; 2 training steps and 2
    sampler steps: the identity file is saved and the four prompts come out 4× enlarged (256 px)."""
    from PIL import Image
    from world import demo
    photo_name, mask_name = demo.write_photo(server.base_dir / "input")
    with Image.open(server.base_dir / "input" / mask_name) as im:  # LoadImageMask reads its red channel
        assert np.asarray(im.convert("RGB"))[..., 0].max() == 255
    server.add_model("checkpoints", world_sd15)
    entry = server.client.run(for_test(wb.load_api("07_world_identity"), world_sd15.name), timeout=600)
    assert (server.models_dir / "sefi_identities" / "world_person_0.safetensors").is_file(), server.log()[-3000:]
    files = output_files(entry, server.output_dir)
    saved = [f for f in files if "world" in f.name]
    assert len(saved) == len(wb.WORLD_PROMPTS), files
    for f in saved:
        with Image.open(f) as im:
            assert im.size == (256, 256)
