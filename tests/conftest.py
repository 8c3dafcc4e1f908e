"""Shared fixtures: the real-data folder (skipped when absent) and tiny model configs."""

from __future__ import annotations

import json
import locale
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """`$AR3D_DATA`, else `../shared/data` beside the repository; None when absent."""
    env = os.environ.get("AR3D_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if (path / "manifest.json").is_file() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder not found (set AR3D_DATA or put shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def manifest(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "manifest.json").read_text())["cases"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads thrash when other jobs share the 2 CPU cores."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _keep_the_locale():
    """GDCM's DICOM writer sets LC_CTYPE to "C"; later tests would decode subprocess output as ASCII."""
    saved = locale.setlocale(locale.LC_CTYPE)
    yield
    locale.setlocale(locale.LC_CTYPE, saved)
