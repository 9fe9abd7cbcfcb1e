"""Where and from what a claims run was measured, and the key its cached result is filed under.

A run's numbers depend on the world's weights and the code that builds the checkpoint (the recipe), on the
variant's settings, the person, the seed, the steps and the prompts: the cache key hashes all of them, so a cached
result is reused only for exactly that run. Its timings and its last bits also depend on the machine (CPU, torch
threads, torch and host versions), which the provenance records so the report can say which runs ran where."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def code_commit(repo: Path = REPO) -> str:
    """The repository's commit, with '+changes' when tracked files differ from it; 'unknown' outside a checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(host_label: str, weights: Path, recipe: str) -> dict:
    """What a run records about where it ran and on what."""
    import torch
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "host": host_label,
            "weights_sha256": sha256(weights), "recipe": recipe, "commit": code_commit()}


def machine(result: dict) -> str | None:
    """The machine a run's timings and bits belong to (CPU and threads); None for a run that did not record it."""
    p = result.get("provenance")
    return None if p is None else f"{p['cpu']}, {p['threads']} threads"


def cache_key(variant_settings: dict, person: int, seed: int, steps: int, prompts: list[str], recipe: str) -> str:
    """A hash of everything that changes a run's result; a cached result with another key is not this run's."""
    what = {"variant": variant_settings, "person": person, "seed": seed, "steps": steps, "prompts": prompts,
            "recipe": recipe}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]
