"""A disk cache of a scribble session's features, keyed by the image's voxels and the encoder's weights.

An entry is one uncompressed `.npz` file (no pickle) named by `entry_key`: a sha256 over the
image's voxels and geometry (`volume_digest`), the encoder's config and weights
(`encoder_digest`) and the settings that shape the features. It holds the arrays a session needs
and, under "key", the key it was written for.

- Folder: `$AR3D_CACHE_DIR`, else the user cache folder (`platformdirs`, when installed), else
  ~/.cache/napari-ar3d; entries go in its `features/` sub-folder.
- Writes are atomic (a temporary file in the same folder, then `os.replace`): a reader never sees
  half an entry.
- Reading verifies everything (zip CRCs, the key, the expected arrays): a broken or stale entry is
  deleted and reported as a miss, so it is recomputed, never trusted.
- The folder is bounded: after a write the oldest entries (by modification time; a hit touches
  its entry) are deleted until the folder is under `max_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from model_core.io.cache import CACHE_ENV, user_cache  # noqa: F401  (tests set CACHE_ENV through this module)

DEFAULT_MAX_BYTES = 2 * 2**30  # 2 GiB
SUFFIX = ".npz"


def cache_dir() -> Path:
    """The features folder: $AR3D_CACHE_DIR/features, else the user cache folder's."""
    return user_cache("features")


def volume_digest(array: np.ndarray, affine: np.ndarray) -> str:
    """sha256 of an image's voxels (dtype, shape, bytes) and its affine."""
    digest = hashlib.sha256()
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(np.asarray(affine, dtype=np.float64).tobytes())
    return digest.hexdigest()


def encoder_digest(encoder: torch.nn.Module, config: dict) -> str:
    """sha256 of an encoder's config and every weight, in state-dict order."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry_key(**parts: str | float | list | dict) -> str:
    """The entry name for these key parts (image digest, model digest, settings): a sha256 of their JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_entry(key: str, names: tuple[str, ...], folder: Path | None = None) -> dict[str, np.ndarray] | None:
    """The arrays `names` of entry `key`, or None when it is absent, unreadable, stale or incomplete.

    A present entry that fails a check is deleted.
    """
    path = (folder or cache_dir()) / f"{key}{SUFFIX}"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in (*names, "key")}  # zipfile checks each member's CRC
        if str(arrays.pop("key")) != key:
            raise ValueError("written for another key")
        os.utime(path)  # most recently used
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        path.unlink(missing_ok=True)
        return None


def save_entry(key: str, arrays: dict[str, np.ndarray], folder: Path | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES) -> Path | None:
    """Write entry `key` atomically, then evict the oldest entries beyond `max_bytes`.

    Returns its path, or None when the folder cannot be written (the cache is an optimisation:
    a full disk or a read-only folder never fails the session).
    """
    folder = folder or cache_dir()
    target = folder / f"{key}{SUFFIX}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, key=np.array(key), **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return None
    evict(folder, max_bytes, keep=target)
    return target


def evict(folder: Path, max_bytes: int, keep: Path | None = None) -> None:
    """Delete the oldest entries of `folder` until their total size is at most `max_bytes` (never `keep`),
    and temporary files a killed writer left more than an hour ago."""
    for tmp in folder.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
        except OSError:
            pass
    entries = []
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            stat = path.stat()
        except OSError:
            continue  # deleted by another process meanwhile
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size
