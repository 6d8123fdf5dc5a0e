"""Shared fixtures: real CT from ../shared/data and small synthetic volumes.

Tests that need the shared data fail when it is missing in CI (CI=true) and skip, saying why,
elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAME_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_data(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        message = f"shared CT data not found at {path} (set SAME_SHARED_DATA to its folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch on ``count`` threads inside the block, as many as before after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: deterministic and fair to other jobs on the machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def abdomen_ct() -> sitk.Image:
    """TotalSegmentator's example abdomen CT: 122x101x112 at 3 mm, direction diag(-1, -1, 1)."""
    return sitk.ReadImage(str(require_data("totalseg/example_ct.nii.gz")))


@pytest.fixture(scope="session")
def openkbp() -> Path:
    return require_data("openkbp")
