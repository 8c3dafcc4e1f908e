"""Crash-safe annotation: `model_core.io.recovery` (atomic saves, lookup by image) and, in real viewers under
xvfb, labels painted in a viewer process that is then killed with SIGKILL come back exactly when the image
is opened again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model_core.io import recovery
from model_core.io.recovery import RECOVERY_ENV, discard, find_labels, image_key, save_labels
from model_core.io.volume import write_volume

VIEWER_SCRIPT = r"""
import sys
import numpy as np
import napari
from qtpy.QtCore import QTimer

viewer = napari.Viewer()
[image] = viewer.open(sys.argv[1], plugin="napari-ar3d")
labels = viewer.add_labels(np.zeros(image.data.shape, np.int32), name="scribbles",
                           affine=image.affine.affine_matrix)  # as napari's "new labels layer" button
labels.brush_size = 5

def stroke(coord, value, last=False):
    labels.paint(coord, value)
    if last:
        np.save(sys.argv[2], labels.data)
        print("painted", flush=True)

QTimer.singleShot(300, lambda: stroke((10, 20, 20), 1))
QTimer.singleShot(600, lambda: labels.fill((10, 20, 20), 3))
QTimer.singleShot(900, lambda: stroke((20, 40, 30), 2, last=True))
napari.run()
"""


@pytest.fixture
def recovery_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "recovery"
    monkeypatch.setenv(RECOVERY_ENV, str(folder))
    return folder


@pytest.fixture
def ct_file(tmp_path, ct_phantom) -> Path:
    phantom = ct_phantom(0)
    return write_volume(tmp_path / "ct.nii.gz", phantom.images["ct"], phantom.affine, kind="float")


def test_saved_labels_come_back_exactly(recovery_folder):
    data = np.zeros((6, 7, 8), np.int32)
    data[1, 2, 3], data[4, 5, 6] = 7, 300  # 300: stored as uint16, restored as int32
    save_labels("k1", "my labels", data, source="/scans/ct.nii.gz", classes={7: "liver"})
    [entry] = find_labels("k1")
    assert (entry.name, entry.source, entry.classes) == ("my labels", "/scans/ct.nii.gz", {7: "liver"})
    restored = entry.load()
    assert restored.dtype == np.int32 and np.array_equal(restored, data)
    assert entry.path.parent == recovery_folder / "k1"
    assert find_labels("another image") == []
    discard(entry)
    assert find_labels("k1") == [] and not (recovery_folder / "k1").exists()


def test_the_key_follows_the_source_file_and_its_voxels(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    key = image_key(tmp_path / "ct.nii.gz", a)
    assert key == image_key(tmp_path / "ct.nii.gz", a.copy())
    assert key != image_key(tmp_path / "other.nii.gz", a)
    b = a.copy()
    b[1, 2, 3] += 1
    assert key != image_key(tmp_path / "ct.nii.gz", b)


def test_an_interrupted_save_keeps_the_previous_entry(recovery_folder, monkeypatch):
    first = np.ones((4, 4, 4), np.int32)
    path = save_labels("k", "labels", first, source="ct.nii.gz")

    def crash(file, **arrays):
        file.write(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(recovery.np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        save_labels("k", "labels", first * 2, source="ct.nii.gz")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    [entry] = find_labels("k")
    assert np.array_equal(entry.load(), first)


def wait_for(predicate, timeout_s: float, step_s: float = 0.2) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step_s)
    return False


def paint_and_kill(image: Path, expected: Path) -> tuple[np.ndarray, list]:
    """Paint in a viewer process, wait for its recovery save to hold the last stroke, kill -9 it."""
    proc = subprocess.Popen([sys.executable, "-c", VIEWER_SCRIPT, str(image), str(expected)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        while line and line.strip() != "painted":
            line = proc.stdout.readline()
        assert line.strip() == "painted", f"the viewer process ended: {proc.stdout.read()}"
        painted = np.load(expected)

        assert wait_for(lambda: bool(saved(painted)), timeout_s=30), "the painted labels were never saved"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return painted, saved(painted)


def saved(labels: np.ndarray) -> list:
    """The recovery entries (of any image) that hold `labels`."""
    folder = Path(os.environ[RECOVERY_ENV])
    keys = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return [e for key in keys for e in find_labels(key) if np.array_equal(e.load(), labels)]


def button(box, text: str):
    [found] = [b for b in box.buttons() if b.text() == text]
    return found


def test_labels_painted_before_a_crash_are_restored_exactly(recovery_folder, ct_file, tmp_path, viewer, qtbot):
    from conftest import assert_aligned
    from napari_ar3d.widgets.recovery import install
    from qtpy.QtCore import Qt

    painted, [entry] = paint_and_kill(ct_file, tmp_path / "painted.npy")
    assert set(np.unique(painted)) == {0, 2, 3}  # the fill replaced stroke 1, stroke 2 came after

    [image] = viewer.open(str(ct_file), plugin="napari-ar3d")
    hook = install(viewer)
    qtbot.waitUntil(lambda: len(hook.offers) == 1, timeout=20_000)
    offer = hook.offers[0]
    assert "'scribbles'" in offer.text() and offer.isVisible()
    qtbot.mouseClick(button(offer, "Restore"), Qt.MouseButton.LeftButton)
    restored = viewer.layers["scribbles"]
    assert restored.data.dtype == np.int32 and np.array_equal(restored.data, painted)
    assert_aligned(restored, image)

    restored.paint((5, 5, 5), 4)  # correcting the restored layer updates the same entry
    expected = np.array(restored.data, copy=True)
    qtbot.waitUntil(lambda: np.array_equal(find_labels(entry.path.parent.name)[0].load(), expected), timeout=20_000)
    assert [e.path for e in find_labels(entry.path.parent.name)] == [entry.path]


def test_discard_forgets_them_and_another_image_is_not_offered_them(recovery_folder, ct_file, tmp_path, viewer, qtbot):
    from napari_ar3d.widgets.recovery import install
    from qtpy.QtCore import Qt

    paint_and_kill(ct_file, tmp_path / "painted.npy")
    (tmp_path / "other").mkdir()
    other = write_volume(tmp_path / "other" / "ct.nii.gz", np.zeros((64, 64, 32), np.float32), np.eye(4), kind="float")
    viewer.open(str(other), plugin="napari-ar3d")
    hook = install(viewer)
    viewer.open(str(ct_file), plugin="napari-ar3d")
    qtbot.waitUntil(lambda: len(hook.offers) == 1, timeout=20_000)
    qtbot.wait(1000)  # time for the other image's key too
    assert len(hook.offers) == 1  # only the painted image's
    qtbot.mouseClick(button(hook.offers[0], "Discard"), Qt.MouseButton.LeftButton)
    assert not any(recovery_folder.rglob("*.npz"))
