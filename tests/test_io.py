"""model_core.io.volume: geometry round trips, napari geometry, atomic writes and every kind of bad input."""

from __future__ import annotations

import gzip
import re
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from model_core.errors import Ar3dInputError
from model_core.io import volume as io
from model_core.io.volume import (
    MAX_LABEL,
    Volume,
    check_image,
    check_labels,
    from_napari,
    napari_affine,
    ras_affine,
    read_volume,
    to_napari,
    voxel_to_world,
    world_to_voxel,
    write_volume,
)

SHAPE = (6, 7, 8)  # distinct sizes so a swapped axis cannot pass


def _affine(linear: np.ndarray, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


AFFINES = {
    "RAS": _affine(np.eye(3)),
    "LPS": _affine(np.diag([-1.0, -1.0, 1.0])),
    "flipped_RPI": _affine(np.diag([1.0, -1.0, -1.0])),
    "permuted_ASL": _affine(np.array([[0, 0, -1.0], [1.0, 0, 0], [0, 1.0, 0]])),  # a sagittal acquisition
    "anisotropic": _affine(np.diag([0.5, 0.8, 3.0])),
    "origin": _affine(np.diag([-0.9, 1.1, 2.5]), (-120.5, 33.25, 71.0)),
    "oblique": _affine(_rotation(0.2, -0.35, 0.5) @ np.diag([0.7, 1.3, 2.1]), (-10.5, 20.25, 33.1)),
}
EXPECTED_CODES = {"RAS": "RAS", "LPS": "LPS", "flipped_RPI": "RPI", "permuted_ASL": "ASL"}


def _labels(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 6, shape).astype(np.int16)


def _lps_reversed(affine_ras: np.ndarray, ijk) -> np.ndarray:
    """napari world point of voxel ijk, computed the long way: RAS -> LPS -> (z, y, x)."""
    x, y, z = voxel_to_world(affine_ras, ijk)
    return np.array([z, -y, -x])


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("name", list(AFFINES))
def test_labels_round_trip_keeps_voxels_and_geometry(tmp_path: Path, name: str, ext: str) -> None:
    affine, labels = AFFINES[name], _labels()
    path = write_volume(tmp_path / f"seg{ext}", labels, affine, kind="labels")
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, labels)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.shape == SHAPE
    np.testing.assert_allclose(volume.spacing, np.linalg.norm(affine[:3, :3], axis=0), atol=1e-5)
    if name in EXPECTED_CODES:
        assert volume.orientation == EXPECTED_CODES[name]
    ijk = (1, 5, 6)
    np.testing.assert_allclose(voxel_to_world(volume.affine, ijk), voxel_to_world(affine, ijk), atol=1e-4)
    if ext != ".nii.gz":  # ITK's own view of the same file: value and LPS point of voxel ijk
        image = sitk.ReadImage(str(path))
        assert image.GetPixel(ijk) == labels[ijk]
        x, y, z = image.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(voxel_to_world(volume.affine, ijk), [-x, -y, z], atol=1e-4)
    else:  # nibabel's own view
        image = nib.load(path)
        np.testing.assert_allclose(nib.affines.apply_affine(image.affine, ijk), voxel_to_world(affine, ijk), atol=1e-4)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_float_round_trip_is_float32(tmp_path: Path, ext: str) -> None:
    values = np.random.default_rng(1).normal(size=SHAPE) * 100
    path = write_volume(tmp_path / f"map{ext}", values, AFFINES["oblique"], kind="float")
    volume = read_volume(path)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, values.astype(np.float32))
    np.testing.assert_allclose(volume.affine, AFFINES["oblique"], atol=1e-5)


@pytest.mark.parametrize(
    ("low", "high", "dtype"),
    [(0, 1, np.uint8), (0, 300, np.uint16), (0, 70000, np.uint32), (-1, 5, np.int8), (-200, 5, np.int16)],
)
def test_labels_use_smallest_integer_type(tmp_path: Path, low: int, high: int, dtype) -> None:
    labels = np.zeros(SHAPE, dtype=np.float64)
    labels[0, 0, 0], labels[1, 1, 1] = low, high  # whole-valued floats are accepted as labels
    for ext in (".nii.gz", ".nrrd"):
        volume = read_volume(write_volume(tmp_path / f"seg{ext}", labels, np.eye(4), kind="labels"))
        assert volume.array.dtype == dtype
        np.testing.assert_array_equal(volume.array, labels)


def test_nifti_keeps_header_codes_of_like(tmp_path: Path) -> None:
    source = nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINES["origin"])
    source.set_sform(AFFINES["origin"], code=4)  # MNI
    source.set_qform(AFFINES["origin"], code=2)  # aligned
    source.header.set_xyzt_units(xyz="micron")
    nib.save(source, tmp_path / "source.nii.gz")
    like = read_volume(tmp_path / "source.nii.gz")
    out = nib.load(write_volume(tmp_path / "seg.nii.gz", _labels(), like.affine, kind="labels", like=like))
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (4, 2)
    assert out.header.get_xyzt_units()[0] == "micron"
    plain = nib.load(write_volume(tmp_path / "plain.nii.gz", _labels(), like.affine, kind="labels"))
    assert int(plain.header["sform_code"]) > 0 and int(plain.header["qform_code"]) > 0
    np.testing.assert_allclose(plain.get_qform(), like.affine, atol=1e-5)


def test_mhd_writes_header_and_data_file(tmp_path: Path) -> None:
    write_volume(tmp_path / "seg.mhd", _labels(), AFFINES["LPS"], kind="labels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.mhd", "seg.zraw"]
    np.testing.assert_array_equal(read_volume(tmp_path / "seg.mhd").array, _labels())


# ---------------------------------------------------------------- napari geometry


@pytest.mark.parametrize("name", list(AFFINES))
def test_napari_affine_maps_voxels_to_lps_reversed(name: str) -> None:
    affine = AFFINES[name]
    matrix = napari_affine(affine)
    np.testing.assert_allclose(ras_affine(matrix), affine, atol=1e-12)
    for i, j, k in [(0, 0, 0), (1, 5, 6), (5, 6, 7)]:
        world = (matrix @ [k, j, i, 1.0])[:3]  # napari data index is (k, j, i)
        np.testing.assert_allclose(world, _lps_reversed(affine, (i, j, k)), atol=1e-9)


def test_to_napari_is_a_transposed_view_and_from_napari_inverts_it() -> None:
    volume = Volume(_labels(), AFFINES["oblique"])
    data, matrix = to_napari(volume)
    assert data.shape == SHAPE[::-1] and np.shares_memory(data, volume.array)
    assert data[7, 6, 5] == volume.array[5, 6, 7]
    array, affine = from_napari(data, matrix)
    np.testing.assert_array_equal(array, volume.array)
    np.testing.assert_allclose(affine, volume.affine, atol=1e-12)


def test_world_to_voxel_inverts_voxel_to_world() -> None:
    affine = AFFINES["oblique"]
    ijk = np.array([[0.0, 0.0, 0.0], [1.5, 2.0, 3.25], [5.0, 6.0, 7.0]])
    xyz = voxel_to_world(affine, ijk)
    np.testing.assert_allclose(xyz[1], affine[:3, :3] @ ijk[1] + affine[:3, 3])
    np.testing.assert_allclose(world_to_voxel(affine, xyz), ijk, atol=1e-9)
    np.testing.assert_allclose(world_to_voxel(affine, xyz[2]), ijk[2], atol=1e-9)


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize(("ext", "target"), [(".nii.gz", "nib.save"), (".nrrd", "sitk.WriteImage")])
def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch, ext: str, target: str) -> None:
    def half_write_then_fail(image, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    module, function = target.split(".")
    monkeypatch.setattr(nib if module == "nib" else io.simpleitk(), function, half_write_then_fail)
    with pytest.raises(Ar3dInputError, match="disk full"):
        write_volume(tmp_path / f"seg{ext}", _labels(), np.eye(4), kind="labels")
    assert list(tmp_path.iterdir()) == []

    (tmp_path / f"seg{ext}").write_bytes(b"previous")  # an existing file survives a failed overwrite
    with pytest.raises(Ar3dInputError):
        write_volume(tmp_path / f"seg{ext}", _labels(), np.eye(4), kind="labels")
    assert [p.name for p in tmp_path.iterdir()] == [f"seg{ext}"]
    assert (tmp_path / f"seg{ext}").read_bytes() == b"previous"


def test_successful_write_leaves_only_the_file(tmp_path: Path) -> None:
    (tmp_path / "seg.nii.gz").write_bytes(b"previous")
    write_volume(tmp_path / "seg.nii.gz", _labels(), np.eye(4), kind="labels")
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    np.testing.assert_array_equal(read_volume(tmp_path / "seg.nii.gz").array, _labels())


@pytest.mark.parametrize(
    ("array", "affine", "kind", "name", "problem"),
    [
        (np.full(SHAPE, 1.5), np.eye(4), "labels", "seg.nii.gz", "whole numbers"),
        (np.full(SHAPE, np.nan), np.eye(4), "labels", "seg.nii.gz", "whole numbers"),
        (np.zeros((6, 7)), np.eye(4), "labels", "seg.nii.gz", r"3D array.*\(6, 7\)"),
        (np.zeros(SHAPE), np.eye(4), "labels", "seg.png", "cannot write this file type"),
        (np.zeros(SHAPE), np.zeros((4, 4)), "float", "map.nii.gz", "invertible"),
        (np.zeros(SHAPE), np.eye(4), "mask", "seg.nii.gz", "kind"),
    ],
)
def test_write_refuses_bad_arguments(tmp_path: Path, array, affine, kind, name, problem) -> None:
    with pytest.raises(Ar3dInputError, match=problem) as error:
        write_volume(tmp_path / name, array, affine, kind=kind)
    assert str(error.value).startswith(str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input


def _nifti_bytes(array: np.ndarray) -> bytes:
    return nib.Nifti1Image(array, np.eye(4)).to_bytes()


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _four_d_nrrd(path: Path, frames: int) -> Path:
    series = [sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32)) for _ in range(frames)]
    sitk.WriteImage(sitk.JoinSeries(series), str(path))
    return path


def _truncated(path: Path, cut: int) -> Path:
    content = path.read_bytes()
    return _write(path, content[: len(content) - cut])


def _make_bad_file(tmp_path: Path, case: str) -> Path:
    """Each bad input, written fresh in tmp_path."""
    volume = np.random.default_rng(2).normal(size=(10, 11, 12)).astype(np.float32)
    if case == "truncated_gzip":
        return _truncated(_write(tmp_path / "a.nii.gz", gzip.compress(_nifti_bytes(volume))), 2000)
    if case == "nifti_data_shorter_than_header":
        return _truncated(_write(tmp_path / "a.nii", _nifti_bytes(volume)), 1000)
    if case == "nrrd_data_shorter_than_header":
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "a.nrrd"), False)
        return _truncated(tmp_path / "a.nrrd", 1000)
    if case == "mha_data_shorter_than_header":
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "a.mha"), False)
        return _truncated(tmp_path / "a.mha", 1000)
    if case == "wrong_magic":
        content = bytearray(_nifti_bytes(volume))
        content[344:348] = b"xyz\0"
        return _write(tmp_path / "a.nii", bytes(content))
    if case == "wrong_magic_nrrd":
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "a.nrrd"))
        return _write(tmp_path / "a.nrrd", (tmp_path / "a.nrrd").read_bytes().replace(b"NRRD", b"XXXX", 1))
    if case == "text_named_nii_gz":
        return _write(tmp_path / "a.nii.gz", b"patient notes, not an image\n" * 20)
    if case == "zero_size_dim":
        header = nib.Nifti1Header()
        header.set_data_shape((4, 0, 5))
        header.set_data_dtype(np.float32)
        header["vox_offset"] = 352
        return _write(tmp_path / "a.nii", header.binaryblock + bytes(4))
    if case == "2d_nifti":
        return _write(tmp_path / "a.nii.gz", gzip.compress(_nifti_bytes(volume[:, :, 0])))
    if case == "single_slice":
        return _write(tmp_path / "a.nii.gz", gzip.compress(_nifti_bytes(volume[:, :, :1])))
    if case == "2d_nrrd":
        sitk.WriteImage(sitk.GetImageFromArray(volume[0]), str(tmp_path / "a.nrrd"))
        return tmp_path / "a.nrrd"
    if case == "4d_nifti":
        return _write(tmp_path / "a.nii.gz", gzip.compress(_nifti_bytes(np.stack([volume, volume], axis=-1))))
    if case == "4d_nrrd":
        return _four_d_nrrd(tmp_path / "a.nrrd", frames=3)
    if case == "vector_nrrd":
        rgb = sitk.GetImageFromArray(np.ones((4, 5, 6, 3), np.float32), isVector=True)
        sitk.WriteImage(rgb, str(tmp_path / "a.nrrd"))
        return tmp_path / "a.nrrd"
    if case == "all_nan":
        return _write(tmp_path / "a.nii.gz", gzip.compress(_nifti_bytes(np.full_like(volume, np.nan))))
    if case == "missing":
        return tmp_path / "missing.nii.gz"
    if case == "unknown_extension":
        return _write(tmp_path / "a.png", b"\x89PNG")
    if case == "folder_without_dicom":
        (tmp_path / "notes").mkdir()
        _write(tmp_path / "notes" / "readme.txt", b"hello")
        return tmp_path / "notes"
    raise AssertionError(case)


BAD_INPUTS = {
    "truncated_gzip": "truncated",
    "nifti_data_shorter_than_header": r"truncated.*\(10, 11, 12\)",
    "nrrd_data_shorter_than_header": r"truncated.*\(12, 11, 10\)",
    "mha_data_shorter_than_header": r"truncated.*\(12, 11, 10\)",
    "wrong_magic": "not a NIfTI image",
    "wrong_magic_nrrd": "header could not be parsed",
    "text_named_nii_gz": "not gzip-compressed",
    "zero_size_dim": r"empty dimension.*\(4, 0, 5\)",
    "2d_nifti": r"2D with shape \(10, 11\)",
    "single_slice": r"2D with shape \(10, 11, 1\)",
    "2d_nrrd": r"2D with shape \(12, 11\)",
    "4d_nifti": r"4D with shape \(10, 11, 12, 2\)",
    "4d_nrrd": r"4D with shape \(6, 5, 4, 3\)",
    "vector_nrrd": "3 components per voxel",
    "all_nan": "NaN",
    "missing": "file not found",
    "unknown_extension": "unsupported file type",
    "folder_without_dicom": "no DICOM",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_file_and_problem(tmp_path: Path, case: str) -> None:
    path = _make_bad_file(tmp_path, case)
    with pytest.raises(Ar3dInputError, match=BAD_INPUTS[case]) as error:
        read_volume(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_huge_header_fails_fast_without_allocating(tmp_path: Path) -> None:
    header = nib.Nifti2Header()  # NIfTI-2: 64-bit dims
    header.set_data_shape((100_000, 100_000, 100_000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 544
    path = _write(tmp_path / "huge.nii.gz", gzip.compress(header.binaryblock + bytes(4 + 4096)))
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(Ar3dInputError, match=r"\(100000, 100000, 100000\).*more than the limit") as error:
        read_volume(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(error.value).startswith(str(path))
    assert elapsed < 1.0 and peak < 16 * 2**20


def test_voxel_limit_from_argument_and_environment(tmp_path: Path, monkeypatch) -> None:
    path = write_volume(tmp_path / "seg.nii.gz", _labels(), np.eye(4), kind="labels")  # 336 voxels
    assert read_volume(path, max_voxels=336).shape == SHAPE
    with pytest.raises(Ar3dInputError, match="336 voxels, more than the limit of 335"):
        read_volume(path, max_voxels=335)
    monkeypatch.setenv("AR3D_MAX_VOXELS", "100")
    with pytest.raises(Ar3dInputError, match="limit of 100"):
        read_volume(path)
    monkeypatch.setenv("AR3D_MAX_VOXELS", "lots")
    with pytest.raises(Ar3dInputError, match="AR3D_MAX_VOXELS"):
        read_volume(path)


def test_trailing_singleton_dim_is_squeezed(tmp_path: Path) -> None:
    volume = _labels().astype(np.float32)
    nib.save(nib.Nifti1Image(volume[..., None], AFFINES["origin"]), tmp_path / "a.nii.gz")
    read = read_volume(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(read.array, volume)
    np.testing.assert_allclose(read.affine, AFFINES["origin"], atol=1e-5)
    read = read_volume(_four_d_nrrd(tmp_path / "b.nrrd", frames=1))
    assert read.shape == (6, 5, 4)


def test_partly_nan_volume_is_read(tmp_path: Path) -> None:
    volume = np.ones(SHAPE, np.float32)
    volume[0, 0, :], volume[1, 1, 1] = np.nan, np.inf
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "a.nii.gz")
    read = read_volume(tmp_path / "a.nii.gz").array
    assert np.isnan(read).sum() == SHAPE[2] and np.isinf(read[1, 1, 1])


# ---------------------------------------------------------------- DICOM


def write_dicom_series(
    folder: Path, array_ijk: np.ndarray, spacing, origin, series_uid: str, description: str
) -> list[Path]:
    """Write one DICOM file per k-slice of an int16 array, with the given geometry and series tags."""
    image = sitk.GetImageFromArray(array_ijk.transpose(2, 1, 0))  # (k, j, i)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetDepth()):
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        files.append(folder / f"{description}_{k:03d}.dcm")
        write_ct_slice(writer, image[:, :, k], files[-1], series_uid, k + 1, description, position,
                       {"0018|0050": str(spacing[2])})
    return files


def write_ct_slice(writer, slice_, path: Path, series_uid: str, number: int, description: str, position,
                   extra_tags: dict[str, str] | None = None) -> None:
    """Write one axial CT slice with the series tags a DICOM reader groups and orders by."""
    tags = {
        "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT image storage
        "0008|0018": f"{series_uid}.{number}",
        "0008|0060": "CT",
        "0008|103e": description,
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
        "0020|000e": series_uid,
        "0020|0013": str(number),
        "0020|0032": "\\".join(f"{x:.6f}" for x in position),
        "0020|0037": "1\\0\\0\\0\\1\\0",
        **(extra_tags or {}),
    }
    for key, value in tags.items():
        slice_.SetMetaData(key, value)
    writer.SetFileName(str(path))
    writer.Execute(slice_)


SERIES_A, SERIES_B = "1.2.826.0.1.3680043.2.1125.10", "1.2.826.0.1.3680043.2.1125.11"


def test_dicom_series_reads_values_and_geometry(tmp_path: Path) -> None:
    ct = np.random.default_rng(3).integers(-1000, 1000, SHAPE).astype(np.int16)
    write_dicom_series(tmp_path, ct, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), SERIES_A, "axial")
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, ct)
    np.testing.assert_allclose(volume.affine, _affine(np.diag([-0.8, -0.9, 2.5]), (-10.0, 20.0, 30.0)), atol=1e-5)
    assert volume.meta["modality"] == "CT" and volume.meta["series_uid"] == SERIES_A
    assert volume.orientation == "LPS"


def test_dicom_folder_with_two_series_lists_them(tmp_path: Path) -> None:
    ct = np.random.default_rng(4).integers(-1000, 1000, SHAPE).astype(np.int16)
    write_dicom_series(tmp_path, ct, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), SERIES_A, "first")
    second = write_dicom_series(tmp_path, ct[:, :, :3] + 7, (0.8, 0.9, 2.5), (0.0, 0.0, 0.0), SERIES_B, "second")
    with pytest.raises(Ar3dInputError) as error:
        read_volume(tmp_path)
    message = str(error.value)
    assert message.startswith(str(tmp_path)) and "series_uid" in message and "\n" not in message
    assert f"{SERIES_A} ('first', 8 slices)" in message and f"{SERIES_B} ('second', 3 slices)" in message
    np.testing.assert_array_equal(read_volume(tmp_path, series_uid=SERIES_A).array, ct)
    np.testing.assert_array_equal(read_volume(tmp_path, series_uid=SERIES_B).array, ct[:, :, :3] + 7)
    np.testing.assert_array_equal(read_volume(second[1]).array, ct[:, :, :3] + 7)  # a file picks its series
    with pytest.raises(Ar3dInputError, match="no DICOM series with uid '1.2.3'"):
        read_volume(tmp_path, series_uid="1.2.3")


# ---------------------------------------------------------------- value checks


def test_check_labels_accepts_whole_numbers_and_names_bad_values() -> None:
    np.testing.assert_array_equal(check_labels(np.array([[[0.0, 2.0, 300.0]]])), [[[0, 2, 300]]])
    assert check_labels(np.array([[[0, 2]]], np.int64)).dtype == np.uint8
    assert check_labels(np.array([[[0, MAX_LABEL]]], np.int64)).dtype == np.uint16
    for array, problem in [
        (np.array([[[0, -4]]], np.int16), "negative label -4"),
        (np.array([[[0, MAX_LABEL + 1]]], np.int64), f"label {MAX_LABEL + 1}, above the largest supported label"),
        (np.array([[[0.0, 1.25, 2.5]]]), r"2 voxels with fractions \(e.g. 1.25\)"),
        (np.array([[[0.0, np.nan, np.inf]]]), "2 NaN or infinite voxels"),
        (np.array([[[1 + 1j]]]), "voxel type complex128"),
    ]:
        with pytest.raises(Ar3dInputError, match=problem) as error:
            check_labels(array, "seg.nii.gz")
        assert str(error.value).startswith("seg.nii.gz: ")


def test_check_image_counts_non_finite_voxels() -> None:
    check_image(np.zeros(SHAPE, np.int16))
    check_image(np.zeros(SHAPE, np.float32))
    volume = np.zeros(SHAPE, np.float32)
    volume[0, 0, :3], volume[1, 1, 1] = np.nan, -np.inf
    with pytest.raises(Ar3dInputError, match=f"3 NaN and 1 infinite voxels \\(of {volume.size}\\)"):
        check_image(volume, "ct.nii.gz")
    with pytest.raises(Ar3dInputError, match=r"shape \(6, 7\)"):
        check_image(np.zeros((6, 7), np.float32))


@pytest.mark.parametrize("problem", ["zero voxel size", "infinite origin", "degenerate axes"])
def test_header_geometry_must_be_finite_and_invertible(tmp_path: Path, problem: str) -> None:
    affine = np.eye(4)
    if problem == "zero voxel size":
        affine[2, 2] = 0.0
    elif problem == "infinite origin":
        affine[0, 3] = np.inf
    else:
        affine[:3, :3] = [[1, 0, 0], [0, 1, 1], [0, 0, 1e-9]]  # j and k point (almost) the same way
    content = bytearray(nib.Nifti1Image(_labels().astype(np.float32), np.eye(4)).to_bytes())
    content[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1: the srow rows hold the affine
    content[280:328] = affine[:3].astype("<f4").tobytes()
    path = tmp_path / "a.nii"
    path.write_bytes(bytes(content))
    with pytest.raises(Ar3dInputError, match="not a finite invertible transform") as error:
        read_volume(path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("ndims", ["-3", "0", "100", "99999999999", "x"])
def test_metaimage_with_impossible_ndims_is_refused_before_simpleitk(tmp_path: Path, ndims: str) -> None:
    """SimpleITK segfaults (or aborts) on a negative or huge NDims: the header is checked first."""
    path = write_volume(tmp_path / "a.mha", _labels(), np.eye(4), kind="labels")
    path.write_bytes(path.read_bytes().replace(b"NDims = 3", f"NDims = {ndims}".encode(), 1))
    with pytest.raises(Ar3dInputError, match=f"NDims = '{ndims}'; it must be 1 to 8"):
        read_volume(path)


def test_non_finite_itk_direction_is_refused_before_reading(tmp_path: Path) -> None:
    """SimpleITK's Execute hangs on a direction holding 1e308: the header geometry is checked first."""
    path = write_volume(tmp_path / "a.mha", _labels(), np.eye(4), kind="labels")
    content = re.sub(rb"TransformMatrix = [^\n]*", b"TransformMatrix = 1 0 0 1e308 1 0 0 0 1", path.read_bytes())
    path.write_bytes(content)
    with pytest.raises(Ar3dInputError, match="not a finite invertible transform"):
        read_volume(path)
