"""The napari reader and labels writer in a real viewer: voxels land on the right world points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import napari
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import napari_world_to_ras
from test_io import AFFINES, SERIES_A, write_dicom_series

from model_core.io.volume import read_volume, voxel_to_world, write_volume
from model_core.vocabulary import CT_SOFT_TISSUE_HU
from napari_ar3d._reader import contrast_limits, napari_get_reader
from napari_ar3d._writer import data_to_world

SHAPE = (9, 10, 11)
VOXELS = [(0, 0, 0), (2, 7, 4), (8, 9, 10)]  # (i, j, k)


def _ct(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1500, shape).astype(np.int16)


def _lps_reversed(affine_ras: np.ndarray, ijk) -> np.ndarray:
    """napari world point of voxel ijk: RAS -> LPS -> (z, y, x)."""
    x, y, z = voxel_to_world(affine_ras, ijk)
    return np.array([z, -y, -x])


@pytest.fixture
def scans(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """The same kind of CT written as every format: {format: (path, affine_ras)}."""
    ct = _ct()
    oblique = AFFINES["oblique"]
    out = {
        ext: (write_volume(tmp_path / f"scan{ext}", ct, oblique, kind="float"), oblique)
        for ext in (".nii.gz", ".nrrd", ".mha")
    }
    (tmp_path / "dicom").mkdir()
    write_dicom_series(tmp_path / "dicom", ct, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), SERIES_A, "ct")
    dicom_affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    dicom_affine[:3, 3] = (-10.0, 20.0, 30.0)
    out["dicom"] = (tmp_path / "dicom", dicom_affine)
    return out


@pytest.mark.parametrize("fmt", [".nii.gz", ".nrrd", ".mha", "dicom"])
def test_open_puts_voxels_at_lps_reversed_world(viewer, scans, fmt: str) -> None:
    path, affine = scans[fmt]
    ct = _ct()
    (layer,) = viewer.open(str(path), plugin="napari-ar3d")
    assert layer.name == ("scan" if fmt != "dicom" else "dicom")
    assert layer.data.shape == SHAPE[::-1]
    for i, j, k in VOXELS:
        assert layer.data[k, j, i] == ct[i, j, k]
        np.testing.assert_allclose(layer.data_to_world((k, j, i)), _lps_reversed(affine, (i, j, k)), atol=1e-4)
    geometry = layer.metadata["ar3d"]
    np.testing.assert_allclose(geometry["affine_ras"], affine, atol=1e-5)
    assert geometry["shape_ijk"] == list(SHAPE)
    assert tuple(layer.contrast_limits) == CT_SOFT_TISSUE_HU


def _paint(labels_layer) -> dict[tuple[int, int, int], int]:
    """Paint a few voxels (given as (i, j, k)) into a (k, j, i) labels layer."""
    painted = {(0, 0, 0): 1, (2, 7, 4): 2, (8, 9, 10): 3, (5, 1, 9): 4}
    for (i, j, k), value in painted.items():
        labels_layer.data[k, j, i] = value
    return painted


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("how", ["with_reader_metadata", "napari_new_labels"])
def test_saved_labels_land_on_source_world_points(viewer, scans, tmp_path: Path, how, ext) -> None:
    path, affine = scans[".nrrd"]
    (image,) = viewer.open(str(path), plugin="napari-ar3d")
    if how == "with_reader_metadata":
        labels = viewer.add_labels(
            np.zeros(image.data.shape, np.uint8),
            affine=image.affine,
            scale=image.scale,
            translate=image.translate,
            metadata=image.metadata,
        )
    else:
        viewer.layers.selection.active = image
        viewer._new_labels()  # napari's "new labels layer" button: copies transforms, not metadata
        labels = viewer.layers[-1]
        assert "ar3d" not in labels.metadata
    painted = _paint(labels)
    viewer.layers.selection.active = labels
    out = tmp_path / f"painted{ext}"
    viewer.layers.save(str(out), selected=True, plugin="napari-ar3d")

    saved = read_volume(out)
    assert saved.shape == SHAPE and saved.array.dtype.kind in "iu"
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert {tuple(ijk) for ijk in np.argwhere(saved.array > 0)} == set(painted)
    for ijk, value in painted.items():
        assert saved.array[ijk] == value
        i, j, k = ijk
        source_world = napari_world_to_ras(image.data_to_world((k, j, i)))
        np.testing.assert_allclose(voxel_to_world(saved.affine, ijk), source_world, atol=1e-4)


def test_writer_composes_transforms_like_napari(viewer, tmp_path: Path) -> None:
    outer = np.eye(4)
    outer[:3, :3] = AFFINES["oblique"][:3, :3]
    outer[:3, 3] = (5.0, -3.0, 2.0)
    labels = viewer.add_labels(
        np.zeros(SHAPE[::-1], np.uint8),
        scale=(2.0, 0.5, 1.5),
        translate=(10.0, -4.0, 7.0),
        rotate=[[1, 0, 0], [0, np.cos(0.4), -np.sin(0.4)], [0, np.sin(0.4), np.cos(0.4)]],
        shear=(0.1, -0.2, 0.3),
        affine=outer,
    )
    matrix = data_to_world(labels._get_state())
    np.testing.assert_allclose(matrix, labels._data_to_world.affine_matrix, atol=1e-12)
    painted = _paint(labels)
    out = tmp_path / "painted.nii.gz"
    viewer.layers.selection.active = labels
    viewer.layers.save(str(out), selected=True, plugin="napari-ar3d")
    saved = read_volume(out)
    for (i, j, k), value in painted.items():
        assert saved.array[i, j, k] == value
        napari_world = labels.data_to_world((k, j, i))
        expected = napari_world_to_ras(napari_world)
        np.testing.assert_allclose(voxel_to_world(saved.affine, (i, j, k)), expected, atol=1e-4)


def test_real_scan_with_flipped_axis_round_trips_through_napari(viewer, shared_data: Path, tmp_path: Path) -> None:
    image_path, seg_path = shared_data / "pyradiomics/brain2_image.nrrd", shared_data / "pyradiomics/brain2_label.nrrd"
    if not image_path.is_file():
        pytest.skip("pyradiomics case not in the shared data")
    seg = read_volume(seg_path)
    assert seg.orientation not in ("RAS", "LPS")  # a flipped axis: a reader ignoring it misplaces labels
    (image,) = viewer.open(str(image_path), plugin="napari-ar3d")
    viewer.layers.selection.active = image
    viewer._new_labels()
    labels = viewer.layers[-1]
    labels.data[:] = seg.array.transpose(2, 1, 0)
    viewer.layers.selection.active = labels
    out = tmp_path / "lesion.nii.gz"
    viewer.layers.save(str(out), selected=True, plugin="napari-ar3d")

    saved = read_volume(out)
    np.testing.assert_array_equal(saved.array, seg.array)
    np.testing.assert_allclose(saved.affine, seg.affine, atol=1e-5)
    itk_seg = sitk.ReadImage(str(seg_path))
    for ijk in np.argwhere(seg.array > 0)[:: max(1, int((seg.array > 0).sum()) // 5)]:
        i, j, k = (int(n) for n in ijk)
        x, y, z = itk_seg.TransformIndexToPhysicalPoint((i, j, k))  # ITK's own LPS point of the voxel
        np.testing.assert_allclose(labels.data_to_world((k, j, i)), [z, y, x], atol=1e-4)
        np.testing.assert_allclose(voxel_to_world(saved.affine, (i, j, k)), [-x, -y, z], atol=1e-4)


def test_get_reader_accepts_volumes_and_dicom_folders_only(scans, tmp_path: Path) -> None:
    for path, _ in scans.values():
        assert callable(napari_get_reader(str(path)))
    for file in (tmp_path / "dicom").iterdir():  # DICOM files without an extension: found by their preamble
        file.rename(file.with_suffix(""))
    assert callable(napari_get_reader(str(tmp_path / "dicom")))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    assert napari_get_reader(str(tmp_path / "photo.png")) is None
    assert napari_get_reader(str(tmp_path / "notes")) is None
    assert napari_get_reader([str(scans[".nrrd"][0]), str(tmp_path / "photo.png")]) is None
    both = [str(scans[".nrrd"][0]), str(scans[".mha"][0])]
    layers = napari_get_reader(both)(both)
    assert [kwargs["name"] for _, kwargs, kind in layers] == ["scan", "scan"] and layers[0][2] == "image"


def test_contrast_limits_ct_window_or_mri_percentiles() -> None:
    mri = np.random.default_rng(5).gamma(2.0, 100.0, (40, 41, 42)).astype(np.float32)
    np.testing.assert_allclose(contrast_limits(mri), np.percentile(mri, [0.5, 99.5]), rtol=1e-5)
    assert contrast_limits(_ct().astype(np.float32)) == CT_SOFT_TISSUE_HU  # values that look like HU
    assert contrast_limits(mri, modality="CT") == CT_SOFT_TISSUE_HU
    flat = np.full((4, 5, 6), 3.0, np.float32)
    low, high = contrast_limits(flat)
    assert low == 3.0 and high > low


def test_reader_and_writer_do_not_import_torch(scans, tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from napari_ar3d._reader import napari_get_reader\n"
        "from napari_ar3d._writer import write_labels\n"
        f"(data, kwargs, _), = napari_get_reader({str(scans['.nii.gz'][0])!r})({str(scans['.nii.gz'][0])!r})\n"
        f"write_labels({str(tmp_path / 'x.nii.gz')!r}, (data > 0).astype(np.uint8), {{'affine': kwargs['affine']}})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.nii.gz").is_file()


def test_label_map_opens_as_labels_layer(viewer, tmp_path: Path) -> None:
    """A seg file (here float-typed, as in some public data) opens as a labels layer on the image's grid."""
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    labels = np.zeros((12, 10, 6), np.float32)
    labels[2:5, 3:6, 1:3] = 2
    noise = np.random.default_rng(0).normal(size=labels.shape)
    image_path = write_volume(tmp_path / "scan.nii.gz", noise, affine, kind="float")
    seg_path = tmp_path / "scan_seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), str(seg_path))  # float32 on disk
    image, = viewer.open(str(image_path), plugin="napari-ar3d")
    seg, = viewer.open(str(seg_path), plugin="napari-ar3d")
    assert isinstance(seg, napari.layers.Labels) and not isinstance(image, napari.layers.Labels)
    np.testing.assert_array_equal(seg.data, labels.transpose(2, 1, 0).astype(np.int32))
    np.testing.assert_allclose(seg.affine.affine_matrix, image.affine.affine_matrix)
    assert "class" not in seg.features  # no names beside it


def test_label_map_gets_its_class_names_from_beside_it(viewer, tmp_path: Path) -> None:
    """`<name>.labels.json` (as `ar3d segment` writes it) wins over the folder's labels.json."""
    from model_core.io.volume import write_label_names

    labels = np.zeros((8, 8, 4), np.uint8)
    labels[1:3, 1:3, 1] = 1
    labels[4:6, 4:6, 2] = 3
    seg_path = write_volume(tmp_path / "ct_seg.nii.gz", labels, np.eye(4), kind="labels")
    (tmp_path / "labels.json").write_text('{"1": "from the folder"}')
    seg, = viewer.open(str(seg_path), plugin="napari-ar3d")
    assert list(seg.features["class"]) == ["background", "from the folder"]
    written = write_label_names(seg_path, {1: "liver", 3: "kidney_left"})
    assert written == tmp_path / "ct_seg.labels.json"
    seg, = viewer.open(str(seg_path), plugin="napari-ar3d")
    assert list(seg.features["index"]) == [0, 1, 3]
    assert list(seg.features["class"]) == ["background", "liver", "kidney_left"]


def test_contrast_limits_when_the_sampled_voxels_are_all_nan() -> None:
    """A big volume is sampled every few voxels; if only unsampled voxels are finite, they set the window."""
    array = np.full((400, 400, 24), np.nan, np.float32)  # 3.8 M voxels: sampled every 2nd voxel from 0
    array[1::2, 1::2, 1::2] = np.linspace(0.0, 100.0, 200 * 200 * 12).reshape(200, 200, 12)
    low, high = contrast_limits(array)
    assert 0.0 <= low < 1.0 and 99.0 < high <= 100.0
