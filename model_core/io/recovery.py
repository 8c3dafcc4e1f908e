"""Crash recovery of painted labels: atomic saves to a recovery folder, found again by the image they belong to.

The napari side (`napari_ar3d.widgets.recovery`) saves each painted labels layer here a few seconds
after a stroke and, when the same image is opened again, offers what it finds.

- Folder: `$AR3D_RECOVERY_DIR`, else `<user cache folder>/napari-ar3d/recovery` (`platformdirs`,
  when installed, else ~/.cache/napari-ar3d/recovery).
- Key: `image_key`, a sha256 of the image's source file (its resolved path) and of its voxels, so
  an edited or replaced file with the same name does not get another image's labels.
- An entry is `<folder>/<key>/<layer name>-<hash>.npz` (no pickle): the labels as the layer holds
  them `(k, j, i)`, stored in the smallest unsigned type that fits, and a JSON record (layer name,
  original type, class names, source, time). Writes are atomic (a hidden temporary file in the
  same folder, synced, then `os.replace`): a crash mid-save leaves the previous entry whole.

No torch, napari or Qt here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_core.io.cache import platform_cache_dir

RECOVERY_ENV = "AR3D_RECOVERY_DIR"
SUFFIX = ".npz"
_TMP_PREFIX = ".saving-"


@dataclass
class RecoveredLabels:
    """One saved labels layer of an image."""

    path: Path
    name: str  # the layer's name
    saved: float  # when (seconds since the epoch)
    source: str  # the image's source file
    classes: dict[int, str] = field(default_factory=dict)  # label value -> class name
    dtype: str = "int32"  # the layer's type

    def load(self) -> np.ndarray:
        """The labels `(k, j, i)` exactly as saved, in the layer's type."""
        with np.load(self.path, allow_pickle=False) as npz:
            return npz["labels"].astype(self.dtype)


def recovery_dir() -> Path:
    """$AR3D_RECOVERY_DIR, else the user cache folder's napari-ar3d/recovery."""
    root = os.environ.get(RECOVERY_ENV)
    return Path(root).expanduser() if root else platform_cache_dir() / "recovery"


def image_key(source: str | os.PathLike, data: np.ndarray) -> str:
    """The recovery key of an image: a sha256 of its source file's resolved path and of its voxels (type, shape, bytes)."""
    data = np.ascontiguousarray(data)
    digest = hashlib.sha256(os.fspath(Path(source).expanduser().resolve()).encode())
    digest.update(f"\n{data.dtype.str}{data.shape}\n".encode())
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()[:32]


def entry_path(key: str, name: str, folder: Path | None = None) -> Path:
    """Where the labels layer `name` of the image `key` is saved."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]
    return (folder or recovery_dir()) / key / f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}{SUFFIX}"


def save_labels(
    key: str,
    name: str,
    data: np.ndarray,
    *,
    source: str | os.PathLike,
    classes: dict[int, str] | None = None,
    folder: Path | None = None,
) -> Path:
    """Save the labels layer `name` (its data `(k, j, i)`) of image `key` atomically; the entry's path."""
    data = np.asarray(data)
    target = entry_path(key, name, folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "dtype": data.dtype.str, "source": os.fspath(source), "saved": time.time(),
              "classes": {str(k): v for k, v in (classes or {}).items()}}
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, labels=_smallest(data), record=np.array(json.dumps(record)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def find_labels(key: str, folder: Path | None = None) -> list[RecoveredLabels]:
    """The saved labels layers of image `key`, newest first; unreadable entries are left out."""
    entries = []
    for path in sorted(((folder or recovery_dir()) / key).glob(f"*{SUFFIX}")):
        if path.name.startswith(_TMP_PREFIX):
            continue  # a save that never finished
        try:
            with np.load(path, allow_pickle=False) as npz:
                record = json.loads(str(npz["record"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue
        classes = {int(k): str(v) for k, v in record.get("classes", {}).items()}
        entries.append(RecoveredLabels(path, record["name"], float(record["saved"]), record["source"], classes,
                                       record["dtype"]))
    return sorted(entries, key=lambda e: e.saved, reverse=True)


def discard(entry: RecoveredLabels) -> None:
    """Delete a saved entry (and its image's folder when it was the last)."""
    entry.path.unlink(missing_ok=True)
    try:
        entry.path.parent.rmdir()
    except OSError:  # other entries remain
        pass


def _smallest(data: np.ndarray) -> np.ndarray:
    """Non-negative whole-number labels in the smallest unsigned type that holds them (smaller, faster saves)."""
    if data.dtype.kind not in "ui" or data.size == 0 or data.min() < 0:
        return data
    high = int(data.max())
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return data.astype(dtype, copy=False)
    return data
