"""The SeFi-IDE training loop, independent of the host.

The loop owns what is the same for every host: the optimiser (AdamW on the token
generator's parameters only — CLIP and the U-Net are frozen), the per-step randomness,
divergence detection, interruption and checkpoints. Everything model-specific — encoding
the prompts with the tokens spliced in, noising the latent, running the U-Net with K from
the K tokens and V from the V tokens, recording attention and computing the loss — is the
``step_fn`` the ComfyUI glue supplies (see :data:`StepFn`).

Reproducibility: all randomness of step ``i`` is derived from ``(settings.seed, i)``:
``torch.manual_seed`` (dropout in the generator and anything else using the global RNG)
and a fresh CPU ``torch.Generator`` handed to ``step_fn``. Together with the exact Adam
state stored in a checkpoint, stopping at step ``k`` and resuming gives bit-identical
tokens to an uninterrupted run on CPU (GPU kernels may add their own non-determinism).
The caller's global RNG state is restored when the loop returns.

Checkpoints are one ``.safetensors`` file, written atomically (sefi_core/train_state.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor, nn

from .grad_share import backward_with_shares
from .loss_scale import DynamicLossScale
from .losses import ATTENTION_REDUCTIONS
from .step_sync import PendingSteps, choose_sync
from .token_scale import TokenScaleError, token_scale_problem
from .train_state import TrainState

__all__ = [
    "DEFAULT_TEMPLATES",
    "FACE_TEMPLATES",
    "StepFn",
    "TrainSettings",
    "TrainResult",
    "TrainingDivergedError",
    "step_seed",
    "run_training",
]

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of the face of {}",)
"""The paper's training prompt (method.md §2.1, pipeline figure); ``{}`` is the identity token."""

FACE_TEMPLATES: tuple[str, ...] = (
    "a photo of the face of {}",
    "a close-up photo of the face of {}",
    "a cropped photo of the face of {}",
    "a good photo of the face of {}",
    "a bright photo of the face of {}",
)
"""Opt-in variety in textual-inversion style; not from the paper."""

ATTENTION_LOSSES = ("reference", "mask", "off")
MASK_LOSS_MODES = ("balanced_l1", "outside_fraction")
LOSS_SITES = ("quarter", "quarter+half", "all")
ATTENTION_TOKENS = ("words_eos", "identity", "all")
PRECISIONS = ("bf16", "fp16", "fp32")


class StepFn(Protocol):
    """What the glue implements; called once per training step.

    ``tokens``: ``{encoder: Tensor[S, 2, n, C]}`` straight from the generator, with grad
    (``[:, 0]`` K tokens, ``[:, 1]`` V tokens). ``rng``: a CPU generator seeded from
    ``(seed, step)`` — draw **every** random number of the step from it (template choice,
    augmentation, timestep, noise; draw on CPU, then ``.to(device)``). ``step``: 0-based.

    Returns ``(loss, parts)`` or ``(loss, parts, terms)``: ``terms`` maps each weighted loss term
    (summing to ``loss``, e.g. ``{"diffusion": d, "attention": lambda·a}``) to its tensor, so the loop
    can log each term's share of the gradient (:mod:`sefi_core.grad_share`). ``loss`` a 0-dim
    tensor connected to ``tokens`` (the loop calls
    ``backward`` on it), ``parts`` plain floats for logging (e.g. ``{"diffusion": …,
    "attention": …, "t": …}``).
    """

    def __call__(self, tokens: dict[str, Tensor], rng: torch.Generator, step: int) -> tuple[Tensor, dict[str, float]]: ...


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Everything that determines a training run, JSON-serialisable via :meth:`to_dict`.

    The loop reads the optimisation fields; the model fields (``attention_*``, ``loss_sites``,
    ``masked_diffusion``, ``templates``, ``reference_word``, augmentation, ``resolution``,
    ``precision``) are read by the glue's ``step_fn``. Defaults follow method.md §2.3/§2.4
    (ProSpect's step count and learning rate, lambda = 0.003, 16×16-level sites).
    """

    steps: int = 600
    """Optimiser steps (ProSpect: max_steps 600)."""
    lr: float = 1e-4
    """AdamW learning rate (ProSpect base lr). The direct-tokens variant usually wants ~5e-3."""
    batch_size: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    """Save a checkpoint every N steps; 0 = only on interrupt and at the end."""
    weight_decay: float = 0.01
    """torch AdamW's default (ldm's textual-inversion optimiser is ``AdamW(params, lr)``)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip_norm: float = 1.0
    """Clip the generator's gradient norm; 0 = off. Not in the paper; a guard against spikes."""
    attention_loss: str = "reference"
    """"reference": the paper's face-wise loss (maps vs the "person" prompt's); "mask": pull
    the identity token's attention into a face mask (FastComposer style); "off"."""
    attention_weight: float = 0.003
    """lambda (paper: 0.003 is best). Its effect depends on the loss reduction; log both terms."""
    mask_loss_mode: str = "balanced_l1"
    loss_sites: str = "quarter"
    """Cross-attention sites the attention loss reads, by resolution relative to the latent:
    "quarter" = latent/4 (16×16 at SD1.5 512 px: input 7, 8 and output 3, 4, 5), "quarter+half"
    adds latent/2 (32×32), "all" = every cross-attention site."""
    attention_reduction: str = "sum_spatial"
    """How the attention term reduces a site's squared map differences (losses.reference_attention_loss):
    "sum_spatial" (sum over the grid, mean over batch/tokens/sites; docs/method.md) or "mean" (plain MSE)."""
    grad_share_every: int = 25
    """Log each loss term's share of the gradient norm at step 1, every N steps and the last step (one extra
    backward per term on those steps); 0 = never."""
    attention_tokens: str = "words_eos"
    """Token columns compared: "words_eos" = positions 1..first EOS; "identity" = the
    identity slots vs "person" only; "all" = all 77."""
    masked_diffusion: bool = False
    """Restrict the reconstruction loss to the face mask (Break-A-Scene style; not the paper)."""
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    reference_word: str = "person"
    """Fills the template for the reference prompt ("a photo of the face of person")."""
    initializer: str = "person"
    """The word the tokens start from; SDXL's pooled conditioning ``y`` is also built from the prompt with it in
    the trigger's place, so it shapes every step, not only the start."""
    flip: bool = False
    """Horizontal flip augmentation; off by default: a face is not mirror-symmetric (docs/method.md)."""
    scale_augment: bool = False
    scale_range: tuple[float, float] = (0.9, 1.1)
    resolution: int = 512
    precision: str = "bf16"
    """Compute dtype of the frozen models (the generator always trains in fp32)."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        self.scale_range = tuple(float(s) for s in self.scale_range)  # type: ignore[assignment]
        self.templates = [str(t) for t in self.templates]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its allowed range."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid training setting: {msg}")

        need(_is_int(self.steps) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        need(_is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        need(
            _is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
            f"checkpoint_every must be >= 0 (0 = off), got {self.checkpoint_every!r}",
        )
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}",
        )
        need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps!r}")
        need(self.grad_clip_norm >= 0, f"grad_clip_norm must be >= 0 (0 = off), got {self.grad_clip_norm!r}")
        need(self.attention_loss in ATTENTION_LOSSES, f"attention_loss must be one of {ATTENTION_LOSSES}, got {self.attention_loss!r}")
        need(
            math.isfinite(self.attention_weight) and self.attention_weight >= 0,
            f"attention_weight must be >= 0, got {self.attention_weight!r}",
        )
        need(self.mask_loss_mode in MASK_LOSS_MODES, f"mask_loss_mode must be one of {MASK_LOSS_MODES}, got {self.mask_loss_mode!r}")
        need(self.loss_sites in LOSS_SITES, f"loss_sites must be one of {LOSS_SITES}, got {self.loss_sites!r}")
        need(
            self.attention_tokens in ATTENTION_TOKENS,
            f"attention_tokens must be one of {ATTENTION_TOKENS}, got {self.attention_tokens!r}",
        )
        need(len(self.templates) >= 1, "templates must hold at least one prompt template")
        for t in self.templates:
            need(t.count("{}") == 1, f"each template needs exactly one '{{}}' for the identity token, got {t!r}")
        need(
            bool(self.reference_word.strip()) and " " not in self.reference_word.strip(),
            f"reference_word must be a single word such as 'person', got {self.reference_word!r}",
        )
        need(
            bool(self.initializer) and not any(c.isspace() for c in self.initializer),
            f"initializer must be a single word such as 'person', got {self.initializer!r}",
        )
        need(
            len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1],
            f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range!r}",
        )
        need(
            _is_int(self.resolution) and self.resolution >= 64 and self.resolution % 8 == 0,
            f"resolution must be a multiple of 8 and >= 64, got {self.resolution!r}",
        )
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.attention_reduction in ATTENTION_REDUCTIONS,
             f"attention_reduction must be one of {ATTENTION_REDUCTIONS}, got {self.attention_reduction!r}")
        need(_is_int(self.grad_share_every) and self.grad_share_every >= 0,
             f"grad_share_every must be an integer >= 0 (0 = off), got {self.grad_share_every!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["scale_range"] = list(self.scale_range)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainSettings:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


def _share_due(done: int, settings: TrainSettings) -> bool:
    """Whether 1-based step `done` logs gradient shares: the first, every grad_share_every-th and the last."""
    every = settings.grad_share_every
    return bool(every) and (done == 1 or done % every == 0 or done == settings.steps)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------
# Result, errors
# --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """Outcome of :func:`run_training`. ``interrupted``: ``should_stop`` asked to stop early
    (the glue should raise ComfyUI's interrupt after saving what it wants)."""

    state: TrainState
    interrupted: bool

    @property
    def steps_done(self) -> int:
        return self.state.step

    @property
    def loss_history(self) -> list[float]:
        return self.state.loss_history


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/inf. No checkpoint is written for the failing step,
    and the generator keeps its last good parameters."""

    def __init__(self, step: int, total: int, loss: float, parts: Mapping[str, float], what: str,
                 settings: TrainSettings, last_checkpoint_step: int | None):
        self.step = step
        self.loss = loss
        self.parts = dict(parts)
        self.last_checkpoint_step = last_checkpoint_step
        parts_txt = ", ".join(f"{k}={v:.4g}" for k, v in self.parts.items()) or "none reported"
        kept = (
            f"the last checkpoint (step {last_checkpoint_step}) was left untouched"
            if last_checkpoint_step is not None
            else "no checkpoint had been written yet"
        )
        tries = [f"a lower learning_rate (now {settings.lr:g})"]
        if settings.precision != "fp32":
            tries.append(f"precision fp32 (now {settings.precision})")
        if settings.attention_loss != "off" and settings.attention_weight > 0:
            tries.append(f"a lower attention_weight (now {settings.attention_weight:g})")
        super().__init__(
            f"training diverged at step {step}/{total}: {what} (loss={loss}; parts: {parts_txt}); {kept}. "
            f"Try {', or '.join(tries)}."
        )


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` at ``step``, stable across platforms and Python runs.

    Streams are independent: ``"global"`` seeds torch's global RNG (dropout), ``"data"`` the
    generator handed to ``step_fn``.
    """
    digest = hashlib.blake2b(f"sefi-train:{int(seed)}:{int(step)}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _trainable(generator: nn.Module) -> list[nn.Parameter]:
    params = [p for p in generator.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the generator has no trainable parameters")
    return params


def _use_foreach(params: list[nn.Parameter]) -> bool:
    """CPU: the single-tensor path, whose bits do not depend on how parameters are grouped (exact resume is
    tested there). Accelerators: the multi-tensor path — a step there is launch-bound, and a per-tensor loop
    over the generator's parameters costs ~10 kernel launches each."""
    return not all(p.device.type == "cpu" for p in params)


def _make_optimizer(params: list[nn.Parameter], settings: TrainSettings, fused: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params,
        lr=settings.lr,
        betas=settings.adam_betas,
        eps=settings.adam_eps,
        weight_decay=settings.weight_decay,
        foreach=None if fused else _use_foreach(params),
        fused=True if fused else None,
    )


def _in_this_runs_mode(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimiser state whose param groups take every option from this run's optimiser: its hyper-parameters
    and its implementation (fused / foreach / capturable), which load_state_dict would otherwise restore from the
    checkpoint. A checkpoint written on the CPU (single-tensor) and resumed where the fused AdamW reads its skip flag
    from the device would then run the wrong kernel (an AssertionError at the first step), and the reverse would
    keep the fused path the CPU's exact resume does not cover. Loading with this run's flags also puts each Adam
    step count where this run's kernel wants it. Older checkpoints may lack some of these keys."""
    groups = saved.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimiser has {len(groups)} parameter group(s), this run's has "
                         f"{len(optimizer.param_groups)}")
    ours = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {**saved, "param_groups": [{**theirs, **mine} for theirs, mine in zip(groups, ours)]}


def _blown_up(generator: nn.Module, token_norms: Mapping[str, float] | None) -> str | None:
    """What is wrong with the generator's tokens against token_norms (sefi_core.token_scale), or None."""
    if not token_norms:
        return None
    was_training = generator.training
    generator.eval()  # the tokens the identity would get (no dropout): no draw from any RNG either
    try:
        with torch.no_grad():
            return token_scale_problem(generator(), token_norms)
    finally:
        generator.train(was_training)


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu_copy(v) for v in obj)
    return obj


def _generator_config(generator: nn.Module) -> dict[str, Any] | None:
    config = getattr(generator, "config", None)
    return dict(config()) if callable(config) else None


def _settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    ignore = {"steps", "checkpoint_every"}
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def run_training(
    generator: nn.Module,
    step_fn: StepFn,
    settings: TrainSettings,
    *,
    start_state: TrainState | None = None,
    on_progress: Callable[[int, int, float, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    save_checkpoint: Callable[[TrainState], None] | None = None,
    interrupts: tuple[type[BaseException], ...] = (),
    fused: bool | None = None,
    sync_every: int | None = None,
    token_norms: Mapping[str, float] | None = None,
    settle_at: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Train ``generator`` for ``settings.steps`` steps (continuing from ``start_state``).

    Per step ``i`` (0-based, from ``start_state.step`` or 0):

    1. ``should_stop()`` -> if true: checkpoint (unless just saved) and return
       ``TrainResult(interrupted=True)``;
    2. ``torch.manual_seed(step_seed(seed, i, "global"))``; ``rng`` seeded with
       ``step_seed(seed, i, "data")``;
    3. ``tokens = generator()`` (train mode, dropout on); ``loss, parts = step_fn(tokens, rng, i)``;
    4. NaN/inf loss -> :class:`TrainingDivergedError` (nothing saved, parameters untouched);
    5. backward, gradient-norm check (NaN/inf -> same error) and clipping, AdamW step; with
       ``precision="fp16"`` the loss is scaled before backward (:mod:`sefi_core.loss_scale`) and
       a step whose scaled gradient overflowed is skipped with the scale halved (an error only
       once the scale falls below 1);
    6. history, the checkpoint (every ``checkpoint_every`` steps and at the last step), then
       ``on_progress(i + 1, steps, loss, parts)``: whatever ``on_progress`` does (sample renders, snapshots) comes
       after the step is safe on disk, so its failure or a Cancel inside it never loses a trained step.

    A final checkpoint is saved at the end (written before the last step's ``on_progress``). ``save_checkpoint`` receives a
    :class:`TrainState` of CPU copies; typically ``lambda s: save_train_state(s, path)``.

    ``interrupts``: exception types that mean "the user cancelled" (the host's interrupt). Hosts
    raise them from wherever they check — ``should_stop``, a progress-bar update inside
    ``on_progress``, a callback inside ``step_fn`` — so whichever of these raises one, the loop
    first checkpoints the last *completed* step (a step cut short has not touched the parameters
    or the Adam state yet) and then re-raises it unchanged.

    ``fused`` / ``sync_every`` (None = automatic, :func:`sefi_core.step_sync.choose_sync`): on an accelerator a
    fused AdamW and the loss, parts and gradient norm of ``sync_every`` steps read back at once (one host sync
    instead of several per step); ``on_progress`` then runs for those steps together, a non-finite step still
    raises :class:`TrainingDivergedError` naming it with the parameters of the step before. On the CPU: step by
    step, single-tensor AdamW.

    Resuming: ``start_state`` restores the generator and the Adam moments exactly. Settings
    that change the trajectory (anything except ``steps`` and ``checkpoint_every``) should
    match the run that wrote it; a mismatch only warns, and the optimiser hyper-parameters
    of ``settings`` win, as does this run's optimiser mode (``fused`` / foreach, whichever wrote the checkpoint).

    ``settle_at(step)`` (1-based): steps whose ``on_progress`` reads the generator (a sample render, a snapshot);
    the loop reads back its pending steps after them, so ``on_progress`` of such a step sees the generator as that
    step left it (steps read back together otherwise reach ``on_progress`` after later updates).

    ``token_norms`` (``{encoder: mean word-embedding length}`` of the text encoders, :mod:`sefi_core.token_scale`):
    a run can blow its tokens up to finite but enormous values (~1e30) that no NaN check sees and that sample
    black pictures. Every checkpoint (and the final state) is measured against it first: tokens far beyond it stop
    the run with :class:`TrainingDivergedError` and nothing is written; a ``start_state`` holding such tokens is
    refused with a :class:`sefi_core.token_scale.TokenScaleError` (a ``ValueError``).
    """
    settings.validate()
    params = _trainable(generator)
    scaler = DynamicLossScale.for_precision(settings.precision)
    fused, sync_every = choose_sync(params, scaler is not None, fused, sync_every)
    optimizer = _make_optimizer(params, settings, fused)
    step0 = 0
    history: list[float] = []
    parts_history: list[dict[str, float]] = []
    if start_state is not None:
        generator.load_state_dict(start_state.generator)
        blown_up = _blown_up(generator, token_norms)
        if blown_up:
            raise TokenScaleError(f"the checkpoint (step {start_state.step}) holds tokens that have blown up: "
                                  f"{blown_up}. It was written by a diverged run: resume from a checkpoint written "
                                  "before it diverged, or start a new run with a lower learning_rate")
        optimizer.load_state_dict(_in_this_runs_mode(start_state.optimizer, optimizer))
        step0 = int(start_state.step)
        history = [float(x) for x in start_state.loss_history]
        parts_history = [dict(p) for p in start_state.parts_history]
        diff = _settings_differences(start_state.settings, settings.to_dict())
        if diff:
            warnings.warn(
                f"resuming with different settings {diff}; the run will not match an uninterrupted one",
                stacklevel=2,
            )
    if step0 > settings.steps:
        raise ValueError(f"the checkpoint is at step {step0}, beyond steps={settings.steps}; raise steps to continue")

    foreach = _use_foreach(params)
    if scaler is not None and start_state is not None and start_state.loss_scale:
        scaler = DynamicLossScale.from_state_dict(start_state.loss_scale)

    config = _generator_config(generator)
    last_saved: int | None = step0 if start_state is not None else None
    step = step0

    def snapshot() -> TrainState:
        return TrainState(
            generator=_cpu_copy(generator.state_dict()),
            optimizer=_cpu_copy(optimizer.state_dict()),
            step=step,
            loss_history=list(history),
            settings=settings.to_dict(),
            generator_config=config,
            parts_history=[dict(p) for p in parts_history],
            loss_scale=None if scaler is None else scaler.state_dict(),
        )

    pending = PendingSteps(params[0].device) if sync_every > 1 else None
    if pending is not None:
        optimizer.found_inf = pending.skip  # read by the fused AdamW: a set flag leaves the update out on the device

    def notify(done: list) -> None:
        if on_progress is not None:
            for s in done:
                on_progress(s.step, settings.steps, s.loss, dict(s.parts))

    def settle(quiet: bool = False) -> list:
        """Read back the pending steps into the history and return them; for the first non-finite one, raise (after
        on_progress of the steps before it, unless quiet)."""
        nonlocal step
        if not pending:
            return []
        settled = pending.read()
        bad = next((s for s in settled if not s.finite), None)
        good = settled if bad is None else [s for s in settled if s.step < bad.step]
        for s in good:
            s.parts["grad_norm"] = s.grad_norm
            history.append(s.loss)
            parts_history.append(s.parts)
        if bad is None:
            return good
        step = bad.step - 1  # the flag kept this and every later update off the parameters
        optimizer.zero_grad(set_to_none=True)
        if not quiet:
            notify(good)
        what = ("the loss is not finite" if not math.isfinite(bad.loss)
                else f"the gradient norm is {bad.grad_norm}")
        raise TrainingDivergedError(bad.step, settings.steps, bad.loss, bad.parts, what, settings, last_saved)

    def checkpoint() -> TrainState:
        nonlocal last_saved
        if last_saved != step:
            blown_up = _blown_up(generator, token_norms)
            if blown_up:
                loss = history[-1] if history else math.nan
                raise TrainingDivergedError(step, settings.steps, loss, parts_history[-1] if parts_history else {},
                                            f"the tokens have blown up: {blown_up}", settings, last_saved)
        state = snapshot()
        if save_checkpoint is not None and last_saved != step:
            save_checkpoint(state)
            last_saved = step
        return state

    max_norm = settings.grad_clip_norm if settings.grad_clip_norm > 0 else math.inf
    cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    was_training = generator.training
    generator.train()
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            while step < settings.steps:
                if should_stop is not None and should_stop():
                    done = settle()
                    state = checkpoint()
                    notify(done)
                    return TrainResult(state, interrupted=True)
                torch.manual_seed(step_seed(settings.seed, step, "global"))
                rng = torch.Generator(device="cpu")
                rng.manual_seed(step_seed(settings.seed, step, "data"))

                optimizer.zero_grad(set_to_none=True)
                loss, parts, *terms = step_fn(generator(), rng, step)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError(f"step_fn must return a scalar loss tensor, got {type(loss).__name__}")
                if not loss.requires_grad:
                    raise ValueError("step_fn's loss does not depend on the tokens (no gradient); check the splicing")
                if pending is not None:  # no host sync until settle() (sefi_core.step_sync)
                    if terms and _share_due(step + 1, settings):
                        parts = {**parts, **backward_with_shares(terms[0], params)}
                    else:
                        loss.reshape(()).backward()
                    grad_norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
                    pending.add(step + 1, loss, parts, grad_norm_t)
                    optimizer.step()  # left out on the device once pending.skip is set
                else:
                    parts = {str(k): float(v.detach()) if isinstance(v, Tensor) else float(v)
                             for k, v in parts.items()}
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise TrainingDivergedError(step + 1, settings.steps, loss_value, parts,
                                                    "the loss is not finite", settings, last_saved)
                    if terms and _share_due(step + 1, settings):
                        scaled = {k: t if scaler is None else scaler.scaled(t) for k, t in terms[0].items()}
                        parts.update(backward_with_shares(scaled, params))  # ratios: the loss scale cancels
                    else:
                        (loss if scaler is None else scaler.scaled(loss)).reshape(()).backward()
                    overflow = scaler is not None and not scaler.unscale_(params)
                    grad_norm = math.inf if overflow else float(
                        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach))
                    if scaler is not None:
                        parts["loss_scale"] = scaler.scale
                        scaler.update(not overflow)
                    if overflow and not scaler.exhausted:
                        optimizer.zero_grad(set_to_none=True)  # skip this update; the next step uses half the scale
                        parts["skipped"] = 1.0
                    elif not math.isfinite(grad_norm):
                        optimizer.zero_grad(set_to_none=True)
                        what = (f"the gradient is not finite even at loss scale {parts['loss_scale']:g}" if overflow
                                else f"the gradient norm is {grad_norm}")
                        raise TrainingDivergedError(step + 1, settings.steps, loss_value, parts, what, settings,
                                                    last_saved)
                    else:
                        optimizer.step()

                step += 1
                # the last step's checkpoint too is written before on_progress: what on_progress does (sample
                # renders, snapshots, a preview) may fail or be cancelled, and must never cost a trained step
                due = bool(save_checkpoint is not None and (step == settings.steps or (
                    settings.checkpoint_every and step % settings.checkpoint_every == 0)))
                done: list = []
                if pending is None:
                    parts["grad_norm"] = grad_norm
                    history.append(loss_value)
                    parts_history.append(parts)
                elif (len(pending) >= sync_every or due or step == settings.steps
                      or (settle_at is not None and settle_at(step))):
                    done = settle()
                if due:
                    checkpoint()
                if pending is None:
                    if on_progress is not None:
                        on_progress(step, settings.steps, loss_value, dict(parts))
                else:
                    notify(done)
            done = settle()
            state = checkpoint()
            notify(done)
            return TrainResult(state, interrupted=False)
    except interrupts:
        try:
            settle(quiet=True)  # the steps already done belong in the checkpoint
        except TrainingDivergedError:
            pass  # settle() rewound to the last good step; the resumed run meets the error itself
        checkpoint()
        raise
    finally:
        generator.train(was_training)
