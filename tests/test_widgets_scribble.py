"""The Scribble widget in a real viewer: a scribble layer on the image's grid, updates after a stroke (the slice
on screen first), results in place, Accept, and strokes that cannot train yet."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_aligned
from napari_ar3d.widgets._layers import aligned_kwargs, layer_volume, to_layer_data
from skimage.morphology import skeletonize


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny random encoder on a 4 mm grid (the widget phantom's voxels are about 6 mm)."""
    import torch

    from model_core.checkpoint.store import make_config, save_checkpoint
    from model_core.data.preprocess import IntensityConfig, PreprocessConfig
    from model_core.models.vit import ViT3D, ViT3DConfig

    torch.manual_seed(0)
    cfg = ViT3DConfig(patch_size=8, width=32, depth=2, heads=2)
    config = make_config(cfg.to_dict(), objective="ar", modality="CT",
                         preprocessing=PreprocessConfig((4.0,) * 3, IntensityConfig("ct")).to_dict())
    return save_checkpoint(tmp_path_factory.mktemp("enc") / "enc4mm", ViT3D(cfg).state_dict(), config)


@pytest.fixture
def widget(docked, encoder, monkeypatch, tmp_path):
    from napari_ar3d.widgets.scribble import ScribbleWidget

    import model_core.inference.scribble as scribble_module

    monkeypatch.setenv("AR3D_CACHE_DIR", str(tmp_path / "cache"))
    fast = scribble_module.ScribbleSettings(steps_first=80, steps_warm=10, points=1024, crop=32)
    monkeypatch.setattr(scribble_module, "ScribbleSettings", lambda: fast)
    w = docked(ScribbleWidget)
    w.picker.open_folder(encoder)
    return w


def strokes(liver_kji: np.ndarray) -> np.ndarray:
    """Layer data (k, j, i): the liver's skeleton (2) and the rest of 3 slices' non-liver tissue far from it (1)."""
    import scipy.ndimage as ndi

    out = np.zeros(liver_kji.shape, np.uint8)
    ks = np.nonzero(liver_kji.any(axis=(1, 2)))[0]
    for k in ks[[len(ks) // 4, len(ks) // 2, 3 * len(ks) // 4]]:
        far = ndi.distance_transform_edt(~liver_kji[k]) > 3
        ring = far & ndi.binary_dilation(~far)  # one voxel wide, 3-4 voxels out
        out[k][ring] = 1
        out[k][skeletonize(liver_kji[k])] = 2
    return out


def test_paint_then_the_result_follows_and_accept_copies_it(widget, encoder, add_ct, wait_idle, qtbot,
                                                            notifications):
    from model_core.inference.scribble import ScribbleSession

    viewer = widget.viewer
    image, phantom_labels = add_ct(viewer)
    before = np.array(phantom_labels.data)
    widget.image_combo.setCurrentText(image.name)
    widget.start()
    wait_idle(widget.panel)
    scribbles = viewer.layers["ct scribbles"]
    assert_aligned(scribbles, image)
    assert list(scribbles.features["class"][:3]) == ["unpainted", "background", "class 2"]
    assert scribbles.selected_label == 2 and scribbles.mode == "paint"

    with notifications() as seen:
        scribbles.data = strokes(np.asarray(phantom_labels.data) == 1) * (np.asarray(phantom_labels.data) == 1)
        widget.update_segmentation()  # only class 2: a notification, no job
    assert not widget.panel.busy and any("paint some background" in m for m in seen.errors)

    liver = np.asarray(phantom_labels.data) == 1
    scribbles.data = strokes(liver)
    k = int(np.nonzero(liver.any(axis=(1, 2)))[0].mean())
    viewer.dims.set_current_step(0, k)
    assert widget._visible_region() == (slice(None), slice(None), k)
    scribbles.paint((k, 0, 0), 1)  # a stroke: the update starts by itself shortly after
    qtbot.waitUntil(lambda: widget.panel.busy, timeout=5000)
    qtbot.waitUntil(lambda: "ct scribble result" in viewer.layers and not widget.panel.busy, timeout=120_000)
    wait_idle(widget.panel, 120)
    result = viewer.layers["ct scribble result"]
    assert_aligned(result, image)
    assert set(np.unique(result.data)) <= {0, 2}
    found = np.asarray(result.data) == 2
    painted = np.asarray(scribbles.data)
    # what the core computes from the same image and strokes (the same seed and settings)
    core = ScribbleSession(layer_volume(image), str(encoder)).update(layer_volume(scribbles), 1)
    assert (to_layer_data(core.labels) == np.asarray(result.data)).mean() > 0.999
    assert found[painted == 2].mean() > 0.5 > found[painted == 1].mean()  # the strokes are (mostly) learned
    assert "ct scribble uncertainty" in viewer.layers

    mine = viewer.add_labels(np.zeros(liver.shape, np.uint8), name="mine", **aligned_kwargs(image))
    widget.target_combo.setCurrentText("mine")
    widget.accept()
    assert np.array_equal(np.asarray(mine.data) == 2, found)
    assert np.array_equal(np.asarray(phantom_labels.data), before)  # the user's other layers are untouched


def test_start_without_an_image_is_a_notification(widget, notifications):
    with notifications() as seen:
        widget.start()
        widget.update_segmentation()
    assert not widget.panel.busy
    assert any("no image layer" in m for m in seen.errors) and any("press Start first" in m for m in seen.errors)
