"""The SeFi identity: per-stage K/V token vectors plus their metadata, and its `.safetensors` file format.

An identity is S stages x (K, V) x n vectors in the CLIP input word-embedding space of each text encoder
(method.md 1.1). K vectors only ever build attention keys and V vectors only values (1.4).

File layout (format version 1), one float32 tensor per key:
    sefi.<encoder>.k, sefi.<encoder>.v   [S, n, C]   per-stage K and V vectors
    <encoder>                            [n, C]      mean over stages and K/V: a stock textual-inversion
                                                     fallback, so the same file works as `embedding:name`
with <encoder> = clip_l (768) for SD1, and clip_l + clip_g (1280) for SDXL (comfyui-host.md A9). The
safetensors `__metadata__` (all strings) holds sefi.format_version, sefi.family, sefi.stages,
sefi.vectors_per_token, sefi.trigger, sefi.initializer, sefi.training (JSON), sefi.image_hashes (JSON list) and,
when known, sefi.embedding_norms (JSON: the mean word-embedding length of each text encoder it was trained with,
so that loading can refuse blown-up tokens without the text encoder at hand; sefi_core.token_scale).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .atomic import atomic_write
from .stages import MAX_STAGES, check_stages
from .token_scale import ADVICE, check_embedding_norms, check_token_scale, token_scale_problem
from .tokens import MAX_VECTORS_PER_TOKEN, check_trigger

__all__ = [
    "ENCODER_WIDTHS",
    "FAMILY_ENCODERS",
    "FORMAT_VERSION",
    "Identity",
    "IdentityFileError",
    "hash_array",
    "hash_image_bytes",
    "load_identity",
    "save_identity",
]

FORMAT_VERSION = "1"
ENCODER_WIDTHS: Mapping[str, int] = MappingProxyType({"clip_l": 768, "clip_g": 1280})
FAMILY_ENCODERS: Mapping[str, tuple[str, ...]] = MappingProxyType({"sd1": ("clip_l",), "sdxl": ("clip_l", "clip_g")})

_SUFFIX = ".safetensors"
# The largest valid identity (10 stages, 75 vectors, SDXL) is about 13 MB; refuse to read anything far bigger.
_MAX_FILE_BYTES = 64 * 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TI_KEYS = frozenset({"clip_l", "clip_g", "emb_params", "string_to_param"})
# str.isdigit() also accepts superscripts and other digit signs ("²") that int() refuses: metadata numbers are
# plain ASCII decimal digits only.
_ASCII_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True, eq=False)
class Identity:
    """One learned identity. Validated once here, so code that receives an Identity can trust it.

    `tokens[encoder]` is float32 [S, 2, n, C]: axis 1 is (K, V). The tensors are stored as detached,
    contiguous CPU copies, so later changes to the caller's tensors (or a training graph) do not leak in.
    """

    family: str
    tokens: Mapping[str, torch.Tensor]
    trigger: str
    initializer: str
    training: Mapping[str, Any] = field(default_factory=dict)
    image_hashes: tuple[str, ...] = ()
    embedding_norms: Mapping[str, float] = field(default_factory=dict)
    """{encoder: mean word-embedding length of the text encoder it was trained with}; when given, tokens far
    beyond it are refused here (sefi_core.token_scale)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILY_ENCODERS:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {', '.join(FAMILY_ENCODERS)}")
        encoders = FAMILY_ENCODERS[self.family]
        if not isinstance(self.tokens, Mapping) or set(self.tokens) != set(encoders):
            got = sorted(self.tokens) if isinstance(self.tokens, Mapping) else type(self.tokens).__name__
            raise ValueError(f"a {self.family} identity needs tokens for exactly {list(encoders)}, got {got}")
        sizes = {enc: _check_token_tensor(enc, self.tokens[enc]) for enc in encoders}
        if len(set(sizes.values())) != 1:
            detail = ", ".join(f"{enc}: S={s} n={n}" for enc, (s, n) in sizes.items())
            raise ValueError(f"all encoders must have the same stages S and vectors per token n, got {detail}")
        check_trigger(self.trigger)
        if not isinstance(self.initializer, str) or not self.initializer or any(c.isspace() for c in self.initializer):
            raise ValueError(f"the initializer must be a single word such as 'person', got {self.initializer!r}")
        try:
            training = json.loads(json.dumps(dict(self.training), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"training settings must be JSON-serialisable (str keys, finite numbers): {e}") from e
        hashes = tuple(self.image_hashes)
        bad = [h for h in hashes if not isinstance(h, str) or not _HEX64.fullmatch(h)]
        if bad:
            raise ValueError(f"image hashes must be lowercase sha256 hex strings (see hash_image_bytes), got {bad[:3]}")
        norms = check_embedding_norms(self.embedding_norms)
        if not set(norms) <= set(encoders):
            raise ValueError(f"embedding norms are for {sorted(norms)}, but a {self.family} identity has encoders "
                             f"{list(encoders)}")
        frozen = {enc: self.tokens[enc].detach().to("cpu", copy=True).contiguous() for enc in encoders}
        check_token_scale(frozen, norms, f"identity '{self.trigger}'")
        object.__setattr__(self, "tokens", MappingProxyType(frozen))
        object.__setattr__(self, "training", training)
        object.__setattr__(self, "image_hashes", hashes)
        object.__setattr__(self, "embedding_norms", MappingProxyType(norms))

    @classmethod
    def constant(
        cls,
        family: str,
        vectors: Mapping[str, torch.Tensor],
        *,
        stages: int,
        trigger: str,
        initializer: str,
        training: Mapping[str, Any] | None = None,
        image_hashes: Iterable[str] = (),
        embedding_norms: Mapping[str, float] | None = None,
    ) -> Identity:
        """An identity whose every stage and both K and V are the given [n, C] vectors per encoder.

        This is what a plain textual-inversion embedding amounts to; handy for tests and as a baseline.
        """
        check_stages(stages)
        tokens = {}
        for enc, v in vectors.items():
            if not isinstance(v, torch.Tensor) or v.ndim != 2:
                raise ValueError(f"constant vectors for {enc!r} must be a tensor [n, C]")
            tokens[enc] = v.expand(stages, 2, *v.shape)
        return cls(family, tokens, trigger, initializer, dict(training or {}), tuple(image_hashes),
                   dict(embedding_norms or {}))

    @property
    def encoders(self) -> tuple[str, ...]:
        """Encoder names in canonical order (clip_l first)."""
        return FAMILY_ENCODERS[self.family]

    @property
    def stages(self) -> int:
        """S, the number of timestep stages."""
        return self.tokens["clip_l"].shape[0]

    @property
    def vectors_per_token(self) -> int:
        """n, the number of vectors the trigger word expands to."""
        return self.tokens["clip_l"].shape[2]

    def stage_tokens(self, encoder: str, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K vectors [n, C], V vectors [n, C]) of one encoder at one stage."""
        self._check_encoder(encoder)
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.stages:
            raise ValueError(f"stage must be an integer from 0 to {self.stages - 1}, got {stage!r}")
        t = self.tokens[encoder]
        return t[stage, 0], t[stage, 1]

    def fallback(self, encoder: str) -> torch.Tensor:
        """[n, C] mean over stages and K/V: the lossy single-vector stand-in used by `embedding:name`."""
        self._check_encoder(encoder)
        return self.tokens[encoder].mean(dim=(0, 1))

    def _check_encoder(self, encoder: str) -> None:
        if encoder not in self.tokens:
            raise ValueError(f"a {self.family} identity has encoders {list(self.encoders)}, not {encoder!r}")


def _check_token_tensor(encoder: str, t: object) -> tuple[int, int]:
    """Validate one encoder's token tensor; returns (S, n)."""
    width = ENCODER_WIDTHS[encoder]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"tokens[{encoder!r}] must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"tokens[{encoder!r}] must be float32, got {t.dtype}; convert it with .float()")
    if t.ndim != 4 or t.shape[1] != 2 or t.shape[3] != width:
        raise ValueError(
            f"tokens[{encoder!r}] must have shape [S, 2, n, {width}] (stages, K/V, vectors, width), got {list(t.shape)}"
        )
    stages, n = t.shape[0], t.shape[2]
    if not 1 <= stages <= MAX_STAGES:
        raise ValueError(f"tokens[{encoder!r}] has {stages} stages; an identity has 1 to {MAX_STAGES}")
    if not 1 <= n <= MAX_VECTORS_PER_TOKEN:
        raise ValueError(f"tokens[{encoder!r}] has {n} vectors per token; allowed are 1 to {MAX_VECTORS_PER_TOKEN}")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"tokens[{encoder!r}] has {bad} non-finite value(s) (NaN/Inf); training diverged")
    return stages, n


def hash_image_bytes(data: bytes) -> str:
    """sha256 hex of an encoded image file, to record which images an identity was trained on."""
    return hashlib.sha256(data).hexdigest()


def hash_array(array: np.ndarray | torch.Tensor) -> str:
    """sha256 hex of an array's dtype, shape and C-order bytes; a numpy array and a tensor holding the same
    values hash the same (for decoded images, e.g. a ComfyUI IMAGE slice [H, W, 3])."""
    if isinstance(array, torch.Tensor):
        t = array.detach().cpu().contiguous()
        dtype, shape, raw = str(t.dtype).removeprefix("torch."), tuple(t.shape), t.view(torch.uint8).numpy().tobytes()
    else:
        a = np.ascontiguousarray(array)
        dtype, shape, raw = a.dtype.name, a.shape, a.tobytes()
    h = hashlib.sha256(f"{dtype}{list(shape)}".encode())
    h.update(raw)
    return h.hexdigest()


class IdentityFileError(ValueError):
    """An identity file could not be read: says which file, what is wrong and what to do about it."""

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. To fix: {fix}.")


def _tensor_keys(encoder: str) -> tuple[str, str, str]:
    return f"sefi.{encoder}.k", f"sefi.{encoder}.v", encoder


def save_identity(identity: Identity, path: str | os.PathLike[str]) -> Path:
    """Write `identity` to a `.safetensors` file atomically (an existing file is replaced only on success).

    The suffix is required because ComfyUI reads `embedding:name` files without it with torch.load.
    """
    target = Path(path)
    if target.suffix != _SUFFIX:
        raise ValueError(f"identity files must end in {_SUFFIX}, got {target.name!r}")
    tensors: dict[str, torch.Tensor] = {}
    for enc in identity.encoders:
        k_key, v_key, fallback_key = _tensor_keys(enc)
        t = identity.tokens[enc]
        tensors[k_key] = t[:, 0].contiguous()
        tensors[v_key] = t[:, 1].contiguous()
        tensors[fallback_key] = identity.fallback(enc).contiguous()
    metadata = {
        "sefi.format_version": FORMAT_VERSION,
        "sefi.family": identity.family,
        "sefi.stages": str(identity.stages),
        "sefi.vectors_per_token": str(identity.vectors_per_token),
        "sefi.trigger": identity.trigger,
        "sefi.initializer": identity.initializer,
        "sefi.training": json.dumps(identity.training, sort_keys=True),
        "sefi.image_hashes": json.dumps(list(identity.image_hashes)),
        "modelspec.title": f"SeFi identity '{identity.trigger}'",
    }
    if identity.embedding_norms:
        metadata["sefi.embedding_norms"] = json.dumps(dict(identity.embedding_norms), sort_keys=True)
    return atomic_write(target, lambda f: f.write(safetensors.torch.save(tensors, metadata)))


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Read and fully validate an identity file; raises IdentityFileError naming the problem and the fix."""
    path = Path(path)
    data = _read_file(path)
    entries, metadata = _parse_header(path, data)
    family, stages, n = _check_metadata(path, entries, metadata)
    for enc in FAMILY_ENCODERS[family]:
        k_key, v_key, fallback_key = _tensor_keys(enc)
        width = ENCODER_WIDTHS[enc]
        for key, shape in ((k_key, [stages, n, width]), (v_key, [stages, n, width]), (fallback_key, [n, width])):
            _check_entry(path, key, entries[key], shape, family, enc)
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as e:
        raise IdentityFileError(path, f"the tensor data is corrupt ({e})", _REDOWNLOAD) from e
    for key, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise IdentityFileError(
                path,
                f"tensor '{key}' has {bad} non-finite value(s) (NaN/Inf)",
                "training diverged or the file is damaged; retrain (e.g. with a lower learning rate) "
                "or use an earlier checkpoint",
            )
    tokens = {
        enc: torch.stack((tensors[f"sefi.{enc}.k"], tensors[f"sefi.{enc}.v"]), dim=1)
        for enc in FAMILY_ENCODERS[family]
    }
    training = _json_metadata(path, metadata, "sefi.training", dict)
    hashes = _json_metadata(path, metadata, "sefi.image_hashes", list)
    norms = _json_metadata(path, metadata, "sefi.embedding_norms", dict, default="{}")
    try:
        norms = check_embedding_norms(norms)
    except ValueError as e:
        raise IdentityFileError(path, f"invalid metadata sefi.embedding_norms: {e}", _RESAVE) from e
    blown_up = token_scale_problem(tokens, norms)
    if blown_up:
        raise IdentityFileError(path, f"its tokens have blown up: {blown_up}", ADVICE)
    try:
        return Identity(family, tokens, metadata.get("sefi.trigger", ""), metadata.get("sefi.initializer", ""),
                        training, tuple(hashes), norms)
    except ValueError as e:
        raise IdentityFileError(path, f"invalid identity metadata: {e}", _RESAVE) from e


_REDOWNLOAD = "the file is damaged; copy or download it again, or re-save it from the SeFi trainer"
_RESAVE = "the file was edited or written by another tool; re-save it with SeFi-IDE"


def _read_file(path: Path) -> bytes:
    """The whole file (identities are small). Reading it at once also avoids holding an mmap, which on
    Windows would block replacing the file while it is in use."""
    if not path.is_file():
        raise IdentityFileError(path, "no such file", "check the file name and folder")
    size = path.stat().st_size
    if size > _MAX_FILE_BYTES:
        raise IdentityFileError(
            path, f"the file is {size / 2**20:.0f} MiB, far larger than any identity", "pick the identity file itself"
        )
    return path.read_bytes()


def _parse_header(path: Path, data: bytes) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Decode the safetensors header ourselves, to tell truncated, corrupt and foreign files apart."""
    not_safetensors = (
        f"SeFi identities are {_SUFFIX} files; pick one saved by SeFi-IDE "
        "(a .pt/.bin textual-inversion embedding cannot be loaded as an identity)"
    )
    if len(data) < 8:
        raise IdentityFileError(path, f"the file has only {len(data)} bytes: not a safetensors file", not_safetensors)
    (header_len,) = struct.unpack("<Q", data[:8])
    fits = 8 + header_len <= len(data)
    if not fits or data[8:9] != b"{":
        # Only now look at magic numbers: a valid safetensors length prefix can start with the same bytes.
        if data.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")):
            raise IdentityFileError(path, "not a safetensors file (it is a PyTorch zip/pickle file)", not_safetensors)
        if fits or header_len > _MAX_FILE_BYTES:
            raise IdentityFileError(path, "not a safetensors file (no JSON header)", not_safetensors)
        raise IdentityFileError(
            path, f"the file is truncated: its header needs {header_len} bytes but only {len(data) - 8} follow",
            _REDOWNLOAD,
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not a mapping of strings")
        end = 0
        for key, entry in header.items():
            _, stop = entry["data_offsets"]
            if not (isinstance(entry["dtype"], str) and all(isinstance(d, int) for d in entry["shape"])):
                raise ValueError(f"bad entry for {key!r}")
            end = max(end, int(stop))
    except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise IdentityFileError(path, f"not a safetensors file or its header is corrupt ({e})", not_safetensors) from e
    available = len(data) - 8 - header_len
    if end > available:
        raise IdentityFileError(
            path, f"the file is truncated: the tensors need {end} bytes but only {available} are there", _REDOWNLOAD
        )
    return header, metadata


def _check_metadata(
    path: Path, entries: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, str]
) -> tuple[str, int, int]:
    """Check version, family, sizes and the key set; returns (family, stages, vectors_per_token)."""
    version = metadata.get("sefi.format_version")
    if version is None:
        if any(key.startswith("sefi.") for key in entries):
            raise IdentityFileError(
                path, "the file has SeFi tensors but no sefi.* metadata (a tool that rewrote it dropped the metadata)",
                "use the original file, or re-save the identity with SeFi-IDE",
            )
        if set(entries) & _TI_KEYS:
            raise IdentityFileError(
                path,
                "this looks like a plain textual-inversion embedding, not a SeFi identity (it has no sefi.* metadata)",
                "use it in a prompt as embedding:<name>, or train a SeFi identity and load that file",
            )
        raise IdentityFileError(
            path, "this safetensors file has no SeFi metadata (sefi.format_version): it is not a SeFi identity",
            "pick an identity file saved by SeFi-IDE",
        )
    if version != FORMAT_VERSION:
        if _ASCII_DIGITS.fullmatch(version) and int(version) > int(FORMAT_VERSION):
            raise IdentityFileError(
                path, f"the file uses identity format {version}, newer than this SeFi-IDE reads ({FORMAT_VERSION})",
                "update the SeFi-IDE node pack",
            )
        raise IdentityFileError(path, f"unknown identity format version {version!r}", _RESAVE)
    family = metadata.get("sefi.family")
    if family not in FAMILY_ENCODERS:
        raise IdentityFileError(
            path, f"metadata sefi.family is {family!r}; expected one of {', '.join(FAMILY_ENCODERS)}", _RESAVE
        )
    stages = _int_metadata(path, metadata, "sefi.stages", MAX_STAGES)
    n = _int_metadata(path, metadata, "sefi.vectors_per_token", MAX_VECTORS_PER_TOKEN)
    present = {key.split(".")[1] for key in entries if key.startswith("sefi.") and key.count(".") == 2}
    expected = FAMILY_ENCODERS[family]
    if present and present != set(expected) and present <= set(ENCODER_WIDTHS):
        raise IdentityFileError(
            path,
            f"the metadata says family '{family}' (encoders {', '.join(expected)}) but the tensors are for "
            f"{', '.join(sorted(present))}",
            _RESAVE,
        )
    wanted = {key for enc in expected for key in _tensor_keys(enc)}
    missing, unexpected = sorted(wanted - set(entries)), sorted(set(entries) - wanted)
    if missing or unexpected:
        parts = ([f"missing tensor key(s) {missing}"] if missing else []) + (
            [f"unexpected tensor key(s) {unexpected}"] if unexpected else []
        )
        raise IdentityFileError(path, f"{' and '.join(parts)} for a {family} identity", _RESAVE)
    return family, stages, n


def _int_metadata(path: Path, metadata: Mapping[str, str], key: str, maximum: int) -> int:
    raw = metadata.get(key, "")
    if not _ASCII_DIGITS.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise IdentityFileError(path, f"metadata {key} is {raw!r}; expected an integer from 1 to {maximum}", _RESAVE)
    return int(raw)


def _json_metadata(path: Path, metadata: Mapping[str, str], key: str, kind: type, default: str = "") -> Any:
    try:
        value = json.loads(metadata.get(key, default))
    except ValueError as e:
        raise IdentityFileError(path, f"metadata {key} is not valid JSON ({e})", _RESAVE) from e
    if not isinstance(value, kind):
        raise IdentityFileError(path, f"metadata {key} must be a JSON {kind.__name__}", _RESAVE)
    return value


def _check_entry(
    path: Path, key: str, entry: Mapping[str, Any], shape: list[int], family: str, encoder: str
) -> None:
    """dtype and shape of one tensor, from the header (before any data is decoded)."""
    if entry["dtype"] != "F32":
        raise IdentityFileError(path, f"tensor '{key}' has dtype {entry['dtype']}, expected F32 (float32)", _RESAVE)
    got = list(entry["shape"])
    if len(got) == len(shape) and got[-1] != shape[-1]:
        raise IdentityFileError(
            path,
            f"tensor '{key}' is {got[-1]} wide but the metadata says family '{family}', whose "
            f"{encoder} vectors are {shape[-1]} wide (family mismatch)",
            _RESAVE,
        )
    if got != shape:
        raise IdentityFileError(path, f"tensor '{key}' has shape {got}, expected {shape} per the metadata", _RESAVE)
