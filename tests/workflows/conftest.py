"""Shared by the workflow tests (tests/workflows): the live node specs and the third-party allow-list."""
from __future__ import annotations

import pytest

# Node types from other packs that a workflow may use, per workflow; every other node must be a core node of the
# host or one of this pack's. kijai/ComfyUI-LivePortraitKJ 1.1.0 (commit 4d9dc62); see workflows/README.md.
THIRD_PARTY_ALLOWED: dict[str, frozenset[str]] = {
    "06_liveportrait_chain": frozenset({"DownloadAndLoadLivePortraitModels", "LivePortraitLoadMediaPipeCropper",
                                        "LivePortraitCropper", "LivePortraitProcess", "LivePortraitComposite"}),
}


@pytest.fixture(scope="session")
def third_party_allowed() -> dict[str, frozenset[str]]:
    return THIRD_PARTY_ALLOWED


@pytest.fixture(scope="session")
def object_info(server) -> dict:
    """The live server's /object_info (core nodes + this pack)."""
    return server.client.object_info()
