"""Model files this repository writes (tiny checkpoints, the world checkpoint) are readable as any model file is."""
from __future__ import annotations

import os
import stat

import torch

from tools import tiny_checkpoints


def test_saved_checkpoint_has_the_umask_default_permissions_not_owner_only(tmp_path):
    path = tiny_checkpoints.save({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))
