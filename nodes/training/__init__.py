"""Host adapter for SeFi training: builds the `step_fn` that the host-free loop (sefi_core.training) runs.

One concern a module:

* `frozen` — the frozen models made trainable-through: ordinary-tensor stand-ins for the weights, safe in-place
  residuals, widened CLIP linears, the U-Net's compute dtype, and `training_context` that sets it all up and undoes it;
* `text_encoder` — the host's CLIP run by hand so spliced vectors get gradients, and the column pairing of the
  training prompt with the reference prompt;
* `unet_step` — the U-Net with the K/V split, the attention capture at the loss sites and gradient checkpointing;
* `sefi_step` — `SefiStep`, the step function itself (latents, random draws, the losses) and its evaluation;
* `attention_probe` — the attention-map picture: each photo's identity and reference maps at the loss sites.

`nodes.host` stays the only module that knows which ComfyUI it runs in.
"""
from .attention_probe import attention_picture, probe_maps
from .frozen import (DTYPE_NAMES, PRECISION_CHOICES, PRECISION_DTYPES, compute_dtype, frozen_copies,
                     peak_memory_bytes, reset_peak_memory, safe_inplace_residuals, temporary_forwards,
                     training_context, unet_compute_dtype, widened_linears)
from .sefi_step import SefiStep, adm_input, fit_image, fit_mask
from .text_encoder import PromptTokens, TextEncoder, TriggerWord, align_columns, reference_slots
from .unet_step import UnetStep, check_compile_available, compile_mode, select_sites

__all__ = [
    "DTYPE_NAMES", "PRECISION_CHOICES", "PRECISION_DTYPES", "PromptTokens", "SefiStep", "TextEncoder", "TriggerWord",
    "attention_picture", "probe_maps",
    "UnetStep", "adm_input", "align_columns", "check_compile_available", "compile_mode", "compute_dtype", "fit_image",
    "fit_mask", "frozen_copies", "peak_memory_bytes", "reference_slots", "reset_peak_memory", "safe_inplace_residuals",
    "select_sites", "temporary_forwards", "training_context", "unet_compute_dtype", "widened_linears",
]
