"""What SeFi Train Identity's inputs must be before anything trains, beyond their declared types and ranges
(nodes/edges.py): each refusal names the widget and what to do, and each closes a way an input was accepted but
silently did nothing (issue 32):

- settings an API graph still sets on the trainer although they moved to SeFi Training Options;
- a trigger that prompts already use (sefi_core.trigger_words);
- masks that cannot belong to their photos (another size, inverted) and photos whose centre crop is a sliver;
- more sample prompts than a sampling point can render in reasonable time, and what sampling will cost.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .edges import check_graph_inputs, checked_inputs
from .widget_layouts import check_widget_layout
from .sample_renders import SAMPLE_STEPS
from ..sefi_core.trigger_words import check_trigger_word

log = logging.getLogger("sefi")

REFERENCE_WORD = "person"
"""The word of the attention loss's reference prompt ('a photo of the face of person')."""
OPTIONS_PLACE = "SeFi Training Options (wire its options output to this node's options input)"

MAX_SAMPLE_PROMPTS = 16
"""Prompts rendered at each sampling point. Each costs SAMPLE_STEPS sampler steps; 16 already take about as long as
130 training steps, and the grid on the node gets one column per prompt. More belong in a graph after training."""
SAMPLER_FORWARDS = 2      # a sampler step with cfg: one U-Net pass for the prompt, one for the negative
TRAINING_FORWARDS = 3     # a training step: forward + backward, about three forward passes per sample

MIN_KEPT_SHARE = 1 / 3
"""A photo whose centre crop keeps less than this share of its long side is refused (a 10000×10 image trains on a
sliver); below WARN_KEPT_SHARE it is trained with a warning."""
WARN_KEPT_SHARE = 1 / 2
INVERTED_COVERAGE = 0.5
"""A face mask covering more than half of its photo and most of every border is the background's, not the face's."""


def check_graph(node_class: type, node_name: str, prompt: Any, node_id: Any, moved: Sequence[str]) -> None:
    """Refuse settings the API graph sets on the trainer that it does not take; `moved` are those now on SeFi
    Training Options (the host drops them: a `resume_from` there trained from step 0)."""
    check_graph_inputs(node_class, node_name, prompt, node_id, {name: OPTIONS_PLACE for name in moved})


def check_trigger(trigger: str, initializer: str) -> None:
    check_trigger_word(str(trigger), str(initializer), REFERENCE_WORD)


def check_masks(photos: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Each mask ([H, W]) must be its photo's ([H, W, C]): the same size (or the same picture scaled: aligned after
    the centre crop) and the face's, not the background's."""
    for i, (photo, mask) in enumerate(zip(photos, masks)):
        (ph, pw), (mh, mw) = photo.shape[-3:-1], mask.shape[-2:]
        if (mh, mw) != (ph, pw) and abs(mh * pw - mw * ph) > max(ph, pw, mh, mw):
            raise ValueError(f"mask {i} (counted from 0) is {mw}×{mh} pixels but its photo is {pw}×{ph}: it "
                             f"cannot belong to it (after the centre crop it would cover another part of the "
                             f"picture); connect the mask made from this photo, e.g. SeFi Face Mask's mask output "
                             f"for the same images, in the same order")
        inside = mask.float() > 0.5
        coverage = float(inside.float().mean())
        borders = [inside[0, :], inside[-1, :], inside[:, 0], inside[:, -1]]
        if coverage > INVERTED_COVERAGE and all(float(b.float().mean()) > 0.5 for b in borders):
            raise ValueError(f"mask {i} (counted from 0) covers {coverage:.0%} of its photo and reaches all four "
                             f"borders: it looks inverted (the background 1, the face 0) or it is no face mask. "
                             f"The mask must be 1 on the face: invert it (InvertMask) or connect SeFi Face Mask's "
                             f"mask")


def check_photo_shapes(photos: Sequence[torch.Tensor], name: str) -> None:
    """Each photo is trained as its centre square (shorter side resized to the resolution); refuse photos of which
    that keeps less than a third, warn below a half."""
    for i, photo in enumerate(photos):
        h, w = photo.shape[-3:-1]
        kept = min(h, w) / max(h, w)
        advice = ("crop it around the face first (e.g. SeFi Face Mask's face_crops output, or an image crop node)")
        if kept < MIN_KEPT_SHARE:
            raise ValueError(f"images: photo {i} (counted from 0) is {w}×{h} pixels; training uses its centre "
                             f"square, {kept:.0%} of it, which would hardly show the face; {advice}")
        if kept < WARN_KEPT_SHARE:
            log.warning("[SeFi] %s: photo %d is %d×%d pixels; training uses only its centre square (%.0f%% of "
                        "it): if the face is off-centre, %s", name, i, w, h, 100 * kept, advice)


def check_sample_prompts(prompts: Sequence[str]) -> None:
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        raise ValueError(f"sample_prompt has {len(prompts)} prompts; at most {MAX_SAMPLE_PROMPTS} are rendered at "
                         f"each sampling point (each costs {SAMPLE_STEPS} sampler steps, and the preview waits for "
                         f"all of them): keep the ones you want to watch, and render the others after training "
                         f"with SeFi Apply Identity")


def sampling_cost(prompts: int, sample_every: int, steps: int, batch_size: int) -> tuple[int, float]:
    """(sampling points, their cost in training steps): a rough measure from U-Net passes, SAMPLER_FORWARDS per
    sampler step against TRAINING_FORWARDS per sample of a training step."""
    if not prompts or sample_every <= 0:
        return 0, 0.0
    points = steps // sample_every
    per_point = prompts * SAMPLE_STEPS * SAMPLER_FORWARDS / (TRAINING_FORWARDS * max(1, batch_size))
    return points, points * per_point


def log_sampling_cost(name: str, prompts: Sequence[str], sample_every: int, steps: int, batch_size: int) -> None:
    """Say up front what the sample renders will cost, in training steps (the run's own unit of time)."""
    points, cost = sampling_cost(len(prompts), sample_every, steps, batch_size)
    if not points:
        return
    share = cost / max(1, steps)
    (log.warning if share > 1 else log.info)(
        "[SeFi] %s: sample renders: %d prompt(s) x %d sampler steps at %d sampling point(s) take about as long as "
        "%.0f training steps (%.0f%% on top of the %d steps; estimate from U-Net passes)%s", name, len(prompts),
        SAMPLE_STEPS, points, cost, 100 * share, steps,
        "; fewer prompts or a larger sample_every make the run faster" if share > 1 else "")


def check_entry(node_class: type, node_name: str, values: Mapping[str, Any], prompt: Any, node_id: Any,
                moved: Mapping[str, tuple]) -> None:
    """What the trainer checks first, from its inputs as they arrive (INPUT_IS_LIST: each a list): the graph's
    own view of this node (settings it does not take, values of an earlier widget layout), the options socket,
    the trigger. `moved`: SeFi Training Options' inputs (name -> spec), where the trainer's other settings went."""
    one = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in values.items()}
    check_graph(node_class, node_name, _one(prompt), _one(node_id), list(moved))
    check_widget_layout(node_class, node_name, one, moved)
    checked = checked_inputs(node_class, node_name, {"options": values.get("options"),
                                                     "trigger": values["trigger"],
                                                     "initializer": values["initializer"]})
    check_trigger(_one(checked["trigger"]), _one(checked["initializer"]))


def _one(x: Any) -> Any:
    return x[0] if isinstance(x, list) and x else x
