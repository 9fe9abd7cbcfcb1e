"""Fewer host syncs per training step on an accelerator: the loss, the logged parts and the gradient norm stay on
the device for a few steps and are read back together, once.

Why: an SD1.5 training step on an H100/H200 is launch-bound (eager PyTorch keeps the GPU busy ~19 ms of a 55 ms
step). Every `float(loss)` makes the CPU wait for the GPU to finish everything queued so far, so it cannot queue
the next step's kernels while the GPU works. Reading `sync_every` steps at once removes all but one of those waits.

What stays exact: a step whose loss or gradient is not finite must not touch the parameters, and the error must
name that step. The loop therefore keeps a sticky on-device flag (`skip`) set by the first non-finite step and
hands it to a *fused* AdamW as its `found_inf`: the fused kernel then leaves parameters, moments and step counts
untouched for that step and every later one until the read-back, which finds the first bad step and raises with the
generator still at the step before it — what the step-by-step path leaves too. fp16 runs keep the step-by-step path
(the dynamic loss scale decides per step whether to skip).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

DEFERRED_SYNC_STEPS = 10
"""Steps read back together on an accelerator: ~0.3-0.5 s of SD1.5 training on a current GPU, so the progress bar
and the log still move smoothly; the Cancel check itself runs every step."""


def fused_adamw_supported(params: list[nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter's device and dtype."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # torch's own rule

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def choose_sync(params: list[nn.Parameter], loss_scaled: bool, fused: bool | None,
                sync_every: int | None) -> tuple[bool, int]:
    """(fused, sync_every) for a run; None picks automatically: on the CPU the step-by-step path with the single-tensor
    AdamW (whose bits are what the resume tests pin down), on an accelerator a fused AdamW and `DEFERRED_SYNC_STEPS`
    (step by step for fp16, see the module doc). Explicit values are checked, so tests can force the accelerator
    path on the CPU."""
    on_cpu = all(p.device.type == "cpu" for p in params)
    if fused is None:
        fused = not on_cpu and fused_adamw_supported(params)
    if fused and not fused_adamw_supported(params):
        devices = sorted({p.device.type for p in params})
        raise ValueError(f"fused AdamW is not available for parameters on {devices}; leave it automatic")
    if sync_every is None:
        sync_every = DEFERRED_SYNC_STEPS if (fused and not on_cpu and not loss_scaled) else 1
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    if sync_every > 1 and not fused:
        raise ValueError("sync_every > 1 needs the fused AdamW (it skips non-finite steps on the device)")
    if sync_every > 1 and loss_scaled:
        raise ValueError("fp16 training reads every step's gradient for its loss scale: use sync_every=1")
    return bool(fused), sync_every


@dataclass
class SettledStep:
    """One step as read back: 1-based `step`, its loss, parts (floats) and gradient norm."""

    step: int
    loss: float
    parts: dict[str, float]
    grad_norm: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


class PendingSteps:
    """Completed steps whose numbers are still on the device, and the sticky skip flag for the fused AdamW."""

    def __init__(self, device: torch.device):
        self.skip = torch.zeros((), dtype=torch.float32, device=device)
        self._entries: list[tuple[int, Tensor, dict[str, Any], Tensor]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, step: int, loss: Tensor, parts: Mapping[str, Any], grad_norm: Tensor) -> None:
        """Record step `step` (1-based) BEFORE its optimiser step: a non-finite loss or gradient norm sets `skip`,
        which stays set, so this update and all later ones are left out on the device."""
        loss, grad_norm = loss.detach().reshape(()), grad_norm.detach().reshape(())
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        torch.maximum(self.skip, bad.to(self.skip.dtype), out=self.skip)  # in place: the optimiser holds it
        self._entries.append((step, loss, dict(parts), grad_norm))

    def read(self) -> list[SettledStep]:
        """All pending steps as plain numbers, in order, with one device-to-host transfer; empties the queue."""
        entries, self._entries = self._entries, []
        if not entries:
            return []
        values: list[Tensor] = []
        for _, loss, parts, grad_norm in entries:
            values += [loss, grad_norm] + [v for v in parts.values() if isinstance(v, Tensor)]
        flat = iter(torch.stack([v.detach().float().reshape(()).to(self.skip.device) for v in values]).tolist())
        settled = []
        for step, _, parts, _ in entries:
            loss, grad_norm = next(flat), next(flat)
            plain = {str(k): next(flat) if isinstance(v, Tensor) else float(v) for k, v in parts.items()}
            settled.append(SettledStep(step, loss, plain, grad_norm))
        return settled
