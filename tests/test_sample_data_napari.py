"""The sample-data commands in a real napari viewer (run under xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_aligned, napari_world_to_ras

from model_core.data.phantoms import make_brain_mri, make_ct_abdomen

napari = pytest.importorskip("napari")


def class_of(labels_layer, value: int) -> str:
    features = labels_layer.features
    return features.loc[features["index"] == value, "class"].item()


def test_ct_abdomen_sample(viewer):
    viewer.open_sample("napari-ar3d", "ct_abdomen")
    assert [layer.name for layer in viewer.layers] == ["ct_abdomen", "ct_abdomen labels"]
    image, labels = viewer.layers
    assert isinstance(image, napari.layers.Image) and isinstance(labels, napari.layers.Labels)
    assert_aligned(labels, image)
    assert tuple(image.contrast_limits) == (-160.0, 240.0)

    phantom = make_ct_abdomen(seed=0)
    assert np.array_equal(image.data, phantom.images["ct"].transpose(2, 1, 0))  # (k, j, i)
    assert np.array_equal(labels.data, phantom.labels.transpose(2, 1, 0))
    geometry = labels.metadata["ar3d"]
    np.testing.assert_allclose(geometry["affine_ras"], phantom.affine)
    assert geometry["shape_ijk"] == list(phantom.shape) and geometry["orientation"] == "LPS"
    assert geometry["modality"] == "CT" and geometry["class_names"][1] == "liver"
    assert image.metadata["ar3d"]["spacing"] == pytest.approx(phantom.spacing)

    assert class_of(labels, 1) == "liver" and class_of(labels, 6) == "vertebrae"
    np.testing.assert_allclose(labels.colormap.map(np.array([1]))[0], phantom.colors[1], atol=1e-6)
    assert labels.colormap.map(np.array([0]))[0][3] == 0.0  # background transparent

    liver_kji = np.argwhere(labels.data == 1)
    every = max(1, len(liver_kji) // 200)
    ras = np.array([napari_world_to_ras(labels.data_to_world(v)) for v in liver_kji[::every]])
    assert np.median(ras[:, 0]) > 0  # the liver is on the patient's right: +x in RAS
    i, j, k = liver_kji[0][::-1]
    np.testing.assert_allclose(ras[0], phantom.affine[:3, :3] @ [i, j, k] + phantom.affine[:3, 3], atol=1e-6)
    spleen_kji = np.argwhere(labels.data == 2)
    assert napari_world_to_ras(labels.data_to_world(spleen_kji[len(spleen_kji) // 2]))[0] < 0


def test_brain_mri_sample(viewer):
    viewer.open_sample("napari-ar3d", "brain_mri")
    names = [layer.name for layer in viewer.layers]
    assert names == ["brain_mri t1n", "brain_mri t1c", "brain_mri t2w", "brain_mri t2f", "brain_mri labels"]
    *images, labels = viewer.layers
    assert [layer.visible for layer in images] == [False, True, False, False]
    for image in images:
        assert isinstance(image, napari.layers.Image)
        assert_aligned(labels, image)
        assert image.contrast_limits[1] > image.contrast_limits[0]
    assert isinstance(labels, napari.layers.Labels)

    phantom = make_brain_mri(seed=0)
    assert np.array_equal(labels.data, phantom.labels.transpose(2, 1, 0))
    assert labels.metadata["ar3d"]["orientation"] == "RAS" and labels.metadata["ar3d"]["modality"] == "MRI"
    assert [class_of(labels, v) for v in (1, 4, 5, 6)] == ["csf", "edema", "enhancing_tumor", "necrosis"]

    # The tumour shows in the same hemisphere in napari's world as in the phantom's RAS geometry.
    tumour_kji = np.argwhere(labels.data == 5)
    napari_x_ras = napari_world_to_ras(labels.data_to_world(tumour_kji.mean(0)))[0]
    i_mean = np.argwhere(phantom.labels == 5)[:, 0].mean()
    assert napari_x_ras == pytest.approx(phantom.affine[0, 0] * i_mean + phantom.affine[0, 3], abs=1e-6)
    assert abs(napari_x_ras) > 10.0
