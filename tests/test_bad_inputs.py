"""A corpus of bad inputs, written by the tests, fed through every entry point that reads a volume.

Entry points: `model_core.io.volume.read_volume`, the napari reader (`read_layers`, and `viewer.open`
in a real viewer), `ar3d segment`, `ar3d finetune` (the input as the image, and as the
segmentation where that makes sense), `ar3d explain` and `ar3d evaluate` (segmentations only).
Each bad input must give one line "<path>: <problem>" (exit code 2 and nothing else but progress
bars on stderr for the CLI) and leave no output behind. The policy (docs/architecture.md,
"Errors"): NaN / infinite voxels open in napari and read_volume but are refused by every model
entry point; label values must be whole numbers in 0..65535 where a file is used as labels.
"""

from __future__ import annotations

import gzip
import locale
import re
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from test_explain import tiny_objective
from test_infer import save_segmenter
from test_io import write_ct_slice

from model_core.checkpoint.store import make_config, save_checkpoint
from model_core.cli import main
from model_core.data.phantoms import make_ct_abdomen
from model_core.data.preprocess import PreprocessConfig
from model_core.errors import Ar3dInputError
from model_core.io.volume import MAX_LABEL, read_volume, write_volume
from napari_ar3d._reader import napari_get_reader

SHAPE = (32, 32, 16)
TINY = ["--config", "tiny", "--set", "patch_size=8", "--set", "width=48", "--set", "depth=4", "--set", "heads=2"]
QUICK = ["--steps", "2", "--crops", "1", "--window", "32", "--spacing", "8", "--device", "cpu"]
UID_A, UID_B = "1.2.826.0.1.3680043.2.1125.20", "1.2.826.0.1.3680043.2.1125.21"


@dataclass(frozen=True)
class Case:
    kind: str  # "file", "shape", "image values", "label values" or "dicom"
    problem: str  # regex of the error when the input is read (or used as an image)
    as_labels: str | None = None  # regex of the error when used as a segmentation (default: `problem`)


CASES = {
    "truncated_gzip": Case("file", "compressed data is truncated or corrupt"),
    "wrong_magic": Case("file", "not a NIfTI image"),
    "dims_exceed_data": Case("file", r"file is truncated: header declares shape \(32, 32, 24\)"),
    "dims_exceed_data_gz": Case("file", "truncated"),
    "zero_size_dim": Case("file", r"empty dimension, shape \(32, 0, 16\)"),
    "text_named_nii_gz": Case("file", "not gzip-compressed"),
    "gzipped_text_named_nii_gz": Case("file", "not a NIfTI image"),
    "enormous_header": Case("file", r"1,000,000,000,000,000 voxels, more than the limit of .* \(raise it with AR3D_MAX_VOXELS\)"),
    "truncated_mha": Case("file", r"voxel data could not be read \(file truncated or corrupt; header declares shape \(32, 32, 16\)\)"),
    "unknown_type_nrrd": Case("file", r"not a readable NRRD / MetaImage file"),
    "image_2d": Case("shape", r"2D with shape \(32, 32\)"),
    "image_4d": Case("shape", r"4D with shape \(32, 32, 16, 3\)"),
    "image_5d": Case("shape", r"5D with shape \(32, 32, 16, 2, 3\)"),
    "nan_voxels": Case("image values", r"7 NaN and 0 infinite voxels", as_labels="7 NaN or infinite voxels"),
    "inf_voxels": Case("image values", r"0 NaN and 5 infinite voxels", as_labels="5 NaN or infinite voxels"),
    "huge_int64_labels": Case("label values", "", as_labels=rf"label 1099511627776, above the largest supported label {MAX_LABEL}"),
    "negative_labels": Case("label values", "", as_labels="negative label -1"),
    "fractional_labels": Case("label values", "", as_labels=r"12 voxels with fractions \(e.g. 0.5\)"),
    "dicom_missing_slice": Case("dicom", r"slice spacing is not uniform: 5 mm .* 2.5 mm elsewhere \(missing slices\?\)"),
    "dicom_two_series": Case("dicom", rf"holds 2 DICOM series, pass series_uid= one of: {UID_A}"),
    "dicom_mixed_slice_sizes": Case("dicom", r"slices differ in size"),
    "dicom_uneven_spacing": Case("dicom", r"slice spacing is not uniform"),
    "dicom_mixed_pixel_spacing": Case("dicom", r"slices differ in pixel spacing"),
}


# ----------------------------------------------------------------------------- the corpus


def _nifti(array: np.ndarray, affine: np.ndarray) -> bytes:
    return nib.Nifti1Image(array, affine, dtype=array.dtype).to_bytes()


def _gz(array: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(_nifti(array, affine))


def _set_dim(content: bytes, axis: int, size: int) -> bytes:
    """NIfTI-1 bytes with dim[axis + 1] (int16 at byte 40 + 2 * (axis + 1)) changed to `size`."""
    out = bytearray(content)
    out[42 + 2 * axis: 44 + 2 * axis] = np.int16(size).tobytes()
    return bytes(out)


def _dicom_series(folder: Path, volume: np.ndarray, uid: str, name: str, *, z=None, pixel=None, crop=None) -> list[Path]:
    """One DICOM file per k-slice of int16 `volume` (i, j, k): slice k at z[k] mm with pixel spacing pixel[k].

    `crop`: the index of a slice written 4 columns narrower. GDCM's writer sets the process's LC_CTYPE
    to "C" (later subprocess output would decode as ASCII), so the locale is put back afterwards.
    """
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        return _write_dicom_slices(folder, volume, uid, name, z, pixel, crop)
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def _write_dicom_slices(folder: Path, volume: np.ndarray, uid: str, name: str, z, pixel, crop) -> list[Path]:
    depth = volume.shape[2]
    z = [2.5 * k for k in range(depth)] if z is None else z
    pixel = [(1.5, 1.5)] * depth if pixel is None else pixel
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(depth):
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume[:, :, k].T))  # (j, i)
        if k == crop:
            image = image[:-4, :]
        image.SetSpacing(pixel[k])
        files.append(folder / f"{name}_{k:03d}.dcm")
        write_ct_slice(writer, image, files[-1], uid, k + 1, name, (0.0, 0.0, z[k]))
    return files


def make_corpus(root: Path) -> dict[str, Path]:
    """Every case of `CASES`, plus a good "image" and its "seg", on one grid. Nothing is committed."""
    ph = make_ct_abdomen(0, shape=SHAPE, spacing=(12.0, 12.0, 14.0))
    image, labels, affine = ph.images["ct"].astype(np.float32), ph.labels, ph.affine
    files = {
        "image": write_volume(root / "image.nii.gz", image, affine, kind="float"),
        "seg": write_volume(root / "seg.nii.gz", labels, affine, kind="labels"),
    }

    def put(name: str, content: bytes) -> None:
        files[name] = root / name
        files[name].write_bytes(content)

    raw = _nifti(image, affine)
    put("truncated_gzip.nii.gz", (gz := gzip.compress(raw))[: len(gz) // 2])
    wrong = bytearray(raw)
    wrong[344:348] = b"xyz\0"
    put("wrong_magic.nii", bytes(wrong))
    put("dims_exceed_data.nii", _set_dim(raw, 2, 24))
    put("dims_exceed_data_gz.nii.gz", gzip.compress(_set_dim(raw, 2, 24)))
    put("zero_size_dim.nii", _set_dim(raw, 1, 0))
    put("text_named_nii_gz.nii.gz", b"patient notes, not an image\n" * 40)
    put("gzipped_text_named_nii_gz.nii.gz", gzip.compress(b"id,value\n1,2\n" * 100))
    mha = write_volume(root / "mha.mha", image, affine, kind="float").read_bytes()
    (root / "mha.mha").unlink()
    put("truncated_mha.mha", mha[:-1000])
    nrrd = write_volume(root / "nrrd.nrrd", image, affine, kind="float").read_bytes()
    (root / "nrrd.nrrd").unlink()
    put("unknown_type_nrrd.nrrd", nrrd.replace(b"type: float", b"type: quaternion", 1))
    header = nib.Nifti2Header()  # 64-bit dims: 10^15 float32 voxels = 4 PB
    header.set_data_shape((100_000, 100_000, 100_000))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 544
    put("enormous_header.nii.gz", gzip.compress(header.binaryblock + bytes(4 + 4096)))
    put("image_2d.nii.gz", _gz(image[:, :, 0], affine))
    put("image_4d.nii.gz", _gz(np.stack([image] * 3, axis=-1), affine))
    put("image_5d.nii.gz", _gz(np.broadcast_to(image[..., None, None], (*SHAPE, 2, 3)).copy(), affine))
    nan = image.copy()
    nan.flat[[3, 50, 700, 701, 702, 9000, 9001]] = np.nan
    put("nan_voxels.nii.gz", _gz(nan, affine))
    inf = image.copy()
    inf.flat[[5, 6, 7]], inf.flat[[100, 200]] = np.inf, -np.inf
    put("inf_voxels.nii.gz", _gz(inf, affine))
    huge = labels.astype(np.int64)
    huge.flat[1234] = 2**40
    put("huge_int64_labels_seg.nii.gz", _gz(huge, affine))
    negative = labels.astype(np.int16)
    negative.flat[:3] = -1
    put("negative_labels_seg.nii.gz", _gz(negative, affine))
    fractional = labels.astype(np.float32)
    fractional.flat[100:112] = 0.5
    put("fractional_labels_seg.nii.gz", _gz(fractional, affine))

    ct = np.clip(image, -1024, 3000).astype(np.int16)[:, :, :8]
    for name in ("dicom_missing_slice", "dicom_two_series", "dicom_mixed_slice_sizes", "dicom_uneven_spacing",
                 "dicom_mixed_pixel_spacing"):
        (root / name).mkdir()
        files[name] = root / name
    _dicom_series(root / "dicom_missing_slice", ct, UID_A, "ct")
    (root / "dicom_missing_slice" / "ct_004.dcm").unlink()
    _dicom_series(root / "dicom_two_series", ct, UID_A, "ct")
    _dicom_series(root / "dicom_two_series", ct[:, :, :4], UID_B, "other")
    _dicom_series(root / "dicom_mixed_slice_sizes", ct, UID_A, "ct", crop=5)
    _dicom_series(root / "dicom_uneven_spacing", ct, UID_A, "ct", z=[0, 2.5, 5, 7.5, 10.6, 13.1, 15.6, 18.1])
    _dicom_series(root / "dicom_mixed_pixel_spacing", ct, UID_A, "ct", pixel=[(1.5, 1.5)] * 6 + [(1.0, 1.0)] * 2)
    return {_case_name(name): path for name, path in files.items()}


def _case_name(file_name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        file_name = file_name.removesuffix(suffix)
    return file_name.removesuffix("_seg") if file_name.removesuffix("_seg") in CASES else file_name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    files = make_corpus(tmp_path_factory.mktemp("corpus"))
    assert set(CASES) <= set(files)
    return files


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny segmentation model and a tiny AR-pretrained encoder, untrained (errors come before they run)."""
    root = tmp_path_factory.mktemp("models")
    objective = tiny_objective(seed=1)
    config = make_config(
        objective.encoder.cfg.to_dict(), objective="ar",
        heads={"next_token": {"type": "linear", "out_features": 8**3}},
        preprocessing=PreprocessConfig(spacing=(8.0,) * 3).to_dict(),
        provenance={"sequence": {"kinds": ["spatial"], "crop": 32, "slab": 16}},
    )
    return {
        "segment": save_segmenter(root / "seg", spacing=8.0, window=32),
        "explain": save_checkpoint(root / "ar", objective.state_dict(), config),
    }


# ----------------------------------------------------------------------------- the table

IMAGE_ENTRIES = ("segment", "finetune-image", "explain")
LABEL_ENTRIES = ("finetune-seg", "evaluate")


def expected(case: str, entry: str) -> str | None:
    """The error regex of `case` at `entry`, or None where the input is accepted (see the module docstring)."""
    c = CASES[case]
    if entry in ("read_volume", "napari"):
        if c.kind == "image values":
            return None  # NaN / infinity can be looked at
        if c.kind == "label values":  # read_volume has no idea it is a label map; the reader sees "_seg"
            return c.as_labels if entry == "napari" and case != "fractional_labels" else None
        return c.problem
    if entry in LABEL_ENTRIES:
        return c.as_labels or c.problem
    return c.problem


CLI_TABLE = [
    (case, entry)
    for case, c in CASES.items()
    for entry in (*IMAGE_ENTRIES, *LABEL_ENTRIES)
    if not (entry in IMAGE_ENTRIES and c.kind == "label values")  # a label map is a valid (odd) image
    and not (entry in LABEL_ENTRIES and c.kind == "dicom")  # DICOM SEG is not supported as labels
]


def _one_error_line(err: str, path: Path, problem: str) -> str:
    """The `ar3d: error:` line of stderr, checked: the last line, nothing else but tqdm bars, no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("ar3d: error: "), err
    assert all("%|" in line for line in lines[:-1]), err
    assert str(path) in lines[-1] and re.search(problem, lines[-1]), lines[-1]
    return lines[-1]


def _cli_args(entry: str, bad: Path, corpus: dict[str, Path], models: dict[str, Path], out: Path) -> list[str]:
    if entry == "segment":
        return ["segment", "--model", models["segment"], bad, "-o", out / "labels.nii.gz", "--device", "cpu"]
    if entry == "explain":
        return ["explain", bad, "--model", models["explain"], "--out", out / "maps", "--device", "cpu"]
    if entry == "evaluate":
        return ["evaluate", "--pred", bad, "--truth", corpus["seg"]]
    image, seg = (bad, corpus["seg"]) if entry == "finetune-image" else (corpus["image"], bad)
    return ["finetune", "--model", "scratch", *TINY, "--train", image, seg, "--out", out / "model", *QUICK]


@pytest.mark.parametrize("case, entry", CLI_TABLE, ids=[f"{c}-{e}" for c, e in CLI_TABLE])
def test_cli_refuses_bad_input_with_one_line_and_no_output(case, entry, corpus, models, tmp_path, capsys):
    bad, out = corpus[case], tmp_path / "out"
    out.mkdir()
    code = main([str(a) for a in _cli_args(entry, bad, corpus, models, out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    _one_error_line(captured.err, bad, expected(case, entry))
    assert list(out.iterdir()) == []  # no output file, no temporary folder


@pytest.mark.parametrize("case", ["truncated_mha", "unknown_type_nrrd"])
def test_simpleitk_complaints_do_not_reach_stderr(case, corpus, capfd):
    """MetaIO and NRRD parsers print to file descriptor 2 themselves; the CLI still shows one line."""
    assert main(["evaluate", "--pred", str(corpus[case]), "--truth", str(corpus["seg"])]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ar3d: error: {corpus[case]}: "), lines


@pytest.mark.parametrize("case", list(CASES))
def test_read_volume_and_napari_reader(case, corpus):
    path = corpus[case]
    for entry, read in (("read_volume", read_volume), ("napari", napari_get_reader(str(path)))):
        assert callable(read), f"{case}: the napari reader refused a {path.name} name"
        problem = expected(case, entry)
        if problem is None:
            assert read(str(path))  # accepted: a volume / layers
            continue
        with pytest.raises(Ar3dInputError) as error:
            read(str(path))
        message = str(error.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert re.search(problem, message), message


def test_napari_shows_nan_and_fractional_maps_as_images(corpus):
    for case in ("nan_voxels", "inf_voxels", "fractional_labels"):
        ((_, kwargs, kind),) = napari_get_reader(str(corpus[case]))(str(corpus[case]))
        low, high = kwargs["contrast_limits"]
        assert kind == "image" and np.isfinite([low, high]).all() and low < high, case


def test_viewer_open_reports_the_error_and_keeps_working(make_napari_viewer, corpus):
    """napari passes the reader's Ar3dInputError through `viewer.open(plugin=...)` (File > Open wraps it
    in a ReaderPluginError and shows it in its reader dialog); no layer is added, the viewer goes on."""
    viewer = make_napari_viewer()
    for case in CASES:
        path, problem = corpus[case], expected(case, "napari")
        if problem is None:
            layers = viewer.open(str(path), plugin="napari-ar3d")
            assert len(layers) == 1 and len(viewer.layers) == 1, case
            viewer.layers.clear()
            continue
        with pytest.raises(Ar3dInputError, match=problem) as error:
            viewer.open(str(path), plugin="napari-ar3d")
        assert str(error.value).startswith(str(path)) and len(viewer.layers) == 0, case
    (image,) = viewer.open(str(corpus["image"]), plugin="napari-ar3d")
    assert image.data.shape == SHAPE[::-1] and len(viewer.layers) == 1


def test_enormous_header_allocates_nothing_at_any_entry_point(corpus, models, tmp_path, capsys):
    """10^15 declared voxels: every entry point refuses within a second and a few MB of Python memory."""
    path = corpus["enormous_header"]
    tracemalloc.start()
    try:
        for entry in ("read_volume", "napari", *IMAGE_ENTRIES, *LABEL_ENTRIES):
            tracemalloc.reset_peak()
            if entry == "read_volume":
                with pytest.raises(Ar3dInputError):
                    read_volume(path)
            elif entry == "napari":
                with pytest.raises(Ar3dInputError):
                    napari_get_reader(str(path))(str(path))
            else:
                out = tmp_path / entry
                out.mkdir()
                assert main([str(a) for a in _cli_args(entry, path, corpus, models, out)]) == 2
            _, peak = tracemalloc.get_traced_memory()
            assert peak < 64 * 2**20, (entry, peak)
    finally:
        tracemalloc.stop()
    assert "more than the limit" in capsys.readouterr().err


def test_voxel_limit_names_file_count_limit_and_how_to_raise_it(corpus, monkeypatch, tmp_path, capsys):
    path, voxels = corpus["image"], int(np.prod(SHAPE))
    monkeypatch.setenv("AR3D_MAX_VOXELS", str(voxels - 1))
    with pytest.raises(Ar3dInputError) as error:
        read_volume(path)
    assert str(error.value) == (
        f"{path}: image shape {SHAPE} has {voxels:,} voxels, more than the limit of {voxels - 1:,} "
        "(raise it with AR3D_MAX_VOXELS)"
    )
    code = main(["evaluate", "--pred", str(path), "--truth", str(path)])
    assert code == 2 and "AR3D_MAX_VOXELS" in capsys.readouterr().err
    monkeypatch.setenv("AR3D_MAX_VOXELS", str(voxels))
    assert read_volume(path).shape == SHAPE


def test_trailing_singleton_4d_is_squeezed_and_segmented(corpus, models, tmp_path, capsys):
    image = read_volume(corpus["image"])
    path = tmp_path / "singleton.nii.gz"
    nib.save(nib.Nifti1Image(image.array[..., None], image.affine), path)
    assert read_volume(path).shape == SHAPE
    ((data, _, kind),) = napari_get_reader(str(path))(str(path))
    assert kind == "image" and data.shape == SHAPE[::-1]
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", "--model", str(models["segment"]), str(path), "-o", str(out), "--device", "cpu"]) == 0
    assert read_volume(out).shape == SHAPE


def test_dicom_checks_accept_a_clean_series(tmp_path):
    ct = (np.arange(32 * 32 * 8).reshape(32, 32, 8) % 2000 - 1000).astype(np.int16)
    _dicom_series(tmp_path, ct, UID_A, "ct")
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, ct)
    np.testing.assert_allclose(volume.spacing, (1.5, 1.5, 2.5), atol=1e-4)


def test_the_table_covers_every_case_and_entry_point():
    per_entry = {e: sum(1 for _, entry in CLI_TABLE if entry == e) for e in (*IMAGE_ENTRIES, *LABEL_ENTRIES)}
    image_cases = sum(c.kind != "label values" for c in CASES.values())
    label_cases = sum(c.kind != "dicom" for c in CASES.values())
    assert per_entry == {**dict.fromkeys(IMAGE_ENTRIES, image_cases), **dict.fromkeys(LABEL_ENTRIES, label_cases)}
