"""The rule that keeps saved workflows loading (tools/node_interface.py): an input may only be appended; one that
moves, changes type or disappears breaks; regenerating the schema raises the version once per change."""
from __future__ import annotations

import copy
import json

import pytest

from tools import node_interface as ni


def _node(required, optional=()):
    return {"required": [ni.input_entry(name, spec) for name, spec in required],
            "optional": [ni.input_entry(name, spec) for name, spec in optional]}


OLD = {"Train": _node([("model", ("MODEL",)), ("steps", ("INT", {"default": 600})),
                       ("mode", (["a", "b"], {"default": "a"}))], [("every", ("INT", {"default": 0}))]),
       "Load": _node([("file", ([], {}))])}


def _changed(edit):
    new = copy.deepcopy(OLD)
    edit(new)
    return new


def test_an_input_is_recorded_with_its_type_widget_default_and_choices():
    assert ni.input_entry("mode", (["a", "b"], {"default": "a", "tooltip": "t"})) == {
        "name": "mode", "type": "COMBO", "widget": True, "default": "a", "choices": ["a", "b"]}
    assert ni.input_entry("model", ("MODEL", {"tooltip": "t"})) == {"name": "model", "type": "MODEL", "widget": False}
    assert ni.input_entry("n", ("INT", {"default": 1, "forceInput": True}))["widget"] is False
    # a combo without a default lists files: its choices are what a user has, not the interface
    assert ni.input_entry("file", (["x.safetensors"], {})) == {"name": "file", "type": "COMBO", "widget": True,
                                                              "listing": True}


@pytest.mark.parametrize("edit, expected", [
    (lambda n: n.pop("Load"), "Load: the node is gone"),
    (lambda n: n["Train"]["required"].reverse(), "Train.model (required input 1) moved or was renamed"),
    (lambda n: n["Train"]["required"].pop(1), "Train.steps (required input 2) moved or was renamed"),
    (lambda n: n["Train"]["optional"].pop(), "Train.every (optional input 1) disappeared"),
    (lambda n: n["Train"]["required"][1].update(type="FLOAT"), "Train.steps (required input 2) changed type"),
    (lambda n: n["Train"]["required"][0].update(widget=True), "Train.model (required input 1) became a widget"),
    (lambda n: n["Train"]["required"][2].update(choices=["a"]), "lost the choice(s) ['b']"),
    # a new required widget lands in front of the optional ones in widgets_values: every optional value shifts
    (lambda n: n["Train"]["required"].append(ni.input_entry("lr", ("FLOAT", {"default": 0.0}))),
     "new widgets go after all the existing ones"),
])
def test_a_change_that_shifts_or_drops_a_saved_value_breaks(edit, expected):
    found = ni.breaks(OLD, _changed(edit))
    assert any(expected in line for line in found), found


@pytest.mark.parametrize("edit", [
    lambda n: n["Train"]["optional"].append(ni.input_entry("lr", ("FLOAT", {"default": 0.0}))),
    lambda n: n["Train"]["required"].append(ni.input_entry("mask", ("MASK",))),  # a socket shifts no widget
    lambda n: n.update(New=_node([("x", ("INT", {"default": 1}))])),
    lambda n: n["Train"]["required"][1].update(default=800),
    lambda n: n["Train"]["required"][2]["choices"].append("c"),
    lambda n: n["Load"]["required"][0].update(listing=True),
])
def test_appending_and_adding_break_nothing(edit):
    new = _changed(edit)
    assert ni.breaks(OLD, new) == []


def _files(tmp_path, version="0.1.1", nodes=OLD):
    schema, pyproject = tmp_path / "node_interface.json", tmp_path / "pyproject.toml"
    schema.write_text(ni.dumps(version, nodes))
    pyproject.write_text(f'[project]\nname = "x"\nversion = "{version}"\n')
    return schema, pyproject


def test_regenerating_an_appended_input_writes_the_schema_and_raises_the_version_once(tmp_path):
    schema, pyproject = _files(tmp_path)
    assert ni.regenerate(OLD, schema, pyproject) == ["node_interface.json: unchanged (version 0.1.1)"]
    appended = _changed(lambda n: n["Train"]["optional"].append(ni.input_entry("lr", ("FLOAT", {"default": 0.0}))))
    done = ni.regenerate(appended, schema, pyproject)
    assert "pyproject.toml: version raised to 0.1.2" in done
    assert ni.load(schema) == {"pack_version": "0.1.2", "nodes": appended}
    assert ni.pyproject_version(pyproject) == "0.1.2" and 'name = "x"' in pyproject.read_text()
    # a version raised by hand since the schema was written is kept, not raised again
    pyproject.write_text(pyproject.read_text().replace("0.1.2", "0.2.0"))
    more = {**appended, "New": _node([])}
    assert ni.regenerate(more, schema, pyproject)[-1] == "node_interface.json: written for version 0.2.0"
    assert ni.pyproject_version(pyproject) == "0.2.0"
    # a version raised for a release, the interface unchanged: the schema records it, the version stays
    pyproject.write_text(pyproject.read_text().replace("0.2.0", "0.3.0"))
    assert ni.regenerate(more, schema, pyproject) == ["node_interface.json: interface unchanged, recorded for "
                                                      "version 0.3.0"]
    assert ni.load(schema) == {"pack_version": "0.3.0", "nodes": more} and ni.pyproject_version(pyproject) == "0.3.0"


def test_regenerating_refuses_a_breaking_change_unless_told(tmp_path):
    schema, pyproject = _files(tmp_path)
    moved = _changed(lambda n: n["Train"]["required"].reverse())
    with pytest.raises(SystemExit, match="breaks saved workflows"):
        ni.regenerate(moved, schema, pyproject)
    assert ni.load(schema)["nodes"] == OLD and ni.pyproject_version(pyproject) == "0.1.1"
    ni.regenerate(moved, schema, pyproject, allow_breaking=True)
    assert ni.load(schema) == {"pack_version": "0.1.2", "nodes": moved}


def test_the_schema_file_is_json_with_one_input_per_line(tmp_path):
    text = ni.dumps("0.1.1", OLD)
    assert json.loads(text) == {"pack_version": "0.1.1", "nodes": OLD}
    assert sum('"name": ' in line for line in text.splitlines()) == 5
