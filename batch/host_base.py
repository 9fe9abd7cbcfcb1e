"""The base folder of a host this command starts itself (an embedded server, or a Ray worker's in-process host):
its models/sefi_identities is a link to --out, so the node writes the identities there directly."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from host_boot import embedded_host

UPLOAD_FOLDER = "sefi_batch"
"""The sub-folder of a host's input folder that holds the uploaded (or linked) photos, per person."""


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        return
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def local_base(out_dir: Path, models_dir: Path, checkpoint: Path) -> Path:
    """A base folder for a self-started host: models/sefi_identities -> --out, models/checkpoints holding the
    checkpoint, the other model folders of --models-dir (insightface, …) linked as they are."""
    base = Path(tempfile.mkdtemp(prefix="sefi-batch-"))
    models = base / "models"
    _link(models / "sefi_identities", out_dir)
    _link(models / "checkpoints" / checkpoint.name, checkpoint)
    if models_dir.is_dir():
        for sub in models_dir.iterdir():
            if sub.is_dir() and sub.name not in ("sefi_identities", "checkpoints"):
                _link(models / sub.name, sub)
    return base


def remove_base(base: Path) -> None:
    """Remove a worker's temporary base folder, unlinking the links first so nothing in --out is touched."""
    for link in [base / "models" / "sefi_identities", base / "custom_nodes" / embedded_host.PACK_DIR_NAME]:
        if link.is_symlink():
            link.unlink()
    shutil.rmtree(base, ignore_errors=True)
