"""The training checkpoint: :class:`TrainState`, everything needed to continue exactly where training
stopped, and its file format (one ``.safetensors`` file, written atomically). The loop is sefi_core/training.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
from torch import Tensor

from .atomic import atomic_write

__all__ = ["TrainState", "TrainStateFileError", "save_train_state", "load_train_state"]


@dataclass
class TrainState:
    """A resumable snapshot: everything needed to continue exactly where training stopped.

    ``step`` counts completed optimiser steps. ``generator`` / ``optimizer`` are the
    ``state_dict`` s (CPU copies). ``generator_config`` is the generator's ``config()`` so the
    glue can rebuild it (:func:`sefi_core.generator.rebuild_generator`) before loading.
    """

    generator: dict[str, Tensor]
    optimizer: dict[str, Any]
    step: int
    loss_history: list[float]
    settings: dict[str, Any]
    generator_config: dict[str, Any] | None = None
    parts_history: list[dict[str, float]] = field(default_factory=list)
    loss_scale: dict[str, Any] | None = None
    """The fp16 loss scaler's state (:class:`sefi_core.loss_scale.DynamicLossScale`); None for bf16/fp32 runs."""
    photos: list[dict[str, Any]] = field(default_factory=list)
    """What the run has trained on, as the glue records it (JSON values: per photo its sha256 and its face's
    identity descriptor), so that a resumed run can be compared with it. Empty in checkpoints that predate it."""
    run_id: str | None = None
    """Which run this is, as the glue names it: a resumed run keeps it, and the run's other files (step snapshots,
    sample renders, the identity) carry it, so they can be told from another run's of the same name. None in
    checkpoints that predate it."""


class TrainStateFileError(ValueError):
    """A checkpoint file is not a SeFi training state or is damaged."""


# --------------------------------------------------------------------------------------
# Checkpoint file
# --------------------------------------------------------------------------------------

_FORMAT = "sefi-train-state"
_FORMAT_VERSION = "1"
_GEN = "generator/"
_OPT = "optimizer/state/"


def _state_to_file_parts(state: TrainState) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors: dict[str, Tensor] = {}
    for key, value in state.generator.items():
        tensors[_GEN + key] = value.detach().to("cpu").contiguous().clone()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state.optimizer.get("state", {}).items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{_OPT}{int(pid)}/{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(int(pid)), {})[name] = value
    groups = []
    for group in state.optimizer.get("param_groups", []):
        g = {}
        for k, v in group.items():
            if isinstance(v, Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            g[k] = list(v) if isinstance(v, tuple) else v
        groups.append(g)
    metadata = {
        "sefi.format": _FORMAT,
        "sefi.format_version": _FORMAT_VERSION,
        "sefi.step": str(int(state.step)),
        "sefi.loss_history": json.dumps([float(x) for x in state.loss_history]),
        "sefi.parts_history": json.dumps(state.parts_history),
        "sefi.settings": json.dumps(state.settings),
        "sefi.generator_config": json.dumps(state.generator_config),
        "sefi.optimizer.param_groups": json.dumps(groups),
        "sefi.optimizer.scalars": json.dumps(scalars),
        "sefi.loss_scale": json.dumps(state.loss_scale),
        "sefi.photos": json.dumps(state.photos),
    }
    if state.run_id is not None:
        metadata["sefi.run_id"] = str(state.run_id)
    return tensors, metadata


def _write_payload(f: BinaryIO, data: bytes) -> None:
    """Write in chunks (a separate function so tests can simulate a failure mid-write)."""
    view = memoryview(data)
    chunk = 16 * 2**20
    for start in range(0, len(view), chunk):
        f.write(view[start : start + chunk])


def save_train_state(state: TrainState, path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to one ``.safetensors`` file, atomically (old file intact on any failure).

    Layout: tensors ``generator/<state_dict key>`` and ``optimizer/state/<param index>/<name>``
    (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``); everything else (step, histories,
    settings, generator config, param groups, non-tensor optimiser values, photos, run id) as JSON strings in
    the safetensors metadata under ``sefi.*``.
    """
    tensors, metadata = _state_to_file_parts(state)
    data = safetensors.torch.save(tensors, metadata=metadata)
    return atomic_write(path, lambda f: _write_payload(f, data))


def load_train_state(path: str | os.PathLike[str]) -> TrainState:
    """Read a file written by :func:`save_train_state`; raises :class:`TrainStateFileError` if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no training checkpoint at {p}")
    try:
        with safetensors.safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise TrainStateFileError(f"{p.name} is not a readable SeFi training checkpoint ({e})") from e
    if metadata.get("sefi.format") != _FORMAT:
        raise TrainStateFileError(f"{p.name} is not a SeFi training checkpoint (missing sefi.format={_FORMAT!r})")
    if metadata.get("sefi.format_version") != _FORMAT_VERSION:
        raise TrainStateFileError(
            f"{p} has checkpoint format version {metadata.get('sefi.format_version')!r}; "
            f"this version reads {_FORMAT_VERSION!r}"
        )
    try:
        generator = {k[len(_GEN):]: v for k, v in tensors.items() if k.startswith(_GEN)}
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith(_OPT):
                pid, name = key[len(_OPT):].split("/", 1)
                opt_state.setdefault(int(pid), {})[name] = value
        for pid, entry in json.loads(metadata["sefi.optimizer.scalars"]).items():
            opt_state.setdefault(int(pid), {}).update(entry)
        groups = json.loads(metadata["sefi.optimizer.param_groups"])
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        return TrainState(
            generator=generator,
            optimizer={"state": dict(sorted(opt_state.items())), "param_groups": groups},
            step=int(metadata["sefi.step"]),
            loss_history=[float(x) for x in json.loads(metadata["sefi.loss_history"])],
            settings=json.loads(metadata["sefi.settings"]),
            generator_config=json.loads(metadata["sefi.generator_config"]),
            parts_history=json.loads(metadata.get("sefi.parts_history", "[]")),
            loss_scale=json.loads(metadata.get("sefi.loss_scale", "null")),
            photos=json.loads(metadata.get("sefi.photos", "[]")),
            run_id=metadata.get("sefi.run_id"),
        )
    except (KeyError, ValueError) as e:
        raise TrainStateFileError(f"{p.name} is a damaged SeFi training checkpoint ({e!r})") from e
