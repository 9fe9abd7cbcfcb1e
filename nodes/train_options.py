"""SeFi Training Options: the trainer's less-touched settings on a node of their own.

SeFi Train Identity keeps what most people set (name, trigger, initializer, steps, learning rate, resolution and
what to watch); this node carries the rest, with the same defaults, to the trainer's optional `options` socket of
its own type. A trainer without it trains exactly as one with an untouched options node.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .edges import GRAPH_HIDDEN, check_graph_inputs, checked_inputs
from .identity import CATEGORY
from .train_policies import PARAMETRISATIONS
from .training import PRECISION_CHOICES
from ..sefi_core.generator import build_generator
from ..sefi_core.training import ATTENTION_LOSSES, LOSS_SITES, TrainSettings

TRAINING_OPTIONS = "SEFI_TRAINING_OPTIONS"
NODE_NAME = "SeFi Training Options"
CHECKPOINT_SIZE_HINT = ("400 MB for SD1.5, 1.5 GB for SDXL with the self-attention generator; under 1 MB for "
                        "direct tokens")

SETTING_OF_OPTION: Mapping[str, str] = MappingProxyType({
    "attention_loss": "attention_loss", "attention_weight": "attention_weight", "loss_sites": "loss_sites",
    "masked_diffusion_loss": "masked_diffusion", "prompt_templates": "templates", "flip_augmentation": "flip",
    "scale_augmentation": "scale_augment", "seed": "seed", "batch_size": "batch_size",
    "checkpoint_every": "checkpoint_every"})
"""Options that are TrainSettings fields (sefi_core/training.py), by the field's name: their defaults are the
settings' own, and settings_values() turns them into the settings' values — each default is written once."""
_GENERATOR_DEFAULTS = {k: p.default for k, p in inspect.signature(build_generator).parameters.items()
                       if p.default is not inspect.Parameter.empty}
"""The structure options' defaults (stages, vectors_per_token, kv_split) are build_generator's."""


def _setting_default(option: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(TrainSettings)}[SETTING_OF_OPTION[option]]
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return "\n".join(value) if option == "prompt_templates" else value  # the widget: one template a line


OPTION_INPUTS: Mapping[str, tuple] = MappingProxyType({
    "stages": ("INT", {"default": _GENERATOR_DEFAULTS["stages"], "min": 1, "max": 10, "tooltip": "Timestep "
                       "stages, each with its own K/V tokens (the paper uses 5)."}),
    "vectors_per_token": ("INT", {"default": _GENERATOR_DEFAULTS["vectors_per_token"], "min": 1, "max": 8,
                                  "tooltip": "Word slots the trigger expands to."}),
    "parametrisation": (list(PARAMETRISATIONS), {"default": next(iter(PARAMETRISATIONS)), "tooltip": "self-attention "
                        "generator: the paper's token generator; direct tokens: free vectors (faster, a "
                        "deviation)."}),
    "kv_split": ("BOOLEAN", {"default": _GENERATOR_DEFAULTS["kv_split"], "tooltip": "Separate key and value tokens "
                             "(the paper); off = one token per stage for both."}),
    "attention_loss": (list(ATTENTION_LOSSES), {"default": _setting_default("attention_loss"), "tooltip": "reference: "
                       "the paper's face-wise loss (maps of the trigger follow those of 'person'); mask: pull "
                       "attention into the face mask; off."}),
    "attention_weight": ("FLOAT", {"default": _setting_default("attention_weight"), "min": 0.0, "max": 1000.0,
                                   "step": 0.001, "tooltip": "The attention loss's weight lambda (paper: 0.003)."}),
    "loss_sites": (list(LOSS_SITES), {"default": _setting_default("loss_sites"), "tooltip": "Cross-attention "
                   "resolutions the attention loss reads: quarter = latent/4 (16×16 at 512 px), quarter+half adds "
                   "latent/2, all."}),
    "masked_diffusion_loss": ("BOOLEAN", {"default": _setting_default("masked_diffusion_loss"), "tooltip": "Only "
                                          "reconstruct the face mask area (needs a mask)."}),
    "prompt_templates": ("STRING", {"multiline": True, "default": _setting_default("prompt_templates"),
                                    "tooltip": "Training prompts, one per line; {} is the trigger."}),
    "flip_augmentation": ("BOOLEAN", {"default": _setting_default("flip_augmentation"), "tooltip": "Randomly mirror "
                                      "the photos. Off by default: faces are not mirror-symmetric (parting, "
                                      "moles)."}),
    "scale_augmentation": ("BOOLEAN", {"default": _setting_default("scale_augmentation"), "tooltip": "Random zoom "
                                       "0.9–1.1 (in latent space)."}),
    "seed": ("INT", {"default": _setting_default("seed"), "min": 0, "max": 2**63 - 1, "tooltip": "Seed of all "
                     "training randomness (same seed = same result on CPU); the sample renders use it too."}),
    "batch_size": ("INT", {"default": _setting_default("batch_size"), "min": 1, "max": 64, "tooltip": "Samples per "
                           "step."}),
    "checkpoint_every": ("INT", {"default": _setting_default("checkpoint_every"), "min": 0, "max": 100000,
                                 "tooltip": "Save a resumable checkpoint every N steps (0 = only at the end / on "
                                 "Cancel)."}),
    "resume_from": ("STRING", {"default": "", "tooltip": "Name of a training checkpoint in "
                               "models/sefi_identities/checkpoints to continue from, e.g. the name of an interrupted "
                               "run (empty = start fresh)."}),
    "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing identity file of the same name (and "
                              "its step snapshots), or start over a run whose unfinished checkpoint has that name."}),
    "precision": (list(PRECISION_CHOICES), {"default": "auto", "tooltip": "Compute dtype of the frozen U-Net: auto = "
                  "fp32 on CPU, else the loaded model's own dtype, so its weights are used in place; another choice "
                  "casts them once (originals parked in RAM while training). fp16 uses dynamic loss scaling. The "
                  "trained tokens always stay fp32; CLIP runs in fp32."}),
    "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute each U-Net block in the backward "
                                           "pass instead of keeping its activations: trades compute (~30% slower) "
                                           "for memory on large models/GPUs. Same result."}),
    "keep_checkpoint": ("BOOLEAN", {"default": False, "tooltip": "Keep the resumable checkpoint "
                                    f"(~{CHECKPOINT_SIZE_HINT}) once the identity is saved; off = delete it then (an "
                                    "interrupted or failed run always keeps it)."}),
    "allow_multiple_people": ("BOOLEAN", {"default": False, "tooltip": "Train even when the photos show different "
                                          "people (checked with face descriptors); off = refuse such a batch, since "
                                          "the identity would be neither of them."}),
    "compile_unet": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the U-Net's blocks (CUDA graphs on a "
                                 "GPU). The first step compiles (a minute or more; cached on disk for the next run), "
                                 "later steps are faster. Same result within rounding. Needs Triton on a GPU, a C++ "
                                 "compiler on the CPU."}),
    "stop_on_watch_failure": ("BOOLEAN", {"default": False, "tooltip": "What a failed sample render, snapshot or "
                                          "preview (e.g. out of GPU memory while sampling) does: off = it is logged, "
                                          "shown on the node's preview and recorded in the identity, and training "
                                          "goes on; on = the run stops there with that step's checkpoint written "
                                          "(resume_from continues it)."}),
})
"""The options in widget order: from the first release on, new ones are only appended (saved workflows keep their
widget values by position)."""

OPTION_DEFAULTS: Mapping[str, Any] = MappingProxyType({name: spec[1]["default"]
                                                       for name, spec in OPTION_INPUTS.items()})


def settings_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """The TrainSettings fields the options set ({field: value}; templates as a list, one a line, blank lines
    dropped)."""
    values = {}
    for option, setting in SETTING_OF_OPTION.items():
        value = options[option]
        if option == "prompt_templates":
            value = [t.strip() for t in str(value).splitlines() if t.strip()]
        else:
            value = type(_setting_default(option))(value)
        values[setting] = value
    return values


def training_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every option with its value: those of a connected SeFi Training Options node, else the defaults."""
    chosen = dict(OPTION_DEFAULTS)
    if options is not None:
        unknown = sorted(set(options) - set(OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"options: unknown training option(s) {unknown}; connect a SeFi Training Options node")
        chosen.update(options)
    return chosen


TRAINER_INPUTS_HERE = {name: "SeFi Train Identity (set it on the trainer this node feeds)" for name in (
    "name", "trigger", "initializer", "steps", "learning_rate", "resolution", "mask", "preview_every",
    "sample_prompt", "sample_every", "save_every")}
"""The trainer's own inputs, which an API graph may put here by mistake (they would be dropped)."""


class SeFiTrainingOptions:
    DESCRIPTION = ("The less-touched settings of SeFi Train Identity (method, losses, augmentation, checkpoints, "
                   "speed). Connect it to the trainer's options input; without it the trainer uses these defaults.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(OPTION_INPUTS), "hidden": dict(GRAPH_HIDDEN)}

    RETURN_TYPES = (TRAINING_OPTIONS,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("For SeFi Train Identity's options input.",)
    FUNCTION = "options"
    CATEGORY = CATEGORY

    def options(self, sefi_prompt=None, sefi_node_id=None, **values):
        check_graph_inputs(SeFiTrainingOptions, NODE_NAME, sefi_prompt, sefi_node_id, TRAINER_INPUTS_HERE)
        return (MappingProxyType(training_options(checked_inputs(SeFiTrainingOptions, NODE_NAME, values))),)


NODE_CLASS_MAPPINGS = {"SeFiTrainingOptions": SeFiTrainingOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"SeFiTrainingOptions": "SeFi Training Options"}
