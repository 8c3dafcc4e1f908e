"""Read and write 3D medical volumes (NIfTI, NRRD, MHA/MHD, DICOM series) with their full geometry.

A `Volume` keeps the voxels in the file's own index order `(i, j, k)` and a 4x4 `affine` mapping
`(i, j, k, 1)` to RAS+ world millimetres (the NIfTI / nibabel convention). NIfTI goes through
nibabel; NRRD, MetaImage and DICOM through SimpleITK, whose LPS geometry is converted on read and
back on write. Every problem with a file raises `Ar3dInputError` ("<path>: <problem>"), and the
header is checked before any voxel is allocated.

napari shows the array in ITK order `(k, j, i)` (a transposed view) with world coordinates in LPS
millimetres, reversed: `(z, y, x)`. So a napari world point read backwards is the ITK / DICOM
physical point of the voxel. `napari_affine` / `ras_affine` convert the geometry between the two.

This module never imports torch, napari or Qt.
"""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from model_core.errors import Ar3dEnvironmentError, Ar3dError, Ar3dInputError

# 256 Mi voxels (512 x 512 x 1024: a long thin-slice CT still opens): 1 GiB as float32. Segmenting
# peaks at about 70 bytes per input voxel with 2 classes and 15 more per extra class (measured on
# CPU: the image, its normalised and resampled copies, probabilities on both grids, uncertainty,
# labels), so a volume at the limit fits a 24 GB machine with up to 3 classes (19 GB with 2).
# Raise or lower it with $AR3D_MAX_VOXELS.
DEFAULT_MAX_VOXELS = 2**28
MAX_VOXELS_ENV = "AR3D_MAX_VOXELS"
MAX_LABEL = 2**16 - 1  # label values 0..65535 (uint16); FreeSurfer's largest is 14175

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm",)
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS: flip x and y (its own inverse)
_LPS4 = np.diag([-1.0, -1.0, 1.0, 1.0])
_REVERSE4 = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # (x,y,z) <-> (z,y,x)
_TAG_SERIES_UID, _TAG_DESCRIPTION, _TAG_MODALITY = "0020|000e", "0008|103e", "0008|0060"
_MAX_CONDITION = 1e8  # largest ratio of voxel sizes (singular values) a geometry may have
_SLICE_TOLERANCE = 0.01  # relative deviation allowed between DICOM slice gaps and pixel spacings


if TYPE_CHECKING:
    import SimpleITK


def simpleitk():
    """SimpleITK, imported on first use: NIfTI-only work never pays for it."""
    import SimpleITK

    return SimpleITK


@dataclass
class Volume:
    """A 3D scan: voxels in file index order `(i, j, k)` and the RAS+ affine of that grid."""

    array: np.ndarray  # (I, J, K)
    affine: np.ndarray  # (4, 4) float64: (i, j, k, 1) -> RAS+ mm
    path: str | None = None
    meta: dict = field(default_factory=dict)  # format, modality, DICOM series uid, NIfTI header codes

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k, shape (3,)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def orientation(self) -> str:
        """Axis codes of i, j, k, e.g. "RAS" or "LPS"."""
        return "".join(nib.aff2axcodes(self.affine))


# ---------------------------------------------------------------- reading


def volume_format(path: str | os.PathLike) -> str | None:
    """"nifti", "itk", "dicom" or None (not a volume this module reads), from the name (a folder: its files)."""
    path = Path(path)
    if path.is_dir():
        return "dicom" if is_dicom_dir(path) else None
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return None


def split_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """("scan", ".nii.gz") for scan.nii.gz: a volume file's name without and with its (double) suffix."""
    name = Path(path).name.rstrip("/")
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


# ---------------------------------------------------------------- class names of a label map

LABEL_NAMES_SUFFIX = ".labels.json"  # seg.nii.gz -> seg.labels.json: {"1": "liver", ...}


def label_names_path(seg_path: str | os.PathLike) -> Path:
    """Where the class names of the label map `seg_path` are kept: `<name>.labels.json` beside it."""
    return Path(seg_path).parent / (split_suffix(seg_path)[0] + LABEL_NAMES_SUFFIX)


def read_labels_json(path: str | os.PathLike) -> dict[int, str]:
    """Label names from a JSON file ({"1": "liver", ...}); {} when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError) as e:
        raise Ar3dInputError(f"labels file must map label values to names ({e})", path) from None


def read_label_names(seg_path: str | os.PathLike) -> dict[int, str]:
    """Class names of a label map: its own `<name>.labels.json`, else a `labels.json` in its folder, else {}."""
    own = label_names_path(seg_path)
    return read_labels_json(own if own.is_file() else Path(seg_path).parent / "labels.json")


def write_label_names(seg_path: str | os.PathLike, names: dict[int, str]) -> Path:
    """Write `<name>.labels.json` beside the label map `seg_path`, atomically; its path."""
    target = label_names_path(seg_path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(names.items())}, indent=1) + "\n")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error("could not write the file", e, target) from e
    return target


def is_dicom_dir(path: str | os.PathLike, max_files: int = 20) -> bool:
    """True when one of the first `max_files` files in the folder is DICOM (".dcm" or the DICM preamble)."""
    with os.scandir(path) as entries:
        files = [e for e in entries if e.is_file()][:max_files]
    for entry in files:
        if entry.name.lower().endswith(".dcm"):
            return True
        try:
            with open(entry.path, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    return True
        except OSError:  # unreadable file: not evidence either way
            continue
    return False


def read_volume(
    path: str | os.PathLike, *, series_uid: str | None = None, max_voxels: int | None = None
) -> Volume:
    """Read a NIfTI, NRRD/NHDR, MHA/MHD file or a DICOM folder (or one .dcm file of a series).

    `series_uid` picks one series of a DICOM folder that holds several. `max_voxels` (default
    `$AR3D_MAX_VOXELS`, else `DEFAULT_MAX_VOXELS`) refuses larger volumes before reading them.
    Raises `Ar3dInputError` naming the file and the problem.
    """
    path = Path(path)
    max_voxels = _max_voxels(max_voxels)
    if not path.exists():
        raise Ar3dInputError("file not found", path)
    kind = volume_format(path)
    if kind == "nifti":
        volume = _read_nifti(path, max_voxels)
    elif kind == "itk":
        with _native_stderr_silenced():
            volume = _read_itk(path, max_voxels)
    elif kind == "dicom":
        with _native_stderr_silenced():
            volume = _read_dicom(path, series_uid, max_voxels)
    elif path.is_dir():
        raise Ar3dInputError("folder holds no DICOM files", path)
    else:
        raise Ar3dInputError(
            f"unsupported file type; napari-ar3d reads {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)} or a DICOM folder",
            path,
        )
    _check_values(path, volume.array)
    return volume


def _max_voxels(max_voxels: int | None) -> int:
    if max_voxels is None:
        value = os.environ.get(MAX_VOXELS_ENV, str(DEFAULT_MAX_VOXELS))
        try:
            max_voxels = int(value)
        except ValueError:
            raise Ar3dInputError(f"{MAX_VOXELS_ENV}={value!r} is not a whole number of voxels") from None
    if max_voxels <= 0:
        raise Ar3dInputError(f"max_voxels must be positive, got {max_voxels}")
    return max_voxels


def _check_shape(path: Path, shape: tuple[int, ...], max_voxels: int) -> tuple[int, int, int]:
    """The 3D shape of a header's shape (trailing size-1 dims dropped), or an error naming it."""
    shape = tuple(int(n) for n in shape)
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if any(n <= 0 for n in shape):
        raise Ar3dInputError(f"image has an empty dimension, shape {shape}", path)
    if len(squeezed) != 3 or min(squeezed) == 1:
        dims = sum(n > 1 for n in squeezed)
        raise Ar3dInputError(f"image is {dims}D with shape {shape}; napari-ar3d needs a 3D volume", path)
    voxels = int(np.prod(squeezed, dtype=object))
    if voxels > max_voxels:
        raise Ar3dInputError(
            f"image shape {shape} has {voxels:,} voxels, more than the limit of {max_voxels:,} "
            f"(raise it with {MAX_VOXELS_ENV})",
            path,
        )
    return squeezed


def _check_values(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind not in "buif":
        raise Ar3dInputError(f"voxel type {array.dtype} is not supported; need real scalar voxels", path)
    if array.dtype.kind == "f" and not np.isfinite(array).any():
        raise Ar3dInputError("every voxel is NaN or infinite", path)


def _check_affine(path: Path, affine: np.ndarray) -> np.ndarray:
    """The header's affine as float64, or an error unless it is finite and well invertible (no zero voxel size)."""
    affine = np.asarray(affine, dtype=np.float64)
    with np.errstate(all="ignore"):
        ok = np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-12
        ok = ok and np.linalg.cond(affine[:3, :3]) < _MAX_CONDITION
    if not ok:
        spacing = np.round(np.linalg.norm(np.nan_to_num(affine[:3, :3]), axis=0), 6).tolist()
        raise Ar3dInputError(
            f"the header's geometry is not a finite invertible transform (voxel size {spacing} mm)", path
        )
    return affine


def check_image(array: np.ndarray, source: str | os.PathLike | None = None) -> None:
    """Refuse an image a model cannot use: not 3D, not real numbers, or with NaN / infinite voxels (counted).

    `read_volume` and the napari reader accept partly non-finite volumes (they can be looked at);
    segment, fine-tune and explain call this first, so the model never sees a guessed value.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise Ar3dInputError(f"image has shape {array.shape}; napari-ar3d needs a 3D volume", source)
    if array.dtype.kind not in "buif":
        raise Ar3dInputError(f"image has voxel type {array.dtype}; need real numbers", source)
    if array.dtype.kind != "f":
        return
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    if nan or inf:
        raise Ar3dInputError(
            f"image has {nan:,} NaN and {inf:,} infinite voxels (of {array.size:,}); replace them with a real "
            "value (e.g. the background) before using a model on it",
            source,
        )


def check_labels(array: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
    """A label map as uint8 / uint16 after checking its values are whole numbers in 0..`MAX_LABEL`.

    Float maps holding whole numbers are accepted (many tools write them); NaN, infinite,
    fractional, negative and larger values raise `Ar3dInputError` naming the first bad value.
    """
    labels = np.asarray(array)
    if labels.dtype.kind not in "buif":
        raise Ar3dInputError(f"label map has voxel type {labels.dtype}; need whole numbers", source)
    if labels.size == 0:
        raise Ar3dInputError(f"label map is empty, shape {labels.shape}", source)
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        if not finite.all():
            raise Ar3dInputError(f"label map has {int((~finite).sum()):,} NaN or infinite voxels", source)
        fractional = labels != np.round(labels)
        if fractional.any():
            example = float(labels[fractional].flat[0])
            raise Ar3dInputError(
                f"label map has {int(fractional.sum()):,} voxels with fractions (e.g. {example:g}); "
                "labels must be whole numbers",
                source,
            )
    low, high = (int(v) for v in (labels.min(), labels.max()))  # whole numbers by now
    if low < 0:
        raise Ar3dInputError(f"label map has negative label {low}; labels must be 0..{MAX_LABEL}", source)
    if high > MAX_LABEL:
        raise Ar3dInputError(f"label map has label {high}, above the largest supported label {MAX_LABEL}", source)
    return labels.astype(np.uint8 if high < 2**8 else np.uint16)


_STDERR_LOCK = threading.Lock()


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null while SimpleITK reads: its C++ parsers (MetaIO, GDCM) print their
    complaints there directly, and a bad file must get one error line, ours. One reader at a time."""
    with _STDERR_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to silence
            yield
            return
        try:
            sys.stderr.flush()
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Keep nibabel from logging its header fixes to stderr: a bad file gets one error line, ours."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_nifti(path: Path, max_voxels: int) -> Volume:
    try:
        with _quiet_nibabel():
            image = nib.load(path, mmap=False)
    except nib.filebasedimages.ImageFileError as e:
        if "not a gzip file" in str(e):
            raise Ar3dInputError("file is named .gz but is not gzip-compressed", path) from None
        problem = "not a NIfTI image (no valid NIfTI header: wrong magic or truncated header)"
        raise Ar3dInputError(problem, path) from None
    except (OSError, EOFError, zlib.error) as e:
        raise Ar3dInputError(f"cannot read the NIfTI header ({_first_line(e)})", path) from None
    except (HeaderDataError, ValueError, OverflowError) as e:  # nibabel's checks of the header's fields
        raise Ar3dInputError(f"the NIfTI header is invalid ({_first_line(e)})", path) from None
    header = image.header
    shape = _check_shape(path, header.get_data_shape(), max_voxels)
    dtype = header.get_data_dtype()
    declared = f"header declares shape {header.get_data_shape()} of {dtype}"
    if not path.name.lower().endswith(".gz"):
        needed = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * dtype.itemsize
        if path.stat().st_size < needed:
            size = path.stat().st_size
            raise Ar3dInputError(f"file is truncated: {declared} ({needed} bytes) but holds {size} bytes", path)
    try:
        array = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise Ar3dInputError(f"compressed data is truncated or corrupt ({_first_line(e)})", path) from None
    except OSError:
        raise Ar3dInputError(f"file is truncated: {declared} but the data is shorter", path) from None
    except (ValueError, OverflowError) as e:  # e.g. a data offset beyond any file
        raise Ar3dInputError(f"the voxel data cannot be read: {declared} ({_first_line(e)})", path) from None
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    try:
        xyz_units = header.get_xyzt_units()[0]
    except KeyError:  # a units code NIfTI does not define; writers then use mm
        xyz_units = None
    meta = {
        "format": "nifti",
        "modality": None,
        "nifti": {"sform_code": sform_code, "qform_code": qform_code, "xyz_units": xyz_units},
    }
    return Volume(array.reshape(shape), _check_affine(path, image.affine), str(path), meta)


def _check_metaimage_header(path: Path) -> None:
    """Refuse a MetaImage header with an NDims outside 1..8: SimpleITK crashes the process on a negative or huge one."""
    with open(path, "rb") as f:
        head = f.read(65536)
    end = head.find(b"ElementDataFile")  # the last header field; binary data follows
    for m in re.finditer(rb"^[ \t]*NDims[ \t]*=[ \t]*(\S*)", head if end < 0 else head[:end], re.MULTILINE | re.IGNORECASE):
        value = m.group(1).decode("latin-1")
        if not re.fullmatch("[0-9]+", value) or not 1 <= int(value) <= 8:
            raise Ar3dInputError(f"the MetaImage header declares NDims = {value!r}; it must be 1 to 8", path)


def _read_itk(path: Path, max_voxels: int) -> Volume:
    sitk = simpleitk()
    if path.name.lower().endswith((".mha", ".mhd")):
        _check_metaimage_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise Ar3dInputError("not a readable NRRD / MetaImage file (its header could not be parsed)", path) from None
    if reader.GetNumberOfComponents() != 1:
        raise Ar3dInputError(
            f"image has {reader.GetNumberOfComponents()} components per voxel; napari-ar3d needs a scalar volume",
            path,
        )
    shape = _check_shape(path, reader.GetSize(), max_voxels)
    _sitk_affine(reader, path)  # before reading: SimpleITK hangs on some non-finite geometries
    try:
        image = reader.Execute()
    except RuntimeError:
        raise Ar3dInputError(
            f"voxel data could not be read (file truncated or corrupt; header declares shape {reader.GetSize()})", path
        ) from None
    file_format = "nrrd" if path.name.lower().endswith((".nrrd", ".nhdr")) else "metaimage"
    return _volume_from_sitk(image, shape, path, {"format": file_format, "modality": None})


def _read_dicom(path: Path, series_uid: str | None, max_voxels: int) -> Volume:
    sitk = simpleitk()
    folder = path if path.is_dir() else path.parent
    if series_uid is None and not path.is_dir():
        series_uid = _dicom_tags(path).get(_TAG_SERIES_UID)  # a .dcm file picks its own series
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise Ar3dInputError("no DICOM series found", path)
    if series_uid is None and len(uids) > 1:
        listing = "; ".join(_describe_series(folder, uid) for uid in uids)
        raise Ar3dInputError(f"folder holds {len(uids)} DICOM series, pass series_uid= one of: {listing}", path)
    uid = series_uid if series_uid is not None else uids[0]
    if uid not in uids:
        raise Ar3dInputError(f"no DICOM series with uid {uid!r}; found {', '.join(uids)}", path)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        first.ReadImageInformation()
    except RuntimeError:
        raise Ar3dInputError(f"cannot read the DICOM header of {Path(files[0]).name}", path) from None
    _sitk_affine(first, path)
    width, height = first.GetSize()[:2]
    shape = _check_shape(path, (width, height, len(files)), max_voxels)
    _check_dicom_slices(path, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError:
        problem = f"DICOM series {uid} could not be read (slices missing, corrupt or of unequal size)"
        raise Ar3dInputError(problem, path) from None
    tags = _dicom_tags(Path(files[0]))
    meta = {
        "format": "dicom",
        "modality": tags.get(_TAG_MODALITY),
        "series_uid": uid,
        "series_description": tags.get(_TAG_DESCRIPTION, ""),
        "files": len(files),
        "source_files": [str(f) for f in files],  # in slice order
    }
    return _volume_from_sitk(image, shape, folder, meta)


def _check_dicom_slices(path: Path, files: list[str]) -> None:
    """Refuse a series whose slices differ in size, pixel spacing or orientation, or are unevenly spaced.

    SimpleITK stacks such slices anyway (with a warning) and the volume's geometry is then wrong;
    uneven gaps usually mean missing slices, equal positions two series under one uid.
    """
    sitk = simpleitk()
    sizes, spacings, directions, origins = [], [], [], []
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise Ar3dInputError(f"cannot read the DICOM header of {Path(file).name}", path) from None
        sizes.append(tuple(reader.GetSize()[:2]))
        spacings.append(reader.GetSpacing()[:2])
        directions.append(np.array(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3])
        origins.append(reader.GetOrigin()[:3])
    names = [Path(f).name for f in files]
    for n in range(1, len(files)):
        if sizes[n] != sizes[0]:
            raise Ar3dInputError(f"DICOM slices differ in size: {names[0]} is {sizes[0]}, {names[n]} is {sizes[n]}", path)
        if not np.allclose(spacings[n], spacings[0], rtol=_SLICE_TOLERANCE):
            raise Ar3dInputError(
                f"DICOM slices differ in pixel spacing: {names[0]} has {spacings[0]} mm, {names[n]} has {spacings[n]} mm",
                path,
            )
        if not np.allclose(directions[n], directions[0], atol=1e-3):
            raise Ar3dInputError(f"DICOM slices differ in orientation: {names[0]} and {names[n]}", path)
    normal = directions[0][:, 2]
    positions = np.array(origins) @ normal  # (N,) mm along the slice normal, in series order
    gaps = np.diff(positions)
    if len(gaps) == 0:
        return
    median = float(np.median(np.abs(gaps)))
    if median < 1e-6 or np.abs(gaps).min() < 1e-6:
        n = int(np.argmin(np.abs(gaps)))
        raise Ar3dInputError(
            f"DICOM slices {names[n]} and {names[n + 1]} lie at the same position (two series under one uid?)", path
        )
    deviation = np.abs(np.abs(gaps) - median)
    n = int(np.argmax(deviation))
    if deviation[n] > _SLICE_TOLERANCE * median or np.sign(gaps).min() != np.sign(gaps).max():
        raise Ar3dInputError(
            f"DICOM slice spacing is not uniform: {abs(gaps[n]):.3g} mm between {names[n]} and {names[n + 1]}, "
            f"{median:.3g} mm elsewhere (missing slices?)",
            path,
        )


def _dicom_tags(file: Path) -> dict[str, str]:
    sitk = simpleitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise Ar3dInputError("not a readable DICOM file", file) from None
    keys = (_TAG_SERIES_UID, _TAG_DESCRIPTION, _TAG_MODALITY)
    return {key: reader.GetMetaData(key).strip() for key in keys if reader.HasMetaDataKey(key)}


def _describe_series(folder: Path, uid: str) -> str:
    sitk = simpleitk()
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    description = _dicom_tags(Path(files[0])).get(_TAG_DESCRIPTION, "")
    return f"{uid} ({description!r}, {len(files)} slices)"


def _sitk_affine(image: "SimpleITK.Image | SimpleITK.ImageFileReader", path: Path) -> np.ndarray:
    """The checked RAS+ affine of an image's (or a read header's) LPS direction, spacing and origin."""
    ndim = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(ndim, ndim)[:3, :3]
    spacing = np.array(image.GetSpacing()[:3])
    origin = np.array(image.GetOrigin()[:3])
    affine = np.eye(4)
    with np.errstate(all="ignore"):
        affine[:3, :3] = _LPS @ direction * spacing  # scale column n by spacing n
        affine[:3, 3] = _LPS @ origin
    return _check_affine(path, affine)


def _volume_from_sitk(image: "SimpleITK.Image", shape: tuple[int, int, int], path: Path, meta: dict) -> Volume:
    sitk = simpleitk()
    affine = _sitk_affine(image, path)
    array = sitk.GetArrayFromImage(image).reshape(shape[::-1]).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    return Volume(array, affine, str(path), meta)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe_write_error(error: BaseException, folder: str | os.PathLike, nbytes: int = 0) -> str:
    """Why a write into `folder` failed, in a few words; "no space left on the device (...)" when it is full.

    A full disk shows as ENOSPC, as "No space left" in a library's message, or (ITK's NRRD writer
    says only "failed to write") as less free space than the `nbytes` the write needed.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "no space left" in str(error).lower()
    if full or (free is not None and free < nbytes):
        sizes = ([f"{nbytes / 1e6:.1f} MB to write"] if nbytes else []) + ([f"{free / 1e6:.1f} MB free"] if free is not None else [])
        return "no space left on the device" + (f" ({', '.join(sizes)})" if sizes else "")
    return _first_line(error)


def write_error(
    what: str, error: BaseException, path: str | os.PathLike, folder: str | os.PathLike | None = None, nbytes: int = 0
) -> Ar3dError:
    """The error to raise when writing `path` failed: `what` ("could not write the file") and why.

    A full disk is `Ar3dEnvironmentError` (free space or choose another folder); anything else (no
    permission, not a folder) is `Ar3dInputError`, the output path being the user's choice.
    """
    problem = describe_write_error(error, Path(path).parent if folder is None else folder, nbytes)
    if problem.startswith("no space left"):
        return Ar3dEnvironmentError(f"{what}: {problem}; free some space or choose another folder", path)
    return Ar3dInputError(f"{what}: {problem}", path)


# ---------------------------------------------------------------- writing


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    kind: Literal["labels", "float"],
    like: Volume | None = None,
) -> Path:
    """Write a 3D `(i, j, k)` array with its RAS+ `affine` to .nii/.nii.gz/.nrrd/.mha/.mhd, atomically.

    `kind="labels"` stores the smallest integer type that holds the values (they must be whole
    numbers); `kind="float"` stores float32. `like`, a NIfTI `Volume`, lends its header codes and
    units. The file appears complete or not at all: it is written in a temporary folder beside
    `path`, synced, then renamed.
    """
    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise Ar3dInputError(f"cannot write this file type; use one of {', '.join(WRITE_SUFFIXES)}", path)
    if not path.parent.is_dir():
        raise Ar3dInputError(f"folder {path.parent} does not exist", path)
    data = _output_array(path, np.asarray(array), kind)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise Ar3dInputError(f"affine must be a finite invertible 4x4 matrix, got {affine.tolist()}", path)
    try:
        with _atomic_output(path) as tmp:
            if path.name.lower().endswith(NIFTI_SUFFIXES):
                _write_nifti(tmp, data, affine, like)
            else:
                _write_itk(tmp, data, affine)
    except (OSError, RuntimeError) as e:
        raise write_error("could not write the file", e, path, nbytes=data.nbytes) from e
    return path


def _output_array(path: Path, array: np.ndarray, kind: str) -> np.ndarray:
    """The array in the type that gets written: smallest fitting integer for labels, float32 otherwise."""
    if array.ndim != 3 or 0 in array.shape:
        raise Ar3dInputError(f"need a non-empty 3D array to write, got shape {array.shape}", path)
    if array.dtype.kind not in "buif":
        raise Ar3dInputError(f"cannot write voxels of type {array.dtype}", path)
    if kind == "float":
        return array.astype(np.float32)
    if kind != "labels":
        raise Ar3dInputError(f"kind must be 'labels' or 'float', got {kind!r}", path)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise Ar3dInputError("labels must be whole numbers, but the array has fractions, NaN or infinity", path)
    low, high = array.min(), array.max()
    candidates = (np.uint8, np.uint16, np.uint32, np.uint64) if low >= 0 else (np.int8, np.int16, np.int32, np.int64)
    for dtype in candidates:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype)
    raise Ar3dInputError(f"label values {low}..{high} do not fit a 64-bit integer", path)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, like: Volume | None) -> None:
    codes = (like.meta.get("nifti") if like is not None else None) or {}
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=codes.get("sform_code") or 1)  # 1 = scanner, when the source had none
    image.set_qform(affine, code=codes.get("qform_code") or 1)
    image.header.set_xyzt_units(xyz=codes.get("xyz_units") or "mm")
    nib.save(image, path)


def _write_itk(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    sitk = simpleitk()
    lps = _LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # (k, j, i)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).flatten().tolist())
    image.SetOrigin((_LPS @ affine[:3, 3]).tolist())
    sitk.WriteImage(image, str(path), useCompression=True)


@contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    """Yield a path with the real name in a temporary folder beside `path`; on success move its files in.

    Companion files (a .mhd's .raw/.zraw) move first and the named file last, so a reader never
    finds a header without its data. On failure the temporary folder goes and `path` is untouched.
    """
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp_dir / path.name
        files = sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name)
        for file in files:
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        for file in files:
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------- geometry


def napari_affine(affine_ras: np.ndarray) -> np.ndarray:
    """The napari layer affine for data shown as `array.transpose(2, 1, 0)`, world in LPS mm as (z, y, x)."""
    return _REVERSE4 @ _LPS4 @ np.asarray(affine_ras, dtype=np.float64) @ _REVERSE4


def ras_affine(napari_matrix: np.ndarray) -> np.ndarray:
    """Inverse of `napari_affine`: the RAS+ affine of the `(i, j, k)` array."""
    return _LPS4 @ _REVERSE4 @ np.asarray(napari_matrix, dtype=np.float64) @ _REVERSE4


def to_napari(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(data `(k, j, i)` view, napari affine) for a napari image or labels layer."""
    return volume.array.transpose(2, 1, 0), napari_affine(volume.affine)


def from_napari(data: np.ndarray, napari_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(array `(i, j, k)` view, RAS+ affine) from napari layer data and its full data-to-world matrix."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise Ar3dInputError(f"napari layer data must be 3D, got shape {data.shape}")
    return data.transpose(2, 1, 0), ras_affine(napari_matrix)


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """RAS+ mm of voxel indices `ijk`, shape (3,) or (N, 3)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz_ras: np.ndarray) -> np.ndarray:
    """Fractional voxel indices of RAS+ points `xyz_ras`, shape (3,) or (N, 3)."""
    xyz = np.asarray(xyz_ras, dtype=np.float64)
    return np.linalg.solve(affine[:3, :3], (xyz - affine[:3, 3]).T).T
