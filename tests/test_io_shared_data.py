"""model_core.io.volume on the real scans in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_data_dir

from model_core.io.volume import (
    Volume,
    read_volume,
    voxel_to_world,
    world_to_voxel,
    write_volume,
)


def _case_ids() -> list[str]:
    folder = shared_data_dir()
    return [c["id"] for c in json.loads((folder / "manifest.json").read_text())["cases"]] if folder else []


def _case(manifest: list[dict], case_id: str) -> dict:
    return next(c for c in manifest if c["id"] == case_id)


def _labels(volume: Volume) -> np.ndarray:
    """Label maps may be stored as float: they must hold whole numbers."""
    array = volume.array
    if array.dtype.kind == "f":
        assert np.array_equal(array, np.round(array)), f"{volume.path}: labels with fractions"
    return array.astype(np.int32)


@pytest.mark.parametrize("case_id", _case_ids())
def test_case_image_and_seg_share_geometry_and_round_trip(
    shared_data: Path, manifest: list[dict], case_id: str, tmp_path: Path, record_property
) -> None:
    case = _case(manifest, case_id)
    start = time.perf_counter()
    image = read_volume(shared_data / case["image"])
    record_property("image_read_s", round(time.perf_counter() - start, 3))
    assert image.array.ndim == 3 and np.isfinite(image.spacing).all() and (image.spacing > 0).all()
    if case.get("seg") is None:  # no labels: round-trip the image as a float map instead
        out = read_volume(write_volume(tmp_path / "image.nrrd", image.array, image.affine, kind="float"))
        np.testing.assert_array_equal(out.array, image.array.astype(np.float32))
        np.testing.assert_allclose(out.affine, image.affine, atol=1e-5)
        return

    seg = read_volume(shared_data / case["seg"])
    labels = _labels(seg)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    assert labels.max() > 0, "the segmentation is empty"

    centre = voxel_to_world(image.affine, (np.array(image.shape) - 1) / 2)  # RAS mm of the image centre
    np.testing.assert_allclose(world_to_voxel(seg.affine, centre), (np.array(seg.shape) - 1) / 2, atol=1e-3)

    for ext in (".nii.gz", ".nrrd"):
        out = read_volume(write_volume(tmp_path / f"seg{ext}", labels, seg.affine, kind="labels", like=seg))
        np.testing.assert_array_equal(out.array, labels)
        np.testing.assert_allclose(out.affine, seg.affine, atol=1e-5)
        assert out.orientation == image.orientation
        # the voxel of a labelled point is the same in the written file and in the image
        ijk = np.argwhere(labels > 0)[0]
        world = voxel_to_world(out.affine, ijk)
        np.testing.assert_allclose(world_to_voxel(image.affine, world), ijk, atol=1e-3)


@pytest.mark.parametrize("folder", ["totalseg/ct_dicom", "dcmqi_ct3slice"])
def test_dicom_series_matches_its_nifti_conversion(shared_data: Path, folder: str) -> None:
    dicom = read_volume(shared_data / folder / "dicom")
    nifti = read_volume(shared_data / folder / "image.nii.gz")
    assert dicom.meta["modality"] == "CT"
    assert dicom.shape == nifti.shape and dicom.orientation == nifti.orientation
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-3)
    np.testing.assert_array_equal(dicom.array, nifti.array)  # rescaled HU, same slice order


def test_largest_case_read_time(shared_data: Path, manifest: list[dict], record_property) -> None:
    """Reads the largest NIfTI image (by voxels); the time is recorded, not asserted (machines differ)."""
    nifti = [c for c in manifest if c["image"].endswith(".nii.gz") and (shared_data / c["image"]).is_file()]
    largest = max(nifti, key=lambda c: np.prod(nib.load(shared_data / c["image"]).shape))
    start = time.perf_counter()
    volume = read_volume(shared_data / largest["image"])
    elapsed = time.perf_counter() - start
    record_property("largest_case", largest["id"])
    record_property("read_s", round(elapsed, 3))
    print(f"\nread {largest['id']} {volume.shape} {volume.array.dtype} in {elapsed:.3f} s")
    assert volume.shape == nib.load(shared_data / largest["image"]).shape
