"""Fixtures shared by the pure sefi_core tests (no ComfyUI here)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from sefi_core.faces import DlibBackend, Face


class CachingBackend:
    """dlib with detections memoised by image content: each photo is detected once per session."""

    def __init__(self) -> None:
        self.inner = DlibBackend()
        self.name = self.inner.name
        self.cache: dict[str, list[Face]] = {}

    def detect(self, image: np.ndarray, descriptors: bool = True) -> list[Face]:
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.inner.detect(image, descriptors=True)
        return list(self.cache[key])


@pytest.fixture(scope="session")
def backend() -> CachingBackend:
    return CachingBackend()


@pytest.fixture
def one_thread():
    """For modules of tiny tensors: extra intra-op threads only add spin-wait cost on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
