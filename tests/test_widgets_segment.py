"""The Segment widget in a real viewer: aligned output layers, in-place re-runs, errors, GPU fallback."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from conftest import assert_aligned


@pytest.fixture
def widget(docked, tiny_segmenter):
    from napari_ar3d.widgets.segment import SegmentWidget

    w = docked(SegmentWidget)
    w.picker.open_folder(tiny_segmenter)
    return w


@pytest.fixture(scope="module")
def expected_labels(tiny_segmenter, ct_phantom) -> Callable[[int], np.ndarray]:
    """expected_labels(seed=0) -> the core's segmentation (I, J, K) of phantom `seed`'s CT on phantom 0's geometry.

    Computed from the phantom itself, not from a napari layer; once per seed (read-only).
    """
    from model_core.inference.segment import load_segmenter, segment
    from model_core.io.volume import Volume

    segmenter = load_segmenter(tiny_segmenter)
    made: dict[int, np.ndarray] = {}

    def labels(seed: int = 0) -> np.ndarray:
        if seed not in made:
            volume = Volume(ct_phantom(seed).images["ct"], ct_phantom(0).affine)
            made[seed] = segment(segmenter, volume, device="cpu", sw_batch_size=1).labels
            made[seed].flags.writeable = False
        return made[seed]

    return labels


def test_segment_adds_aligned_layers_with_class_names(widget, add_ct, wait_idle, expected_labels):
    viewer = widget.viewer
    image, _ = add_ct(viewer)
    widget.image_combo.setCurrentText(image.name)
    widget.uncertainty_check.setChecked(True)
    widget.probability_check.setChecked(True)
    widget.probability_combo.setCurrentText("liver")
    widget.run()
    assert widget.panel.busy and not widget.run_button.isEnabled()
    wait_idle(widget.panel)
    labels = viewer.layers["ct segmentation"]
    assert type(labels).__name__ == "Labels"
    assert_aligned(labels, image)
    assert {k: v for k, v in labels.metadata.items() if k != "algorithm"} == image.metadata
    assert labels.metadata["algorithm"]["name"] == "tiny-seg"  # what a DICOM-SEG of the labels names
    assert list(labels.features["class"]) == ["background", "liver", "spleen"]
    assert np.array_equal(np.asarray(labels.data), expected_labels().transpose(2, 1, 0))
    assert np.allclose(labels.colormap.map(1)[:3], (0.69, 0.31, 0.22))  # the liver's colour
    for name in ("ct probability", "ct uncertainty"):
        layer = viewer.layers[name]
        assert_aligned(layer, image)
        assert layer.blending == "additive"
        assert 0.0 <= float(np.min(layer.data)) and float(np.max(layer.data)) <= 1.0 + 1e-6
    assert viewer.layers["ct probability"].metadata["probability_of"] == "liver"
    assert widget.run_button.isEnabled()


def test_a_layer_with_napari_scale_and_translate_gives_the_same_segmentation(widget, add_ct, wait_idle,
                                                                             expected_labels):
    """An image layer without an affine (napari's own scale / translate) is read through the same transform."""
    viewer = widget.viewer
    image, _ = add_ct(viewer)
    matrix = image.affine.affine_matrix
    assert np.count_nonzero(matrix[:3, :3] - np.diag(np.diag(matrix[:3, :3]))) == 0  # axis-aligned phantom
    plain = viewer.add_image(np.asarray(image.data), name="plain", scale=np.diag(matrix)[:3],
                             translate=matrix[:3, 3])
    widget.image_combo.setCurrentText("plain")
    widget.run()
    wait_idle(widget.panel)
    result = viewer.layers["plain segmentation"]
    assert_aligned(result, plain)
    assert np.array_equal(np.asarray(result.data), expected_labels().transpose(2, 1, 0))


def test_a_rerun_updates_the_layers_in_place(widget, add_ct, wait_idle, ct_phantom, expected_labels):
    viewer = widget.viewer
    image, _ = add_ct(viewer)
    widget.uncertainty_check.setChecked(True)
    widget.run()
    wait_idle(widget.panel)
    labels, uncertainty = viewer.layers["ct segmentation"], viewer.layers["ct uncertainty"]
    n_layers = len(viewer.layers)
    labels.opacity, uncertainty.colormap = 0.25, "viridis"  # the user's display choices
    image.data = ct_phantom(1).images["ct"].transpose(2, 1, 0)  # another scan, shown on the first one's grid
    widget.run()
    wait_idle(widget.panel)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["ct segmentation"] is labels and viewer.layers["ct uncertainty"] is uncertainty
    assert np.array_equal(np.asarray(labels.data), expected_labels(1).transpose(2, 1, 0))
    assert not np.array_equal(expected_labels(0), expected_labels(1))
    assert labels.opacity == 0.25 and uncertainty.colormap.name == "viridis"
    assert list(labels.features["class"]) == ["background", "liver", "spleen"]


def test_no_image_layer_is_a_notification(widget, notifications):
    with notifications() as seen:
        widget.run()
    assert not widget.panel.busy
    assert any("no image layer" in m and "File > Open" in m for m in seen.errors)
    assert len(widget.viewer.layers) == 0


def test_an_encoder_without_decoder_is_a_notification(widget, add_ct, notifications, tiny_ar_checkpoint):
    add_ct(widget.viewer)
    widget.picker.open_folder(tiny_ar_checkpoint)
    names = [layer.name for layer in widget.viewer.layers]
    with notifications() as seen:
        widget.run()
    assert not widget.panel.busy
    assert any("without a segmentation decoder" in m and "Fine-tune" in m for m in seen.errors)
    assert [layer.name for layer in widget.viewer.layers] == names


def test_a_checkpoint_whose_weights_cannot_be_loaded_is_a_notification(widget, tmp_path, add_ct, wait_idle,
                                                                       notifications, tiny_segmenter):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_segmenter, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # config.json fine, weights corrupt
    add_ct(widget.viewer)
    widget.picker.open_folder(broken)
    names = [layer.name for layer in widget.viewer.layers]
    with notifications() as seen:
        widget.run()
        wait_idle(widget.panel)
    assert any("model.safetensors" in m and "not a safetensors file" in m for m in seen.errors), seen
    assert [layer.name for layer in widget.viewer.layers] == names
    assert "failed" in widget.panel.status.text()


def test_gpu_out_of_memory_falls_back_to_the_cpu(widget, monkeypatch, add_ct, wait_idle, notifications):
    import torch

    import model_core.device
    import model_core.inference.segment

    real_segment = model_core.inference.segment.segment
    devices = []

    def segment(segmenter, volume, *, device, **kwargs):
        devices.append(device.type)
        if device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_segment(segmenter, volume, device=device, **kwargs)

    monkeypatch.setattr(model_core.device, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(model_core.inference.segment, "segment", segment)
    add_ct(widget.viewer)
    with notifications() as seen:
        widget.run()
        wait_idle(widget.panel)
    assert devices == ["cuda", "cpu"]
    assert any("ran out of memory" in m and "CPU" in m for m in seen.warnings), seen
    assert "ct segmentation" in widget.viewer.layers


def test_out_of_memory_on_the_cpu_says_what_to_do_and_changes_nothing(widget, monkeypatch, add_ct, wait_idle,
                                                                       notifications):
    import torch

    import model_core.inference.segment

    def segment(*args, **kwargs):
        raise torch.OutOfMemoryError("CPU out of memory")

    monkeypatch.setattr(model_core.inference.segment, "segment", segment)
    add_ct(widget.viewer)
    names = [layer.name for layer in widget.viewer.layers]
    with notifications() as seen:
        widget.run()
        wait_idle(widget.panel)
    assert any("Out of memory" in m and "crop the volume" in m for m in seen.errors), seen
    assert [layer.name for layer in widget.viewer.layers] == names


def test_a_warning_from_the_core_becomes_a_notification(widget, wait_idle, notifications):
    from model_core.data.phantoms import make_brain_mri

    mri = make_brain_mri(0, shape=(48, 56, 48))
    widget.viewer.add_image(mri.images["t1c"].transpose(2, 1, 0), name="brain")
    with notifications() as seen:
        widget.run()
        wait_idle(widget.panel)
    assert any("looks like MRI but the model was trained on CT" in m for m in seen.warnings), seen
    assert "brain segmentation" in widget.viewer.layers  # a warning, not an error
