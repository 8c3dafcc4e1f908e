"""Crash-safe annotation: painted labels saved in the background and offered back when their image opens again.

`install(viewer)` (the reader calls it for the viewer it opens a file in; once per viewer) watches
the viewer's layers (storage: `model_core.io.recovery`):
- an image opened by our reader (`metadata["ar3d"]["path"]`) gets its recovery key (a sha256 of its
  source file and voxels, computed in a worker); when labels were saved for it, a small window
  offers to Restore them into labels layers on the image's geometry, to Discard them, or Later;
- a labels layer on such an image's grid (scribbles, corrections of a segmentation) is saved a
  moment after each stroke (paint, fill, erase, undo / redo, new data), at most every
  `AUTOSAVE_S` seconds, by a background thread, so painting never waits for the disk.
No torch here.
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_warning
from napari_ar3d.widgets._layers import aligned_kwargs, label_names, real_viewer, same_grid
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QMessageBox

from model_core.io.recovery import RecoveredLabels, discard, find_labels, image_key, save_labels

AUTOSAVE_S = 2.0  # at most one save of a labels layer per this many seconds
SETTLE_S = 0.3  # a save waits this long after a stroke, so a burst of strokes is saved once

_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # viewer -> its RecoveryHook


def install(viewer: Any) -> RecoveryHook:
    """The viewer's recovery hook, made and connected on the first call."""
    viewer = real_viewer(viewer)
    if viewer not in _HOOKS:
        _HOOKS[viewer] = RecoveryHook(viewer)
    return _HOOKS[viewer]


def image_source(layer: Any) -> str | None:
    """The source file of an image layer our reader opened, else None."""
    if layer.__class__.__name__ != "Image" or getattr(layer, "multiscale", False) or layer.data.ndim != 3:
        return None
    return (layer.metadata.get("ar3d") or {}).get("path")


class RecoveryHook:
    """Keys the viewer's images, offers their saved labels, and keeps a `LabelsSaver` on each labels layer."""

    def __init__(self, viewer: Any) -> None:
        self._viewer = weakref.ref(viewer)  # the viewer holds its hook (`_HOOKS`), not the other way round
        self.keys: dict[int, str] = {}  # id(image layer) -> recovery key
        self.savers: dict[int, LabelsSaver] = {}  # id(labels layer) -> its saver
        self.offers: list[QMessageBox] = []  # what was offered, newest last
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ar3d-recovery")
        self._workers: list[Any] = []  # key computations running (kept alive until they return)
        viewer.layers.events.inserted.connect(lambda event: self._add(event.value))
        viewer.layers.events.removed.connect(lambda event: self._remove(event.value))
        for layer in viewer.layers:
            self._add(layer)

    @property
    def viewer(self) -> Any:
        return self._viewer()

    def _add(self, layer: Any) -> None:
        if layer.__class__.__name__ == "Labels":
            self.savers[id(layer)] = LabelsSaver(layer, self)
            return
        source = image_source(layer)
        if source is None:
            return
        from napari.qt.threading import create_worker

        image = weakref.ref(layer)
        worker = create_worker(image_key, source, np.asarray(layer.data))
        worker.returned.connect(lambda key: self._keyed(image(), key))
        worker.finished.connect(lambda: self._workers.remove(worker))
        self._workers.append(worker)
        worker.start()

    def _remove(self, layer: Any) -> None:
        self.keys.pop(id(layer), None)
        saver = self.savers.pop(id(layer), None)
        if saver is not None:
            saver.close()

    def _keyed(self, image: Any, key: str) -> None:
        if image is None or self.viewer is None or image not in self.viewer.layers:
            return  # closed while its key was computed
        self.keys[id(image)] = key
        entries = find_labels(key)
        if entries:
            self.offer(image, entries)
        for saver in self.savers.values():
            if saver.waiting_for_image:
                saver.changed()

    def image_of(self, labels: Any) -> tuple[Any, str] | None:
        """(image, key) of the keyed image `labels` lies on: the one it was made from, else the first on its grid."""
        source = (labels.metadata.get("ar3d") or {}).get("path")
        candidates = [layer for layer in self.viewer.layers if id(layer) in self.keys and same_grid(layer, labels)]
        candidates.sort(key=lambda layer: image_source(layer) != source)
        return (candidates[0], self.keys[id(candidates[0])]) if candidates else None

    def offer(self, image: Any, entries: list[RecoveredLabels]) -> QMessageBox:
        """Ask, in a small window that stays until answered, whether to Restore, Discard or (Later) keep them."""
        when = datetime.fromtimestamp(entries[0].saved).strftime("%Y-%m-%d %H:%M")
        names = ", ".join(repr(e.name) for e in entries)
        text = (f"Labels painted on {image.name!r} were saved before napari closed: {names} (last saved {when}).\n"
                "Restore them as labels layers on the image?")
        parent = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        box = QMessageBox(QMessageBox.Icon.Question, "napari-ar3d: restore labels", text,
                          QMessageBox.StandardButton.NoButton, parent)
        box.addButton("Restore", QMessageBox.ButtonRole.AcceptRole).clicked.connect(
            lambda: self.restore(image, entries))
        box.addButton("Discard", QMessageBox.ButtonRole.DestructiveRole).clicked.connect(
            lambda: self.discard(entries))
        box.addButton("Later", QMessageBox.ButtonRole.RejectRole)  # they stay saved, offered at the next opening
        box.setModal(False)
        box.show()
        self.offers.append(box)
        return box

    def restore(self, image: Any, entries: list[RecoveredLabels]) -> list[Any]:
        """Add each saved labels layer on `image`'s geometry; later saves of a layer replace its entry."""
        layers = []
        for entry in entries:
            data = entry.load()
            if tuple(data.shape) != tuple(image.data.shape):
                show_warning(f"saved labels {entry.name!r} have shape {data.shape}, the image {image.data.shape}; "
                             "not restored")
                continue
            name = entry.name if entry.name not in self.viewer.layers else f"{entry.name} (recovered)"
            values = sorted({0, *entry.classes})
            features = {"index": values, "class": [entry.classes.get(v, "background") for v in values]}
            layer = self.viewer.add_labels(data, name=name, features=features, **aligned_kwargs(image))
            self.savers[id(layer)].adopt(entry.path)
            layers.append(layer)
        return layers

    def discard(self, entries: list[RecoveredLabels]) -> None:
        for entry in entries:
            discard(entry)


class LabelsSaver:
    """Saves one labels layer after its strokes, at most every `AUTOSAVE_S` seconds, in the hook's thread."""

    def __init__(self, layer: Any, hook: RecoveryHook) -> None:
        self.layer, self.hook = layer, hook
        self.path: Path | None = None  # the entry this layer was last saved to
        self.pending: Future | None = None
        self.last = -AUTOSAVE_S  # time.monotonic() of the last save
        self.waiting_for_image = False
        self.timer = QTimer()
        self.timer.setSingleShot(True)
        self.timer.timeout.connect(self.save)
        self.events = [layer.events.paint, layer.events.set_data, layer.events.data]
        for event in self.events:
            event.connect(self.changed)

    def adopt(self, path: Path) -> None:
        """Continue the entry at `path` (restored labels): the layer's next save replaces it."""
        self.path = path

    def changed(self, event: Any = None) -> None:
        """The labels changed: save them soon, but not sooner than `AUTOSAVE_S` after the last save."""
        if not self.timer.isActive():
            wait = max(SETTLE_S, self.last + AUTOSAVE_S - time.monotonic())
            self.timer.start(int(wait * 1000))

    def save(self) -> None:
        """Hand a copy of the labels to the background thread (on the GUI thread: the copy is consistent)."""
        if self.pending is not None and not self.pending.done():
            self.timer.start(int(SETTLE_S * 1000))  # the previous save is still writing
            return
        self._report(self.pending)
        found = self.hook.image_of(self.layer)
        self.waiting_for_image = found is None
        if found is None:
            return  # not on a keyed image (yet): `RecoveryHook._keyed` calls again
        image, key = found
        data = np.array(self.layer.data, copy=True)  # (k, j, i)
        self.last = time.monotonic()
        self.pending = self.hook.executor.submit(self._write, key, self.layer.name, data, image_source(image),
                                                 label_names(self.layer), self.path)

    def _write(self, key: str, name: str, data: np.ndarray, source: str, classes: dict, previous: Path | None) -> Path:
        path = save_labels(key, name, data, source=source, classes=classes)
        if previous is not None and previous != path:  # renamed layer or restored under a new name
            previous.unlink(missing_ok=True)
        self.path = path
        return path

    def _report(self, future: Future | None) -> None:
        if future is not None and future.exception() is not None:
            show_warning(f"could not save labels {self.layer.name!r} for recovery: {future.exception()}")

    def close(self) -> None:
        self.timer.stop()
        for event in self.events:
            event.disconnect(self.changed)
