"""A missing development requirement skips on a developer's machine and fails under CI (tools.dev_requirements)."""
from __future__ import annotations

import pytest

from tools.dev_requirements import import_required, require

MISSING = "sefi_no_such_module_anywhere"


def test_a_missing_module_skips_outside_ci(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs the thing"):
        import_required(MISSING, reason="needs the thing")
    with pytest.raises(pytest.skip.Exception, match="model files"):
        require(False, "model files")


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_a_missing_module_fails_under_ci(monkeypatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="missing under CI=true: needs the thing"):
        import_required(MISSING, reason="needs the thing")
    with pytest.raises(pytest.fail.Exception, match="model files"):
        require(False, "model files")


def test_a_present_module_is_returned(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert import_required("json", reason="stdlib").dumps([1]) == "[1]"
    require(True, "never shown")
