"""Workflows saved with an earlier widget layout of a node: detected from the values, refused with what to do.

A UI workflow stores a node's widget values by position (`widgets_values`), not by name. When a node's widgets
change order, a workflow saved before loads every value into whatever widget now sits at its position: the first
workflows/01 (every training setting on the trainer) loads `resolution=5` (its stages), `sample_prompt='self-attention
generator'` (its parametrisation), `save_every='reference'` (its attention_loss). Some of these the host refuses with
a message about the wrong widget; others would train on shifted values.

The rule: a node's values come from an earlier layout when at least one of them cannot belong to the widget it sits
in now (wrong type, outside the declared range, not one of the choices) and every one of them fits the widget that
held its position in that earlier layout. A single wrong value from an API client fits no earlier layout and gets
the ordinary message of the widget; values that fit both layouts decide nothing. The earlier layouts are the pack's
own history (git log -p -- workflows/01_train_identity.json), by widget name; the names' types, ranges and choices
are today's (a setting that moved kept its spec).

Where it runs: on the prompt as the server received it (nodes/__init__.py registers `refuse_stale_layouts` as a
prompt handler, before the host's validation converts or refuses single values), and at the node's entry for
Python callers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .edges import RefusedValue

CONTROL_AFTER_GENERATE = "control_after_generate"
"""The frontend's own widget after an INT named seed / noise_seed (fixed, increment, …): stored in widgets_values,
never sent to the host."""
CONTROL_SPEC = (["fixed", "increment", "decrement", "randomize"], {})
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")


@dataclass(frozen=True)
class EarlierLayout:
    """A node's widgets in the order an earlier release stored them."""
    label: str       # in the message: which layout the values fit
    widgets: tuple[str, ...]
    fix: str         # in the message: what to do


TRAINER_BEFORE_OPTIONS = EarlierLayout(
    label="the layout it had before SeFi Training Options existed (every training setting on the trainer)",
    widgets=("name", "trigger", "initializer", "steps", "learning_rate", "stages", "vectors_per_token",
             "parametrisation", "kv_split", "attention_loss", "attention_weight", "loss_sites",
             "masked_diffusion_loss", "prompt_templates", "flip_augmentation", "scale_augmentation", "seed",
             CONTROL_AFTER_GENERATE, "resolution", "batch_size", "checkpoint_every", "resume_from", "overwrite",
             "precision", "gradient_checkpointing", "keep_checkpoint", "allow_multiple_people", "compile_unet"),
    fix=("re-create the node (delete it, add SeFi Train Identity again, reconnect its inputs and set its values; the "
         "settings it no longer has are on a SeFi Training Options node wired to its options input), or re-load the "
         "shipped workflows/01_train_identity.json"),
)
EARLIER_LAYOUTS: Mapping[str, tuple[EarlierLayout, ...]] = {"SeFiTrainIdentity": (TRAINER_BEFORE_OPTIONS,)}


def _specs(node_class: type) -> dict[str, tuple]:
    declared = node_class.INPUT_TYPES()
    return {**declared.get("required", {}), **declared.get("optional", {})}


def is_widget(spec: tuple) -> bool:
    return isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_KINDS


def widget_order(node_class: type) -> list[str]:
    """The node's widgets in the order the frontend stores their values (sockets have none; a seed is followed
    by its control widget)."""
    order = []
    for name, spec in _specs(node_class).items():
        if is_widget(spec):
            order.append(name)
            if spec[0] == "INT" and (name in ("seed", "noise_seed") or spec[1:] and spec[1].get(
                    "control_after_generate")):
                order.append(CONTROL_AFTER_GENERATE)
    return order


def misfit(spec: tuple, value: Any) -> str | None:
    """Why `value` cannot be the value of a widget declared as `spec`; None when it can."""
    kind, extra = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, (list, tuple)):
        return None if isinstance(value, str) and value in kind else "not one of its choices"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) or value in ("true", "false") else "not true/false"
    if kind == "STRING":
        return None if isinstance(value, str) else "not text"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "not a number"
    if kind == "INT" and not float(value).is_integer():
        return "not a whole number"
    if "min" in extra and value < extra["min"]:
        return f"below its minimum {extra['min']}"
    if "max" in extra and value > extra["max"]:
        return f"above its maximum {extra['max']}"
    return None


def _fits_earlier(spec: tuple, value: Any) -> bool:
    # the hosts' validation turns a BOOLEAN widget's true/false into 1/0 where it is read as a number
    if spec[0] == "BOOLEAN" and not isinstance(value, bool) and value in (0, 1):
        return True
    return misfit(spec, value) is None


def stale_layout_message(node_class: type, node_name: str, values: Mapping[str, Any],
                         earlier_specs: Mapping[str, tuple] | None = None) -> str | None:
    """The refusal for `values` (widget name -> value, as the graph gives them) when they come from an earlier
    layout of the node; None when they do not. Links and absent values decide nothing. `earlier_specs`: the specs
    of widget names the node no longer has (settings that moved to another node)."""
    layouts = EARLIER_LAYOUTS.get(getattr(node_class, "__name__", ""), ())
    if not layouts:
        return None
    now = _specs(node_class)
    then = {**(earlier_specs or {}), **now, CONTROL_AFTER_GENERATE: CONTROL_SPEC}
    known = [(i, name, values[name]) for i, name in enumerate(widget_order(node_class))
             if name in values and values[name] is not None and not _is_link(values[name])]
    wrong = [(name, value, why) for _, name, value in known
             if name != CONTROL_AFTER_GENERATE and (why := misfit(now[name], value))]
    if not wrong:
        return None
    for layout in layouts:
        held = {i: layout.widgets[i] for i, _, _ in known if i < len(layout.widgets)}
        if len(held) < len(known) or not all(_fits_earlier(then[held[i]], value) for i, _, value in known
                                             if held[i] in then):
            continue
        shown = ", ".join(f"{name}={_short(value)} ({why})" for name, value, why in wrong)
        shifted = ", ".join(f"{name} holds what was {held[i]}" for i, name, _ in known if held[i] != name)
        return (f"{node_name}: this node's widget values come from a workflow saved with {layout.label}: {shown}. "
                f"A workflow stores widget values by position, so they have shifted ({shifted}) and the node would "
                f"run on the wrong settings. To fix it: {layout.fix}.")
    return None


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def refuse_stale_layouts(json_data: dict, classes: Mapping[str, type], earlier_specs: Mapping[str, tuple],
                         names: Mapping[str, str]) -> dict:
    """Prompt handler: in an API prompt, a node of `classes` whose widget values come from an earlier layout gets
    one of its numeric widget values replaced by a RefusedValue carrying the message, which the host's validation
    refuses naming the node (both hosts convert their required INT/FLOAT values with int()/float()). `names`:
    class type -> display name. Returns json_data (changed in place)."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node_id, node in prompt.items():
        node_class = classes.get(node.get("class_type")) if isinstance(node, dict) else None
        inputs = node.get("inputs") if node_class is not None else None
        if not isinstance(inputs, dict):
            continue
        message = stale_layout_message(node_class, names.get(node["class_type"], node["class_type"]), inputs,
                                       earlier_specs)
        if message is None:
            continue
        target = _carrier(node_class, inputs)
        if target is not None:
            inputs[target] = RefusedValue(inputs[target], message)
    return json_data


def _carrier(node_class: type, inputs: Mapping[str, Any]) -> str | None:
    """The widget that carries the refusal: the first required INT/FLOAT that is set (not linked) and wrong, else
    the first required INT/FLOAT that is set — the hosts validate and convert those."""
    required = node_class.INPUT_TYPES().get("required", {})
    numeric = [name for name, spec in required.items() if spec[0] in ("INT", "FLOAT")
               and name in inputs and not _is_link(inputs[name])]
    wrong = [name for name in numeric if misfit(required[name], inputs[name])]
    return (wrong or numeric or [None])[0]


def check_widget_layout(node_class: type, node_name: str, values: Mapping[str, Any],
                        earlier_specs: Mapping[str, tuple] | None = None) -> None:
    """At the node's entry: raise the stale-layout refusal for `values` (Python callers, hosts without the
    prompt handler)."""
    message = stale_layout_message(node_class, node_name, values, earlier_specs)
    if message is not None:
        raise ValueError(message)
