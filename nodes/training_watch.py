"""What SeFi Train Identity shows and keeps while it runs: the live preview on the node (through the host's
progress bar, the channel samplers use for latent previews), sample renders every `sample_every` steps and of the
final tokens, and step snapshots every `save_every` steps. The trainer calls `TrainingWatch.on_step` after every
step (after that step's checkpoint, when one is due); the loop settles its pending steps where
`needs_parameters_at` says so, so a sample or snapshot of step s shows the tokens of step s.

All of it is optional work: a sample render, snapshot or preview that fails (an out-of-memory in a sample render
is the usual one) is logged, shown on the node's preview and recorded in the identity, and training goes on — or,
with `stop_on_watch_failure`, stops with the step's checkpoint written (WatchFailedError). Cancel is never taken
for a failure.

Memory stays bounded: every sampling point's row is written to disk as a PNG (`sample_folder`), and only the
latest rows that fit in SAMPLE_ROWS_BYTES stay in memory for the node's `samples` output. A resumed run reads its
earlier rows back from there."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import host
from .sample_renders import sample_grid
from .snapshots import SEPARATOR, RunSnapshots
from ..sefi_core.atomic import atomic_write
from ..sefi_core.identity import Identity
from ..sefi_core.plot import term_shares
from ..sefi_core.watch_picture import preview_due, render_watch_picture, to_uint8

log = logging.getLogger("sefi")

PREVIEW_EVERY = 25
"""Default refresh of the live preview (the log's rhythm too): about every second on a GPU (SD1.5, 512 px, ~45 ms a
step), where drawing one preview (~20 ms on a CPU core) then costs under 2 % of the training time
(bench/watch_cost.py)."""
SAMPLE_ROWS_BYTES = 256 * 2**20
"""The sample rows kept in memory for the node's output (float32; at least the latest row): ~40 rows of two
512 px prompts, 5 rows of four 1024 px SDXL prompts. The others are on disk only."""
SAMPLES_FOLDER = "sefi_samples"
"""Under the host's output folder: `sefi_samples/<name>/<run id>/<name>@<step>.png`, one row per sampling point."""
WATCH_INPUTS = ("preview_every", "sample_every", "save_every")


def due_every(step: int, every: int) -> bool:
    """Whether 1-based `step` is one of every `every`-th steps (0 = none)."""
    return every > 0 and step % every == 0


class WatchFailedError(RuntimeError):
    """A watch feature failed and the user chose to stop the run there (stop_on_watch_failure); the loop writes the
    step's checkpoint before this reaches the node."""


@dataclass(frozen=True)
class WatchSettings:
    preview_every: int = PREVIEW_EVERY
    sample_prompts: tuple[str, ...] = ()
    sample_every: int = 0
    save_every: int = 0
    stop_on_failure: bool = False

    def __post_init__(self) -> None:
        for name in WATCH_INPUTS:  # the host's own range check is not on every path (API graphs, Python callers)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0 (0 = off), got {value!r}")

    @property
    def samples_on(self) -> bool:
        return bool(self.sample_prompts)

    def sampling_due(self, step: int, total: int) -> bool:
        """Sample prompts are rendered every `sample_every` steps and always of the final tokens (also when
        sample_every does not divide the steps, or is 0: then only at the end)."""
        return self.samples_on and (step == total or due_every(step, self.sample_every))


class TrainingWatch:
    """`current_identity(step)` gives the identity of the generator as it is now (after `step`); `render(identity)`
    the sample renders of one sampling point (IMAGE [prompts, H, W, 3]). `snapshots` writes the run's step snapshots
    (None: save_every is 0); `sample_folder` is where every sample row goes (None: kept in memory only, within the
    bound)."""

    def __init__(self, settings: WatchSettings, bar, name: str, snapshots: RunSnapshots | None,
                 current_identity: Callable[[int], Identity], render: Callable[[Identity], Tensor] | None,
                 history: Sequence[float] = (), parts_history: Sequence[dict] = (),
                 sample_folder: Path | None = None, resumed_at: int | None = None):
        self.settings, self.bar, self.name, self.snapshots = settings, bar, name, snapshots
        self.current_identity = current_identity
        self.render = render if settings.samples_on else None
        self.history = [float(x) for x in history]
        self.parts_history = [dict(p) for p in parts_history]
        self.sample_folder = sample_folder
        self.rows: list[tuple[int, Tensor]] = []
        self.failures: list[str] = []
        self.note: str | None = None
        self.previews = 0
        self.preview_seconds = 0.0
        self.sample_seconds = 0.0
        self.sampled = 0
        self.attempted: set[int] = set()
        if self.render is not None and sample_folder is not None:
            self._restore_rows(0 if resumed_at is None else int(resumed_at))

    # ------------------------------------------------------------------ schedule

    def needs_parameters_at(self, step: int) -> bool:
        """Steps whose on_step reads the generator (a snapshot or a sample): the loop must have settled them.
        The final step is always settled by the loop (its checkpoint)."""
        s = self.settings
        return due_every(step, s.save_every) or (self.render is not None and due_every(step, s.sample_every))

    def on_step(self, step: int, total: int, loss: float, parts: dict) -> None:
        """The snapshot first (quick, and a Cancel the progress bar raises must not cost it), then the progress bar
        (with the preview when due), so the bar shows the step while its samples render; then the samples and a
        preview showing them."""
        s = self.settings
        self.history.append(float(loss))
        self.parts_history.append(dict(parts))
        sampling = self.render is not None and s.sampling_due(step, total)
        identity = None
        if self.snapshots is not None and due_every(step, s.save_every):
            identity = self._optional("snapshot", step, total, lambda: self._snapshot(step))
        self._show(step, total, preview_due(step, total, s.preview_every) and not sampling)
        if sampling:
            self._sample(step, total, identity)

    def finish(self, step: int, total: int) -> None:
        """After the loop: the final tokens' samples when the loop did not render them (a run resumed at its last
        step, e.g. after a Cancel in its last sampling)."""
        if self.render is not None and step == total and step not in self.attempted:
            self._sample(step, total, None)

    # ------------------------------------------------------------------ the optional work

    def _snapshot(self, step: int) -> Identity:
        identity = self.current_identity(step)
        self.snapshots.save(identity, step)
        return identity

    def _sample(self, step: int, total: int, identity: Identity | None) -> None:
        self.attempted.add(step)
        def render():
            started = time.perf_counter()
            row = self.render(identity or self.current_identity(step))
            spent = time.perf_counter() - started
            self.sample_seconds += spent
            self.sampled += 1
            log.info("[SeFi] %s: samples of step %d rendered in %.2f s", self.name, step, spent)
            self._keep_row(step, row)
            return row
        if self._optional("sample render", step, total, render) is not None:
            self._show(step, total, True)

    def _optional(self, what: str, step: int, total: int, work: Callable):
        """Run one watch feature; a failure (anything but Cancel) is logged, shown on the node and recorded, then
        either training goes on (None returned) or, with stop_on_failure, WatchFailedError stops the run."""
        try:
            return work()
        except host.InterruptProcessingException:
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self.failures.append(f"step {step}: {what}: {reason}")
            _free_memory()
            if self.settings.stop_on_failure:
                log.error("[SeFi] %s: the %s of step %d failed (%s); stopping the run as stop_on_watch_failure "
                          "asks", self.name, what, step, reason)
                raise WatchFailedError(f"the {what} of step {step} failed ({reason}); the run stopped there as "
                                       f"stop_on_watch_failure asks") from e
            log.warning("[SeFi] %s: the %s of step %d failed (%s); training goes on without it "
                        "(stop_on_watch_failure stops the run instead)", self.name, what, step, reason)
            self.note = f"{what} of step {step} failed: see the log"
            self._show(step, total, True)
            return None

    # ------------------------------------------------------------------ sample rows: memory and disk

    def _row_path(self, step: int) -> Path:
        return self.sample_folder / f"{self.name}{SEPARATOR}{int(step)}.png"

    def _keep_row(self, step: int, row: Tensor) -> None:
        if self.sample_folder is not None:
            picture = to_uint8(torch.cat(list(row), dim=1).numpy())
            self.sample_folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self._row_path(step), lambda f: Image.fromarray(picture).save(f, format="PNG"))
        self.rows = [r for r in self.rows if r[0] != step] + [(step, row)]
        while len(self.rows) > 1 and sum(r.numel() * r.element_size() for _, r in self.rows) > SAMPLE_ROWS_BYTES:
            self.rows.pop(0)  # still on disk

    def _restore_rows(self, resumed_at: int) -> None:
        """A resumed run's earlier rows (steps up to its checkpoint) back from disk, latest first within the
        bound; rows of later steps are of a part that was killed before its checkpoint: removed."""
        if not self.sample_folder.is_dir():
            return
        pattern = re.compile(rf"{re.escape(self.name)}{SEPARATOR}(\d+)\.png")
        found = {}
        for path in self.sample_folder.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found[int(match.group(1))] = path
        for step in [s for s in found if s > resumed_at]:
            found.pop(step).unlink(missing_ok=True)
        prompts = len(self.settings.sample_prompts)
        used = 0
        for step in sorted(found, reverse=True):
            try:
                with Image.open(found[step]) as im:
                    pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            except OSError as e:
                log.warning("[SeFi] %s: sample row %s could not be read back (%s); left out", self.name,
                            found[step], e)
                continue
            if pixels.shape[1] % prompts:
                continue  # rendered with another number of prompts: not a row of this grid
            row = torch.from_numpy(np.stack(np.split(pixels, prompts, axis=1)))
            used += row.numel() * row.element_size()
            if self.rows and used > SAMPLE_ROWS_BYTES:
                break
            self.rows.insert(0, (step, row))

    # ------------------------------------------------------------------ the node's preview and outputs

    def _show(self, step: int, total: int, with_picture: bool) -> None:
        if with_picture:
            started = time.perf_counter()
            try:
                preview = host.preview_image(Image.fromarray(self.picture(step, total)))
                self.bar.update_absolute(step, total, preview)
                self.previews += 1
                return
            except host.InterruptProcessingException:
                raise
            except Exception as e:  # the preview is optional too: the bar still moves
                self.failures.append(f"step {step}: preview: {type(e).__name__}: {e}"[:300])
                log.warning("[SeFi] %s: the preview of step %d failed (%s: %s)", self.name, step, type(e).__name__, e)
            finally:
                self.preview_seconds += time.perf_counter() - started
        self.bar.update_absolute(step, total)

    def picture(self, step: int, total: int):
        """The preview: the loss curve so far beside the latest sample row (uint8 [H, W, 3]), with the latest watch
        failure in its title."""
        sample, sample_step = None, None
        if self.rows:
            sample_step, row = self.rows[-1]
            sample = torch.cat(list(row), dim=1).numpy()
        return render_watch_picture(self.history, term_shares(self.parts_history), step, total, sample,
                                    sample_step, note=self.note)

    def samples(self, resolution: int) -> Tensor:
        """The sample grid of the rows kept (rows = sampling points, the latest within SAMPLE_ROWS_BYTES; columns =
        prompts); one black frame when none were rendered."""
        if not self.rows:
            return torch.zeros(1, resolution, resolution, 3)
        return sample_grid([row for _, row in self.rows])

    def report(self, training_seconds: float) -> None:
        """Log what watching cost, as a share of the whole training time, and what failed."""
        total = max(training_seconds, 1e-9)
        log.info("[SeFi] %s: live preview %d× in %.2f s (%.1f %% of %.1f s training)", self.name, self.previews,
                 self.preview_seconds, 100 * self.preview_seconds / total, training_seconds)
        if self.sampled:
            log.info("[SeFi] %s: sample renders at %d step(s) in %.1f s (%.1f %% of the training time)%s", self.name,
                     self.sampled, self.sample_seconds, 100 * self.sample_seconds / total,
                     f"; every row in {self.sample_folder}" if self.sample_folder is not None else "")
        if self.failures:
            log.warning("[SeFi] %s: %d watch feature(s) failed during the run: %s", self.name, len(self.failures),
                        "; ".join(self.failures[:5]))


def _free_memory() -> None:
    """After a failed render (usually out of memory): give the host's allocator back what the render held."""
    try:
        host.model_management.soft_empty_cache()
    except Exception:  # freeing is a courtesy; the failure is already recorded
        pass
