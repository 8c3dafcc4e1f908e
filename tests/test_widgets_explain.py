"""The Explain widget in a real viewer: a click -> the attention map of that voxel, the whole-volume maps."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import assert_aligned


@pytest.fixture
def widget(docked, tiny_ar_checkpoint):
    from napari_ar3d.widgets.explain import ExplainWidget

    w = docked(ExplainWidget)
    w.picker.open_folder(tiny_ar_checkpoint)
    return w


@pytest.fixture(scope="module")
def core(tiny_ar_checkpoint, ct_phantom):
    """The model and the phantom volume, from the checkpoint and the phantom's own geometry."""
    from model_core.inference.explain import load_explain_model
    from model_core.io.volume import Volume

    phantom = ct_phantom(0)
    return load_explain_model(tiny_ar_checkpoint, "cpu"), Volume(phantom.images["ct"], phantom.affine)


def _click(widget, image, ijk) -> None:
    """A left click (press, release, no drag) on the world position of voxel `ijk`, through the mouse callback."""
    world = image.data_to_world(np.array(ijk[::-1], dtype=float))
    event = SimpleNamespace(type="mouse_press", button=1, modifiers=(), position=tuple(world))
    callback = widget._on_mouse(widget.viewer, event)
    next(callback)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(callback)


def test_a_click_shows_the_attention_of_that_voxel_aligned_with_the_image(widget, core, add_ct, wait_idle):
    from model_core.inference.explain import attention_map

    viewer = widget.viewer
    image, _ = add_ct(viewer)
    viewer.window.show()  # the callback answers only while the widget is visible
    query = (30, 25, 14)
    _click(widget, image, query)
    wait_idle(widget.panel)
    points = viewer.layers["ct query"]
    for name in ("scale", "translate"):
        assert np.allclose(getattr(points, name), getattr(image, name))
    assert np.allclose(points.affine.affine_matrix, image.affine.affine_matrix)
    assert np.array_equal(points.data, [query[::-1]])
    attention = viewer.layers["ct attention"]
    assert_aligned(attention, image)
    assert attention.colormap.name == "inferno" and attention.blending == "additive"
    expected = attention_map(*core, query).transpose(2, 1, 0)
    assert np.allclose(attention.data, expected, atol=1e-6)
    low, high = attention.contrast_limits
    assert 0.0 < low < high <= float(expected.max()) + 1e-9
    assert viewer.layers.selection.active is image  # the next click lands on the image again


def test_a_second_query_updates_the_layer_in_place_and_reuses_the_grid(widget, core, monkeypatch, add_ct,
                                                                       wait_idle):
    import model_core.inference.explain
    from model_core.inference.explain import attention_map

    calls = []
    real_prepare = model_core.inference.explain.prepare
    monkeypatch.setattr(model_core.inference.explain, "prepare", lambda *a: calls.append(1) or real_prepare(*a))
    viewer = widget.viewer
    image, _ = add_ct(viewer)
    widget.attention((30, 25, 14))
    wait_idle(widget.panel)
    layer = viewer.layers["ct attention"]
    first = np.array(layer.data)
    points = widget.query_layer(image)
    points.data = np.array([[10.0, 40.0, 20.0]])  # moving the query point (k, j, i) asks again
    wait_idle(widget.panel)
    assert len(calls) == 1  # the prepared grid was cached
    assert viewer.layers["ct attention"] is layer
    assert not np.allclose(layer.data, first)
    assert np.allclose(layer.data, attention_map(*core, (20, 40, 10)).transpose(2, 1, 0), atol=1e-6)


@pytest.mark.parametrize("button", ["Next-token prediction", "Surprise map", "PCA features"])
def test_whole_volume_maps_are_aligned_and_updated_in_place(widget, core, button, add_ct, wait_idle):
    from napari_ar3d.widgets.explain import MAPS

    from model_core.inference import explain

    viewer = widget.viewer
    image, _ = add_ct(viewer)
    widget.map_buttons[button].click()
    wait_idle(widget.panel)
    suffix, function = MAPS[button]
    layer = viewer.layers[f"ct {suffix}"]
    assert_aligned(layer, image)
    expected = getattr(explain, function)(*core)
    assert np.allclose(layer.data, np.moveaxis(expected, (0, 1, 2), (2, 1, 0)), atol=1e-5)
    if suffix == "PCA":
        assert layer.rgb and layer.data.shape == (*image.data.shape, 3)
    n_layers = len(viewer.layers)
    widget.map_buttons[button].click()
    wait_idle(widget.panel)
    assert viewer.layers[f"ct {suffix}"] is layer and len(viewer.layers) == n_layers


def test_no_image_layer_and_a_model_without_next_token_head_are_notifications(widget, add_ct, notifications,
                                                                              tiny_segmenter):
    viewer = widget.viewer
    with notifications() as seen:
        widget.compute_map("Surprise map")
    assert any("no image layer" in m for m in seen.errors)
    add_ct(viewer)
    widget.picker.open_folder(tiny_segmenter)
    names = [layer.name for layer in viewer.layers]
    with notifications() as seen:
        widget.attention((5, 5, 5))
        widget.compute_map("PCA features")
    assert sum("no next-token head" in m for m in seen.errors) == 2
    assert not widget.panel.busy
    assert [layer.name for layer in viewer.layers] == names


def test_a_click_outside_the_volume_is_a_notification(widget, add_ct, notifications):
    viewer = widget.viewer
    image, _ = add_ct(viewer)
    outside = image.data_to_world(np.array([-5.0, 10.0, 10.0]))
    with notifications() as seen:
        widget.click(tuple(outside))
    assert any("outside image 'ct'" in m for m in seen.errors)
    assert "ct query" not in viewer.layers and not widget.panel.busy
