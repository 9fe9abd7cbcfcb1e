"""The attn2 patch that feeds each UNet cross-attention the current stage's K and V prompt encodings.

It sits in the stackable `attn2_patch` list (never the single-slot attn2 replace that IPAdapter, InstantID and
PuLID share), so replace-based packs attend over our context and add their own term. Only batch chunks that
carry the conditioning our node returned are touched (sefi_core.routing matches them by content), so the
negative prompt, other positive prompts and area/masked conds pass through unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..sefi_core.routing import Binding, ContextRouter
from ..sefi_core.stages import stage_of_timestep

log = logging.getLogger("sefi")


class IdentityAttn2Patch:
    """Callable `(n, context, value, extra_options) -> (n, context, value)` for ModelPatcher.set_model_attn2_patch.

    `combos[i]` is the tuple of per-identity stages served by `routers[i]`; `off_router` serves sigmas outside
    the node's start/end window. The host's model_sampling converts sigma to the DDPM timestep.
    """

    def __init__(self, model_sampling, stage_counts: Sequence[int], combos: Sequence[tuple[int, ...]],
                 bindings: Sequence[Binding], off_binding: Binding, sigma_start: float, sigma_end: float):
        self.model_sampling = model_sampling
        self.stage_counts = tuple(stage_counts)
        self.routers = {combo: ContextRouter([b], on_unspliced=self._warn_unspliced)
                        for combo, b in zip(combos, bindings)}
        self.off_router = ContextRouter([off_binding], on_unspliced=self._warn_unspliced)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self._last_sigmas: torch.Tensor | None = None
        self._last_sigma: float | None = None
        self._last_router: ContextRouter | None = None
        self._warned = False

    def _warn_unspliced(self) -> None:
        if not self._warned:  # once per sampling run (reset when the sigmas rise again: a new run starts)
            self._warned = True
            log.warning("[SeFi] SeFi Apply Identity: its conditioning reaches the sampler glued to other tokens "
                        "(ConditioningConcat) and its per-stage key/value prompt is longer than the conditioning, "
                        "so it cannot take its place there; this part of the prompt uses the identity's "
                        "single-vector fallback. Concatenate before encoding (one prompt), or shorten the prompt.")

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the patch is immutable apart from its caches, and
        # copying would duplicate every encoding per clone.
        return self

    def router_for(self, sigmas: torch.Tensor) -> ContextRouter:
        """The router for the current step; cached on the sigmas tensor, which the host reuses for all sites."""
        if sigmas is self._last_sigmas and self._last_router is not None:
            return self._last_router
        sigma = sigmas.reshape(-1)[:1]
        value = float(sigma)
        if self._last_sigma is not None and value > self._last_sigma:
            self._warned = False
        self._last_sigma = value
        if not (self.sigma_end <= value <= self.sigma_start):
            router = self.off_router
        else:
            t = float(self.model_sampling.timestep(sigma))
            combo = tuple(stage_of_timestep(t, s) for s in self.stage_counts)
            router = self.routers[combo]
        self._last_sigmas, self._last_router = sigmas, router
        return router

    def __call__(self, n, context, value, extra_options):
        sigmas = extra_options.get("sigmas")
        codes = extra_options.get("cond_or_uncond")
        if sigmas is None or not codes:
            return n, context, value
        context, value = self.router_for(sigmas)(context, value, codes)
        return n, context, value
