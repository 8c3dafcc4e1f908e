"""The user cache folder napari-ar3d keeps its files in (features, downloaded samples, recovered labels).

Torch-free: the napari reader and the sample commands use it too.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "AR3D_CACHE_DIR"  # a folder that replaces the platform's user cache folder
APP_NAME = "napari-ar3d"


def platform_cache_dir() -> Path:
    """The platform's user cache folder for napari-ar3d (`platformdirs` when installed, else ~/.cache/napari-ar3d)."""
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / APP_NAME
    return Path(user_cache_dir(APP_NAME, appauthor=False))


def user_cache(sub: str) -> Path:
    """The folder `sub` of $AR3D_CACHE_DIR, else of `platform_cache_dir()`."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else platform_cache_dir()) / sub
