"""The release promise, checked: every node the pack registers has the inputs tests/data/node_interface.json
records for this version (pyproject's `version`), and none of them moved, changed type or disappeared — new
inputs may only be appended (tools/node_interface.py says why and how)."""
from __future__ import annotations

from tools import node_interface as ni


def test_no_input_of_any_node_moved_changed_type_or_disappeared(host):
    broken = ni.breaks(ni.load()["nodes"], ni.interface(host.pack_module.NODE_CLASS_MAPPINGS))
    assert not broken, ("a workflow saved with the committed interface would load its values into the wrong "
                        "widgets; append new inputs at the end instead:\n" + "\n".join(broken))


def test_the_committed_interface_is_this_version_of_every_registered_node(host):
    committed, current = ni.load(), ni.interface(host.pack_module.NODE_CLASS_MAPPINGS)
    assert set(current) == set(host.pack_module.NODE_CLASS_MAPPINGS)  # every node the pack registers
    assert committed["nodes"] == current, (
        f"the node interface differs from tests/data/node_interface.json; when the test above passes (inputs "
        f"only appended), regenerate it, which raises pyproject's version: {ni.REGENERATE}\n" + "\n".join(ni.differences(committed["nodes"], current)))
    assert committed["pack_version"] == ni.pyproject_version(), (
        f"pyproject's version is not the one the interface was recorded for: {ni.REGENERATE}")
