"""The pack's node interface — every input of every node it registers, in order — frozen per version.

A workflow saved in ComfyUI's UI stores each node's widget values by position (`widgets_values`), so an input
that moves, changes type or disappears makes an old workflow load its values into the wrong widgets. The README
promises that from this release on a node's inputs only grow at the end. tests/data/node_interface.json is the
interface of pyproject's `version`; tests/host/test_node_interface.py refuses a change that breaks it (`breaks`)
and asks for this command after an allowed one (an input appended, a new node, a new default or combo choice):

    make node-interface          (the same: .venv/bin/python -m tools.node_interface)

It boots the host in a temporary folder, reads every node's INPUT_TYPES, and — when the interface differs from
the committed one — writes the schema and raises pyproject's patch version (`0.1.1` → `0.1.2`), so that each
version names one interface. It refuses to write a breaking change unless given --allow-breaking.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "tests" / "data" / "node_interface.json"
PYPROJECT_PATH = REPO_ROOT / "pyproject.toml"
REGENERATE = "make node-interface (or .venv/bin/python -m tools.node_interface)"
SECTIONS = ("required", "optional")  # `hidden` inputs are not widgets or sockets a workflow saves
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
_VERSION_LINE = re.compile(r'^version = "(\d+)\.(\d+)\.(\d+)"$', re.MULTILINE)


def input_entry(name: str, spec: tuple) -> dict[str, Any]:
    """One input as the schema records it: name, type, whether the UI shows it as a widget (its value is saved in
    widgets_values), its default and a combo's choices. A combo without a default lists files (what a user has in
    a model folder), so its choices are no part of the interface: `"listing": true` instead."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    choices = None
    if isinstance(kind, (list, tuple)):
        kind, choices = "COMBO", list(kind)
    elif kind == "COMBO":
        choices = list(options.get("options", []))
    entry: dict[str, Any] = {"name": name, "type": kind,
                             "widget": kind in WIDGET_TYPES and not options.get("forceInput", False)}
    if "default" in options:
        entry["default"] = options["default"]
    if choices is not None:
        if "default" in options:
            entry["choices"] = choices
        else:
            entry["listing"] = True
    return entry


def interface(node_classes: Mapping[str, type]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every node's inputs by section, in declaration order (the order the UI lays out and saves them)."""
    found = {}
    for node_id in sorted(node_classes):
        declared = node_classes[node_id].INPUT_TYPES()
        found[node_id] = {section: [input_entry(name, spec) for name, spec in declared.get(section, {}).items()]
                          for section in SECTIONS}
    return found


def widget_names(node: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """The node's widgets in the order widgets_values saves them: the required ones, then the optional ones."""
    return [e["name"] for section in SECTIONS for e in node.get(section, []) if e["widget"]]


def breaks(committed: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What in `current` (an `interface`) breaks a workflow saved with `committed`: a node gone; an input moved,
    renamed, removed, turned into or out of a widget, or of another type; a combo choice gone; a widget that is
    not appended after all the existing ones (a new required widget in front of the optional ones shifts them)."""
    found = []
    for node_id, old in committed.items():
        new = current.get(node_id)
        if new is None:
            found.append(f"{node_id}: the node is gone (node ids never change; keep the old id as an alias)")
            continue
        for section in SECTIONS:
            old_inputs, new_inputs = old.get(section, []), new.get(section, [])
            for position, was in enumerate(old_inputs):
                where = f"{node_id}.{was['name']} ({section} input {position + 1})"
                if position >= len(new_inputs):
                    found.append(f"{where} disappeared")
                    continue
                now = new_inputs[position]
                if now["name"] != was["name"]:
                    names = [e["name"] for e in new_inputs]
                    found.append(f"{where} moved or was renamed: {section} input {position + 1} is now "
                                 f"{now['name']!r}" + (f", {was['name']!r} is input {names.index(was['name']) + 1}"
                                                       if was["name"] in names else ""))
                elif now["type"] != was["type"]:
                    found.append(f"{where} changed type from {was['type']} to {now['type']}")
                elif now["widget"] != was["widget"]:
                    found.append(f"{where} {'became' if now['widget'] else 'is no longer'} a widget")
                elif was.get("listing") != now.get("listing"):
                    found.append(f"{where} changed between a fixed choice and a file listing")
                elif set(was.get("choices", [])) - set(now.get("choices", [])):
                    gone = [c for c in was["choices"] if c not in now.get("choices", [])]
                    found.append(f"{where} lost the choice(s) {gone}: a saved workflow holding one is refused")
        old_widgets, new_widgets = widget_names(old), widget_names(new)
        if new_widgets[:len(old_widgets)] != old_widgets:
            found.append(f"{node_id}: its widgets were {old_widgets} and are now {new_widgets}; new widgets go after "
                         f"all the existing ones (into `optional` when the node has optional widgets)")
    return found


def differences(committed: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Every difference, breaking or not, one line each (for the regeneration's output and the test's message)."""
    found = []
    for node_id in sorted(set(committed) | set(current)):
        old, new = committed.get(node_id), current.get(node_id)
        if old is None or new is None:
            found.append(f"{node_id}: {'new node' if old is None else 'node gone'}")
            continue
        for section in SECTIONS:
            old_inputs, new_inputs = old.get(section, []), new.get(section, [])
            for position in range(max(len(old_inputs), len(new_inputs))):
                was = old_inputs[position] if position < len(old_inputs) else None
                now = new_inputs[position] if position < len(new_inputs) else None
                if was != now:
                    found.append(f"{node_id} {section} input {position + 1}: {was} -> {now}")
    return found


def pyproject_version(pyproject: Path = PYPROJECT_PATH) -> str:
    match = _VERSION_LINE.search(pyproject.read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit(f"{pyproject} has no line `version = \"X.Y.Z\"`")
    return ".".join(match.groups())


def raised(version: str) -> str:
    major, minor, patch = (int(part) for part in version.split("."))
    return f"{major}.{minor}.{patch + 1}"


def dumps(version: str, nodes: Mapping[str, Any]) -> str:
    """The schema as JSON with one input per line, so that a diff of it reads as the interface change it is."""
    def entries(items: list[dict[str, Any]]) -> str:
        if not items:
            return "[]"
        return "[\n" + ",\n".join(f"    {json.dumps(e, ensure_ascii=False)}" for e in items) + "\n   ]"
    blocks = [f' {json.dumps(node_id)}: {{\n' + ",\n".join(f'  "{section}": {entries(node[section])}'
                                                           for section in SECTIONS) + "\n }"
              for node_id, node in nodes.items()]
    return f'{{"pack_version": {json.dumps(version)}, "nodes": {{\n' + ",\n".join(blocks) + "\n}}\n"


def load(schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    return json.loads(schema_path.read_text(encoding="utf-8"))


def regenerate(current: Mapping[str, Any], schema_path: Path = SCHEMA_PATH, pyproject: Path = PYPROJECT_PATH,
               allow_breaking: bool = False) -> list[str]:
    """Write `current` as the schema when it differs from the committed one, raising pyproject's version unless it
    was already raised since the schema was written. Returns what it did, one line each; refuses a breaking change
    (SystemExit naming it) unless `allow_breaking`."""
    from sefi_core.atomic import atomic_write_text

    committed = load(schema_path) if schema_path.exists() else {"pack_version": None, "nodes": {}}
    version = pyproject_version(pyproject)
    if committed["nodes"] == current:
        if committed["pack_version"] == version:
            return [f"{schema_path.name}: unchanged (version {version})"]
        atomic_write_text(schema_path, dumps(version, current))  # the version was raised by hand: record it
        return [f"{schema_path.name}: interface unchanged, recorded for version {version}"]
    broken = breaks(committed["nodes"], current)
    if broken and not allow_breaking:
        raise SystemExit("the interface changed in a way that breaks saved workflows; not written:\n  "
                         + "\n  ".join(broken))
    done = differences(committed["nodes"], current)
    if version == committed["pack_version"]:
        version = raised(version)
        atomic_write_text(pyproject, _VERSION_LINE.sub(f'version = "{version}"',
                                                       pyproject.read_text(encoding="utf-8"), count=1))
        done.append(f"{pyproject.name}: version raised to {version}")
    atomic_write_text(schema_path, dumps(version, current))
    done.append(f"{schema_path.name}: written for version {version}")
    return done


def booted_interface() -> dict[str, Any]:
    """Boot the host in a temporary base folder (no model files, so file listings are empty) and read the pack's
    nodes as it registered them."""
    from host_boot import embedded_host
    with tempfile.TemporaryDirectory(prefix="sefi-interface-") as tmp:
        host = embedded_host.boot_in_process(Path(tmp))
        return interface(host.pack_module.NODE_CLASS_MAPPINGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-breaking", action="store_true",
                        help="write even a change that breaks saved workflows (only before a release)")
    args = parser.parse_args(argv)
    for line in regenerate(booted_interface(), allow_breaking=args.allow_breaking):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
