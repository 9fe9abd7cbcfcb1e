"""Identity loader and the conditioning builder (SeFiLoadIdentity, SeFiApplyIdentity)."""
from __future__ import annotations

import os

from . import host
from .edges import checked_inputs
from .identity_patch import IdentityAttn2Patch
from .prompt_encoding import (check_family, check_identity_scale, clip_family, embedding_norms, encode_with_vectors,
                              initializer_conditioning, plan_prompt)
from .sampling_support import check_model_sampling
from ..sefi_core.identity import Identity, load_identity
from ..sefi_core.routing import Binding
from ..sefi_core.stages import stage_combinations

IDENTITY = "SEFI_IDENTITY"
CATEGORY = "SeFi-IDE"
EXTRA_IDENTITY_SLOTS = ("identity_2", "identity_3", "identity_4")


class SeFiLoadIdentity:
    DESCRIPTION = "Load a SeFi identity (.safetensors) from models/sefi_identities or an extra_model_paths folder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"identity_name": (host.filename_list(host.IDENTITY_FOLDER), {
            "tooltip": "An identity file trained by SeFi Train Identity, in models/sefi_identities."})}}

    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The identity: per-stage K/V tokens plus its trigger word.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, identity_name: str):
        identity_name = checked_inputs(SeFiLoadIdentity, "SeFi Load Identity",
                                       {"identity_name": identity_name})["identity_name"]
        return (load_identity(host.full_path(host.IDENTITY_FOLDER, identity_name)),)

    @classmethod
    def IS_CHANGED(cls, identity_name: str):
        try:
            path = host.full_path(host.IDENTITY_FOLDER, identity_name)
        except FileNotFoundError:
            return float("nan")  # always re-run so the user sees the error
        stat = os.stat(path)
        return f"{stat.st_mtime_ns}:{stat.st_size}"


class SeFiApplyIdentity:
    DESCRIPTION = ("Encode a prompt containing identity trigger words. Returns the prompt's CONDITIONING and a "
                   "MODEL that swaps in the identity's per-stage key and value tokens at every cross-attention, "
                   "only for this conditioning. Connect both to your KSampler.")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {slot: (IDENTITY, {"tooltip": "Another identity whose trigger word is in the same prompt."})
                    for slot in EXTRA_IDENTITY_SLOTS}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model; it is cloned, never modified."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint."}),
                "identity": (IDENTITY, {"tooltip": "From SeFi Load Identity or SeFi Train Identity."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "default": "a photo of sks person, smiling, in a park",
                                    "tooltip": "The prompt; write each identity's trigger word where the person "
                                               "goes. Weights like (sks:1.2) work."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "Weight of the identity tokens (the host's token-weight rule); "
                                                  "1 = as trained."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Sampling progress at which the identity starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Sampling progress after which the initializer word is used."}),
            },
            "optional": optional,
        }

    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "conditioning")
    OUTPUT_TOOLTIPS = ("The model with the identity patch (for the KSampler).",
                       "The positive conditioning (for the KSampler, ControlNet apply, area nodes…).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, clip, identity: Identity, text: str, strength: float = 1.0, start_percent: float = 0.0,
              end_percent: float = 1.0, **extra: Identity):
        checked_inputs(SeFiApplyIdentity, "SeFi Apply Identity",
                       dict(model=model, clip=clip, identity=identity, text=text, strength=strength,
                            start_percent=start_percent, end_percent=end_percent, **extra))
        connected = [("identity", identity)] + [(slot, extra[slot]) for slot in EXTRA_IDENTITY_SLOTS
                                                if extra.get(slot) is not None]
        slots, identities = [s for s, _ in connected], [i for _, i in connected]
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        check_model_sampling(model, "SeFi Apply Identity")
        family = clip_family(clip)
        norms = embedding_norms(clip)
        for slot, ident in connected:
            check_family(ident, family, slot)
            check_identity_scale(ident, norms, slot)

        plan = plan_prompt(clip, text, identities, strength, slots)
        base, _ = encode_with_vectors(clip, plan, [{e: i.fallback(e) for e in i.encoders} for i in identities])
        off, pooled = initializer_conditioning(clip, text, identities)
        combos = stage_combinations([i.stages for i in identities])
        block = len(next(iter(plan.tokens.values()))[0])  # the tokenizer's chunk length (77): the concat grid
        bindings = []
        for combo in combos:
            keys, _ = encode_with_vectors(clip, plan, [{e: i.stage_tokens(e, s)[0] for e in i.encoders}
                                                       for i, s in zip(identities, combo)])
            values, _ = encode_with_vectors(clip, plan, [{e: i.stage_tokens(e, s)[1] for e in i.encoders}
                                                         for i, s in zip(identities, combo)])
            bindings.append(Binding(base, keys, values, block))

        sampling = model.get_model_object("model_sampling")
        patch = IdentityAttn2Patch(sampling, [i.stages for i in identities], combos, bindings,
                                   Binding(base, off, off, block), sampling.percent_to_sigma(start_percent),
                                   sampling.percent_to_sigma(end_percent))
        patched = model.clone()
        patched.set_model_attn2_patch(patch)
        return patched, [[base, {"pooled_output": pooled}]]


NODE_CLASS_MAPPINGS = {"SeFiLoadIdentity": SeFiLoadIdentity, "SeFiApplyIdentity": SeFiApplyIdentity}
NODE_DISPLAY_NAME_MAPPINGS = {"SeFiLoadIdentity": "SeFi Load Identity",
                              "SeFiApplyIdentity": "SeFi Apply Identity (prompt + model)"}
