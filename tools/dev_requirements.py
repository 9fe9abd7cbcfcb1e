"""The tests' way to ask for a development requirement (requirements-dev.txt, requirements.txt).

On a developer's machine a missing package skips what needs it, with the reason. Under CI (CI=true, as GitHub
Actions and most CI services set it) every development requirement is installed by `make test`, so a missing one
is a broken set-up: it fails there, instead of passing the run with whole test files skipped.
"""
from __future__ import annotations

import os
from types import ModuleType

import pytest

__all__ = ["import_required", "on_ci", "require"]


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require(present: bool, reason: str) -> None:
    """Skip the calling test (or module, at module level) when `present` is false, or fail there under CI."""
    if present:
        return
    if on_ci():
        pytest.fail(f"a development requirement is missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_required(module: str, reason: str) -> ModuleType:
    """pytest.importorskip, except that under CI a missing module fails (see `require`)."""
    try:
        return pytest.importorskip(module, reason=reason)
    except pytest.skip.Exception:
        require(False, reason)
        raise  # not reached: require raised
