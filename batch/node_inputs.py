"""Reading a node's inputs from its /object_info spec (the same dict INPUT_TYPES returns, under "input")."""
from __future__ import annotations

from typing import Any


def widget_defaults(info: dict[str, Any]) -> dict[str, Any]:
    """Widget defaults of a node from /object_info, for required inputs that are not links."""
    out = {}
    for name, spec in info.get("input", {}).get("required", {}).items():
        kind = spec[0] if spec else None
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(kind, list):  # a combo: its default, else its first choice
            out[name] = options.get("default", kind[0] if kind else None)
        elif kind == "COMBO":
            choices = options.get("options", [])
            out[name] = options.get("default", choices[0] if choices else None)
        elif "default" in options:
            out[name] = options["default"]
    return out


def input_names(info: dict[str, Any]) -> set[str]:
    spec = info.get("input", {})
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def combo_choices(info: dict[str, Any], name: str) -> list[str]:
    spec = info.get("input", {}).get("required", {}).get(name) or [[]]
    if isinstance(spec[0], list):
        return list(spec[0])
    return list((spec[1] if len(spec) > 1 else {}).get("options", []))


OPTIONS_NODE = "SeFiTrainingOptions"
"""The trainer's less-touched settings live on this node (its `options` input); a batch job names them as it
names the trainer's own inputs."""


def split_options(train: dict[str, Any], options_info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer's inputs as a batch job gives them (its own and its options' alike) -> (the trainer's own inputs,
    SeFi Training Options' inputs with its widget defaults filled in)."""
    names = input_names(options_info)
    own = {k: v for k, v in train.items() if k not in names}
    return own, {**widget_defaults(options_info), **{k: v for k, v in train.items() if k in names}}
