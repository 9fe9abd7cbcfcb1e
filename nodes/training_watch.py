"""What SeFi Train Identity shows and keeps while it runs: the live preview on the node (through the host's
progress bar, the channel samplers use for latent previews), sample renders every `sample_every` steps, and step
snapshots every `save_every` steps. The trainer calls `TrainingWatch.on_step` after every step; the loop settles its
pending steps where `needs_parameters_at` says so, so a sample or snapshot of step s shows the tokens of step s."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from . import host
from .sample_renders import sample_grid
from .snapshots import save_snapshot, snapshot_due
from ..sefi_core.identity import Identity
from ..sefi_core.plot import term_shares
from ..sefi_core.watch_picture import preview_due, render_watch_picture

log = logging.getLogger("sefi")

PREVIEW_EVERY = 25
"""Default refresh of the live preview (the log's rhythm too): about every second on a GPU (SD1.5, 512 px, ~45 ms a
step), where drawing one preview (~20 ms on a CPU core) then costs under 2 % of the training time
(bench/watch_cost.py)."""


@dataclass(frozen=True)
class WatchSettings:
    preview_every: int = PREVIEW_EVERY
    sample_prompts: tuple[str, ...] = ()
    sample_every: int = 0
    save_every: int = 0

    @property
    def samples_on(self) -> bool:
        return bool(self.sample_prompts) and self.sample_every > 0


class TrainingWatch:
    """`current_identity(step)` gives the identity of the generator as it is now (after `step`); `render(identity)`
    the sample renders of one sampling point (IMAGE [prompts, H, W, 3]), None when samples are off."""

    def __init__(self, settings: WatchSettings, bar, name: str, folder: Path,
                 current_identity: Callable[[int], Identity], render: Callable[[Identity], Tensor] | None,
                 history: Sequence[float] = (), parts_history: Sequence[dict] = ()):
        self.settings, self.bar, self.name, self.folder = settings, bar, name, folder
        self.current_identity = current_identity
        self.render = render if settings.samples_on else None
        self.history = [float(x) for x in history]
        self.parts_history = [dict(p) for p in parts_history]
        self.rows: list[tuple[int, Tensor]] = []
        self.previews = 0
        self.preview_seconds = 0.0
        self.sample_seconds = 0.0

    def needs_parameters_at(self, step: int) -> bool:
        """Steps whose on_step reads the generator (a snapshot or a sample): the loop must have settled them."""
        s = self.settings
        return snapshot_due(step, s.save_every) or (self.render is not None and snapshot_due(step, s.sample_every))

    def on_step(self, step: int, total: int, loss: float, parts: dict) -> None:
        """The progress bar (with the preview when due) first, so the bar shows the step while its samples render;
        then the snapshot, then the samples and a preview showing them."""
        s = self.settings
        self.history.append(float(loss))
        self.parts_history.append(dict(parts))
        sampling = self.render is not None and snapshot_due(step, s.sample_every)
        self._show(step, total, preview_due(step, total, s.preview_every) and not sampling)
        identity = None
        if snapshot_due(step, s.save_every):
            identity = self.current_identity(step)
            save_snapshot(identity, self.folder, self.name, step)
        if sampling:
            identity = identity or self.current_identity(step)
            started = time.perf_counter()
            self.rows.append((step, self.render(identity)))
            spent = time.perf_counter() - started
            self.sample_seconds += spent
            log.info("[SeFi] %s: samples of step %d rendered in %.2f s", self.name, step, spent)
            self._show(step, total, True)

    def _show(self, step: int, total: int, with_picture: bool) -> None:
        if not with_picture:
            self.bar.update_absolute(step, total)
            return
        started = time.perf_counter()
        self.bar.update_absolute(step, total, host.preview_image(Image.fromarray(self.picture(step, total))))
        self.preview_seconds += time.perf_counter() - started
        self.previews += 1

    def picture(self, step: int, total: int):
        """The preview: the loss curve so far beside the latest sample row (uint8 [H, W, 3])."""
        sample, sample_step = None, None
        if self.rows:
            sample_step, row = self.rows[-1]
            sample = torch.cat(list(row), dim=1).numpy()
        return render_watch_picture(self.history, term_shares(self.parts_history), step, total, sample,
                                    sample_step)

    def samples(self, resolution: int) -> Tensor:
        """The sample grid (rows = sampling points, columns = prompts); one black frame when none were rendered."""
        if not self.rows:
            return torch.zeros(1, resolution, resolution, 3)
        return sample_grid([row for _, row in self.rows])

    def report(self, training_seconds: float) -> None:
        """Log what watching cost, as a share of the whole training time."""
        total = max(training_seconds, 1e-9)
        log.info("[SeFi] %s: live preview %d× in %.2f s (%.1f %% of %.1f s training)", self.name, self.previews,
                 self.preview_seconds, 100 * self.preview_seconds / total, training_seconds)
        if self.rows:
            log.info("[SeFi] %s: sample renders at %d step(s) in %.1f s (%.1f %% of the training time)", self.name,
                     len(self.rows), self.sample_seconds, 100 * self.sample_seconds / total)
