"""Which diffusion models the method fits, decided from the MODEL's model_sampling before any work.

SeFi's stages are defined on DDPM's 1000 discrete training timesteps (stage = floor(t·S/1000)), its
diffusion loss on an eps or v target. Both hold only for a discrete DDPM schedule with 1000 steps and eps or
v prediction (SD1.x, SD2.x, SDXL, and those models with zero-terminal-SNR). Anything else would be trained on
the wrong target or collapse every sampling step into one stage without a word — EDM's timestep() is
0.25·ln(sigma), a flow model's is sigma·1000 on another schedule — so it is refused with a message instead.

The host composes model_sampling as a class with a schedule base and a prediction mix-in (both hosts,
and the ModelSampling* nodes do the same); they are read here by class name along the MRO, so no host
module is imported and classes made by other packs' nodes are judged the same way.
"""
from __future__ import annotations

# Prediction mix-ins the host knows; only the first two have the targets SeFi trains on. EDM subclasses
# V_PREDICTION and X0/IMG_TO_IMG subclass EPS, so the *first* known name along the MRO decides.
SUPPORTED_PREDICTIONS = {"EPS": "eps", "V_PREDICTION": "v"}
OTHER_PREDICTIONS = frozenset({"EDM", "X0", "IMG_TO_IMG", "CONST", "LCM", "COSMOS_RFLOW"})
# Schedule bases: only plain DDPM-discrete keeps timestep() on the 0..999 grid the stages are cut from.
SUPPORTED_SCHEDULES = frozenset({"ModelSamplingDiscrete"})
OTHER_SCHEDULES = frozenset({"ModelSamplingDiscreteEDM", "ModelSamplingDiscreteDistilled", "StableCascadeSampling",
                             "ModelSamplingContinuousEDM", "ModelSamplingContinuousV", "ModelSamplingDiscreteFlow",
                             "ModelSamplingFlux", "ModelSamplingCosmosRFlow"})
DDPM_TIMESTEPS = 1000
SUPPORTED_TEXT = ("eps or v-prediction on a 1000-step DDPM-discrete schedule (SD1.x, SD2.x, SDXL, also with "
                  "zero-terminal-SNR)")


class UnsupportedModelError(ValueError):
    """The MODEL's sampling is not one the SeFi method is defined for."""


def _first_known(cls: type, names) -> str | None:
    return next((c.__name__ for c in cls.__mro__ if c.__name__ in names), None)


def describe_sampling(model_sampling) -> tuple[str | None, str | None]:
    """(prediction, schedule) class names of a model_sampling object, None where unrecognised."""
    cls = type(model_sampling)
    prediction = _first_known(cls, set(SUPPORTED_PREDICTIONS) | OTHER_PREDICTIONS)
    schedule = _first_known(cls, SUPPORTED_SCHEDULES | OTHER_SCHEDULES)
    return prediction, schedule


def check_model_sampling(model, node: str) -> str:
    """Return the prediction kind ("eps" or "v") of a MODEL the method fits, else raise UnsupportedModelError
    naming the model type, its sampling and what is supported. `node` is the node asking (for the message)."""
    ms = model.get_model_object("model_sampling")
    prediction, schedule = describe_sampling(ms)
    model_type = type(getattr(model, "model", model)).__name__
    steps = len(getattr(ms, "sigmas", ()))
    problem = None
    if prediction not in SUPPORTED_PREDICTIONS:
        problem = f"{prediction or type(ms).__name__} prediction"
    elif schedule not in SUPPORTED_SCHEDULES:
        problem = f"the {schedule or type(ms).__name__} schedule"
    elif steps != DDPM_TIMESTEPS:
        problem = f"a discrete schedule of {steps} steps"
    if problem is not None:
        raise UnsupportedModelError(
            f"{node}: this model ({model_type}) uses {problem}; SeFi identities are defined for {SUPPORTED_TEXT}, "
            f"where the timestep stages and the training target are exact. Use an SD1.5/SDXL checkpoint, and put "
            f"no ModelSampling node that changes the sampling type (EDM, LCM, x0, SD3/Flux shift, continuous V) "
            f"before {node}.")
    return SUPPORTED_PREDICTIONS[prediction]
