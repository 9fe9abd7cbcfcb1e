"""What arrives at a node's inputs is checked there, and a wrong value is named with the input that got it.

The host checks the types of links only where both ends declare one: a link from a node whose output type is a
wildcard ("*", reroutes and "any" outputs of other packs), or a graph sent to the API, reaches a node's function
with whatever it carries. Without a check here the user sees what the first line that used it happened to raise
("'Tensor' object has no attribute 'get_model_object'", "name is empty") or, worse, a run that does the wrong
thing (an IMAGE taken as a mask). `checked_inputs` compares every value with the type its node declares.

BOOLEAN inputs: the frontend sends JSON true/false, an API client may send the strings "true"/"false", and the
hosts differ in what they do with anything else — upstream validation turns every value into `bool(value)`, so the
string "false" becomes True before any node code sees it; the PyPI host passes the string through, where it is
just as true. `normalise_prompt_booleans` runs on the prompt as the server received it (host.add_prompt_handler),
the one place that sees the value as sent, and `as_boolean` at the node edge covers Python callers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..sefi_core.identity import Identity

TRUE_FALSE = {"true": True, "false": False}


class RefusedValue(str):
    """A widget value that a prompt handler found wrong, left in the prompt to be refused by the host's validation
    with `message`: its truth value and its conversion to a number raise instead of giving one (both hosts run
    bool()/int()/float() on BOOLEAN and required INT/FLOAT values, and report the error naming the node and the
    input). JSON still sees a plain string (the host echoes it in the error)."""

    message: str = ""

    def __new__(cls, raw: Any, message: str) -> "RefusedValue":
        text = super().__new__(cls, raw if isinstance(raw, str) else repr(raw))
        text.message = message
        return text

    def _refuse(self, *_):
        raise ValueError(self.message)

    __bool__ = __int__ = __float__ = __index__ = _refuse

    def __reduce__(self):  # the hosts deep-copy (and may pickle) queued prompts: stay what it is
        return RefusedValue, (str(self), self.message)


class RefusedBoolean(RefusedValue):
    """A BOOLEAN widget value that is neither true nor false, as normalise_prompt_booleans leaves it in the prompt.

    Upstream's validation calls bool() on BOOLEAN values, which turns this into a validation error of the node
    carrying the message (and the input's name); the PyPI host hands it to the node, whose as_boolean refuses it."""

    input_name: str = ""

    def __new__(cls, raw: Any, input_name: str) -> "RefusedBoolean":
        text = super().__new__(cls, raw, "")
        text.message = boolean_message(input_name, str(text))
        text.input_name = input_name
        return text

    def __reduce__(self):
        return RefusedBoolean, (str(self), self.input_name)


def boolean_message(input_name: str, raw: Any) -> str:
    shown = raw if isinstance(raw, str) else repr(raw)
    return (f"{input_name} must be true or false, got {shown[:60]!r}; set the toggle, or send the JSON value "
            f"true/false (or the string \"true\"/\"false\")")


def as_boolean(value: Any, input_name: str) -> bool:
    """True/False from a BOOLEAN input: a bool, or the string "true"/"false" (any case); anything else is refused
    with the input's name."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and not isinstance(value, RefusedValue) and value.strip().lower() in TRUE_FALSE:
        return TRUE_FALSE[value.strip().lower()]
    raise ValueError(boolean_message(input_name, value))


def boolean_inputs(node_class: type) -> list[str]:
    """Names of a node class's BOOLEAN inputs (required and optional)."""
    declared = node_class.INPUT_TYPES()
    return [name for section in ("required", "optional") for name, spec in declared.get(section, {}).items()
            if spec[0] == "BOOLEAN"]


def normalise_prompt_booleans(json_data: dict, classes: Mapping[str, type]) -> dict:
    """In an API prompt, the BOOLEAN widget values of the nodes in `classes`: "true"/"false" become true/false,
    anything else (other strings, numbers, null) a RefusedBoolean that the host refuses naming the input. Links
    and other nodes are left alone. Returns json_data (changed in place), as the host's prompt handlers do."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node in prompt.values():
        node_class = classes.get(node.get("class_type")) if isinstance(node, dict) else None
        inputs = node.get("inputs") if node_class is not None else None
        if not isinstance(inputs, dict):
            continue
        for name in boolean_inputs(node_class):
            if name not in inputs or isinstance(inputs[name], list):  # absent, or a link [node id, output]
                continue
            try:
                inputs[name] = as_boolean(inputs[name], name)
            except ValueError:
                inputs[name] = RefusedBoolean(inputs[name], name)
    return json_data


# --- types ------------------------------------------------------------------------------------------------------

def _is_image(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] in (1, 3, 4) and v.is_floating_point()


def _is_mask(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() in (2, 3) and v.is_floating_point()


def _has(*names: str) -> Callable[[Any], bool]:
    return lambda v: all(callable(getattr(v, n, None)) for n in names)


TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "IMAGE": _is_image,
    "MASK": _is_mask,
    # what the pack calls on them: duck-typed, so other packs' wrappers of the host's classes pass
    "MODEL": _has("get_model_object", "clone"),
    "CLIP": _has("tokenize", "encode_from_tokens"),
    "VAE": _has("encode", "decode"),
    "SEFI_IDENTITY": lambda v: isinstance(v, Identity),
    # SeFi Training Options' output (its keys are checked by nodes/train_options.training_options)
    "SEFI_TRAINING_OPTIONS": lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
    "STRING": lambda v: isinstance(v, str),
    "INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}
TYPE_WORDS = {
    "IMAGE": "an IMAGE ([batch, height, width, 3] pixels, e.g. from Load Image)",
    "MASK": "a MASK ([batch, height, width] or [height, width], e.g. SeFi Face Mask's mask)",
    "MODEL": "a MODEL (e.g. Load Checkpoint's MODEL output)",
    "CLIP": "a CLIP (e.g. Load Checkpoint's CLIP output)",
    "VAE": "a VAE (e.g. Load Checkpoint's VAE output)",
    "SEFI_IDENTITY": "an identity (from SeFi Load Identity or SeFi Train Identity)",
    "SEFI_TRAINING_OPTIONS": "the options output of a SeFi Training Options node (unconnected: the defaults)",
    "STRING": "text",
    "INT": "a whole number",
    "FLOAT": "a number",
}


def describe(value: Any) -> str:
    """What a value is, in the words of the graph's types where it is one of them."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}{'…' if len(value) > 40 else ''}"
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        if _is_image(value):
            return f"an IMAGE {shape}"
        if _is_mask(value):
            return f"a MASK {shape}"
        return f"a tensor {shape} ({str(value.dtype).removeprefix('torch.')})"
    for kind in ("SEFI_IDENTITY", "MODEL", "CLIP", "VAE"):
        if TYPE_CHECKS[kind](value):
            return "an identity" if kind == "SEFI_IDENTITY" else f"a {kind}"
    if isinstance(value, list) and value and all(isinstance(c, (list, tuple)) and len(c) == 2 for c in value):
        return "a CONDITIONING"
    return f"a {type(value).__name__}"


def type_error(node_name: str, input_name: str, kind: str, value: Any) -> TypeError:
    return TypeError(f"{node_name}: input '{input_name}' got {describe(value)}, but it takes "
                     f"{TYPE_WORDS.get(kind, kind)}; connect one there")


def checked_inputs(node_class: type, node_name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` (input name -> value) checked against the types `node_class` declares: BOOLEAN inputs come back as
    bools (as_boolean); a value of another type raises TypeError naming the node, the input and what it got (the
    value of a list of choices must be text; whether it is one of them the node itself says); a number outside the
    declared min/max (or not finite) raises ValueError naming the input and its range. With INPUT_IS_LIST, every
    element of each list is checked."""
    declared = node_class.INPUT_TYPES()
    specs = {**declared.get("required", {}), **declared.get("optional", {})}
    as_list = bool(getattr(node_class, "INPUT_IS_LIST", False))
    out = dict(values)
    for name, value in values.items():
        if name not in specs or value is None and name in declared.get("optional", {}):
            continue
        kind, extra = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
        items = value if as_list and isinstance(value, list) else [value]
        checked = [_check_one(node_name, name, kind, extra, item) for item in items]
        out[name] = checked if as_list and isinstance(value, list) else checked[0]
    return out


def _check_one(node_name: str, name: str, kind: Any, extra: Mapping[str, Any], value: Any) -> Any:
    if kind == "BOOLEAN":
        return as_boolean(value, name)
    if isinstance(kind, (list, tuple)):  # a list of choices: the node says which values it takes, and why
        kind = "STRING"
    check = TYPE_CHECKS.get(kind)
    if check is not None and not check(value):
        raise type_error(node_name, name, kind, value)
    return _check_range(node_name, name, extra, value) if kind in ("INT", "FLOAT") else value


def _check_range(node_name: str, name: str, extra: Mapping[str, Any], value: Any) -> Any:
    """A number inside the range its input declares. The host checks a widget's typed value, not what a link (a
    primitive node, another pack's seed node) or a Python caller hands over: a seed of 2**64 reached torch
    ("Overflow when unpacking long long")."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{node_name}: {name}={value} is not a finite number; set {name} to a number")
    low, high = extra.get("min"), extra.get("max")
    if low is not None and value < low:
        problem = f"below its minimum {low}"
    elif high is not None and value > high:
        problem = f"above its maximum {high}"
    else:
        return value
    allowed = (f"between {low} and {high}" if low is not None and high is not None
               else f"to at least {low}" if low is not None else f"to at most {high}")
    raise ValueError(f"{node_name}: {name}={value} is {problem}; set {name} {allowed}")


# --- inputs a graph sets that the node does not take -------------------------------------------------------------

GRAPH_HIDDEN = {"sefi_prompt": "PROMPT", "sefi_node_id": "UNIQUE_ID"}
"""Hidden inputs through which a node sees the graph as it was sent and its own id in it (both hosts fill them)."""


def declared_inputs(node_class: type) -> set[str]:
    declared = node_class.INPUT_TYPES()
    return {name for section in ("required", "optional", "hidden") for name in declared.get(section, {})}


def check_graph_inputs(node_class: type, node_name: str, prompt: Any, node_id: Any,
                       belongs_elsewhere: Mapping[str, str] | None = None) -> None:
    """Refuse inputs that the graph sets on this node but the node does not take. The hosts drop them without a
    word, so an API graph written for an earlier layout (a setting that moved to another node) would run with that
    setting's default. `belongs_elsewhere`: input name -> where it belongs now (named in the message). Without the
    graph (a Python caller) there is nothing to check."""
    node = prompt.get(str(node_id)) if isinstance(prompt, Mapping) and node_id is not None else None
    inputs = node.get("inputs") if isinstance(node, Mapping) else None
    if not isinstance(inputs, Mapping):
        return
    unknown = sorted(set(inputs) - declared_inputs(node_class))
    if not unknown:
        return
    elsewhere = belongs_elsewhere or {}
    moved = [name for name in unknown if name in elsewhere]
    others = [name for name in unknown if name not in elsewhere]
    parts = []
    for place in dict.fromkeys(elsewhere[name] for name in moved):
        names = ", ".join(name for name in moved if elsewhere[name] == place)
        parts.append(f"{names} {'is a setting' if ',' not in names else 'are settings'} of {place}: set "
                     f"{'it' if ',' not in names else 'them'} there")
    if others:
        parts.append(f"{', '.join(others)} {'is not an input' if len(others) == 1 else 'are not inputs'} of "
                     f"{node_name}: remove {'it' if len(others) == 1 else 'them'} or correct the spelling")
    raise ValueError(f"{node_name} (node {node_id}): the graph sets {', '.join(unknown)} on this node, which does not "
                     f"take {'it' if len(unknown) == 1 else 'them'}; the host would drop "
                     f"{'it' if len(unknown) == 1 else 'them'} and run with the default instead. "
                     + "; ".join(parts))
