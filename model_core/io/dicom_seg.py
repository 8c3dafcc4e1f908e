"""DICOM Segmentation (DICOM-SEG) of a label map on the grid of the DICOM series it was made from.

`write_dicom_seg` writes one BINARY DICOM-SEG with highdicom: it references the source series and
every source instance, describes label value k as segment k (labelled by its class name, coded in
SNOMED CT when the name is a known anatomical structure, else in the local scheme `LOCAL_SCHEME`),
and identifies the algorithm (model name and version) for an automatic segmentation.

Every source instance is placed on the label map's grid by its DICOM position, not by its place
in the folder: frame n of the file is the label map's slice through instance n's plane, and an
instance off the grid is refused. The file appears complete or not at all.

No torch, napari or Qt here; highdicom and pydicom are imported on first use.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model_core.errors import Ar3dInputError
from model_core.io.volume import _atomic_output, world_to_voxel, write_error

if TYPE_CHECKING:
    import pydicom

DICOM_SEG_SUFFIX = ".dcm"
LOCAL_SCHEME = "99AR3D"  # coding scheme of class names SNOMED CT does not name ("99": a local scheme)
SIDES = ("left", "right")
_LPS = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS: flip x and y
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "FrameOfReferenceUID")
_ON_GRID = 0.01  # how far (in voxels) an instance may lie from a slice of the grid


@dataclass(frozen=True)
class Algorithm:
    """The model that made a segmentation, as DICOM names it (AlgorithmName, AlgorithmVersion)."""

    name: str
    version: str


def is_dicom_seg_path(path: str | os.PathLike) -> bool:
    """True when `path` names a DICOM-SEG output (.dcm)."""
    return os.fspath(path).lower().endswith(DICOM_SEG_SUFFIX)


def software_version() -> str:
    """napari-ar3d's version as installed."""
    try:
        return metadata.version("napari-ar3d")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_algorithm(name: str, weights: str | os.PathLike) -> Algorithm:
    """A model's identity: its name and a version naming the software and the sha256 of its weights file."""
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return Algorithm(name[:64], f"napari-ar3d {software_version()}, weights sha256 {digest.hexdigest()[:16]}")


def write_dicom_seg(
    path: str | os.PathLike,
    labels: np.ndarray,
    affine: np.ndarray,
    source_files: Sequence[str | os.PathLike],
    names: dict[int, str],
    algorithm: Algorithm | None = None,
    *,
    semiautomatic: bool = False,
) -> Path:
    """Write the label map `labels` (I, J, K) with RAS+ `affine` as a DICOM-SEG of the series `source_files`.

    Label value k is segment k, labelled `names[k]` ("label k" when unnamed). With `algorithm` the
    segments identify it and are AUTOMATIC (SEMIAUTOMATIC with `semiautomatic`: a person may have
    corrected them), without it MANUAL. Raises `Ar3dInputError` naming the
    file and the problem (a source instance off the grid, labels not whole numbers 0..65535).
    """
    path = Path(path)
    if not is_dicom_seg_path(path):
        raise Ar3dInputError(f"a DICOM-SEG file must end with {DICOM_SEG_SUFFIX}", path)
    if not path.parent.is_dir():
        raise Ar3dInputError(f"folder {path.parent} does not exist", path)
    labels = _label_values(np.asarray(labels), path)
    sources = read_sources(source_files, path)
    frames = _frames(labels, np.asarray(affine, dtype=np.float64), sources, path)  # (N, rows, cols)
    count = max([int(labels.max()), *names]) if names else int(labels.max())
    if count == 0:
        raise Ar3dInputError("the label map is empty: there is no segment to write", path)
    with warnings.catch_warnings():  # highdicom's remarks on the source's own values (a one-part patient name)
        warnings.simplefilter("ignore", UserWarning)
        kind = "MANUAL" if algorithm is None else "SEMIAUTOMATIC" if semiautomatic else "AUTOMATIC"
        segments = [_describe(k, names.get(k, f"label {k}"), algorithm, kind) for k in range(1, count + 1)]
        seg = _segmentation(sources, frames, segments, algorithm)
    try:
        with _atomic_output(path) as tmp:
            seg.save_as(tmp)
    except OSError as e:
        raise write_error("could not write the file", e, path) from e
    return path


def _segmentation(sources: list, frames: np.ndarray, segments: list, algorithm: Algorithm | None):
    """The highdicom Segmentation of `frames` (N, rows, cols), frame n on source instance n."""
    import highdicom as hd

    first = sources[0]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(first.get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-ar3d",
        manufacturer_model_name=algorithm.name if algorithm else "napari-ar3d",
        software_versions=software_version(),
        device_serial_number="none",
        content_label="AR3D",
        content_description=f"{algorithm.name} segmentation"[:64] if algorithm else "segmentation painted in napari",
        series_description=f"{first.get('SeriesDescription', '')} segmentation".strip()[:64],
        omit_empty_frames=bool(frames.any()),  # a file with no segmented voxel still needs a frame
        specific_character_set="ISO_IR 192",  # UTF-8: class names and the source's own texts, whatever their script
    )


def _label_values(labels: np.ndarray, path: Path) -> np.ndarray:
    """The label map as uint8 / uint16, or an error unless it is 3D with whole numbers 0..65535."""
    if labels.ndim != 3 or labels.dtype.kind not in "buif":
        raise Ar3dInputError(f"need a 3D label map of numbers, got shape {labels.shape} of {labels.dtype}", path)
    if labels.dtype.kind == "f" and (not np.isfinite(labels).all() or (labels != np.round(labels)).any()):
        raise Ar3dInputError("labels must be whole numbers, but the array has fractions, NaN or infinity", path)
    if labels.size and (labels.min() < 0 or labels.max() > 2**16 - 1):
        raise Ar3dInputError(f"label values {labels.min()}..{labels.max()} are outside 0..65535", path)
    return labels.astype(np.uint8 if labels.max() < 2**8 else np.uint16)


def read_sources(files: Sequence[str | os.PathLike], where: str | os.PathLike | None = None) -> list[pydicom.Dataset]:
    """The headers (no pixel data) of a DICOM-SEG's source instances, or an `Ar3dInputError` (naming `where`
    when no files are given) unless each has the uids a DICOM-SEG must reference."""
    import pydicom

    if not files:
        raise Ar3dInputError("a DICOM-SEG needs the DICOM series the labels were made from, and there is none", where)
    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as e:
            raise Ar3dInputError(f"cannot read the source DICOM file ({e})", file) from None
        meta = getattr(ds, "file_meta", None) or {}
        for own, mirror in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not ds.get(own) and meta.get(mirror):  # blanked by an anonymiser; the file meta keeps the same uid
                setattr(ds, own, meta.get(mirror))
        missing = [uid for uid in REQUIRED_UIDS if not str(ds.get(uid) or "").strip()]
        if missing:
            raise Ar3dInputError(
                f"the source DICOM file has no {', '.join(missing)} (removed by anonymisation?), so a DICOM-SEG "
                "cannot reference it; write the labels as .nii.gz instead",
                file,
            )
        datasets.append(ds)
    return datasets


def _frames(labels: np.ndarray, affine: np.ndarray, sources: list, path: Path) -> np.ndarray:
    """Frame n (rows, cols) = the labels in source instance n's plane, found from its position and orientation."""
    shape = labels.shape  # (I, J, K)
    frames = np.zeros((len(sources), shape[1], shape[0]), dtype=labels.dtype)  # (N, J rows, I columns)
    axes = affine[:3, :2] / np.linalg.norm(affine[:3, :2], axis=0)  # RAS directions of i and j
    for n, ds in enumerate(sources):
        where = f"source instance {Path(ds.filename).name if ds.filename else n}"
        if (int(ds.Rows), int(ds.Columns)) != (shape[1], shape[0]):
            problem = f"{where} is {ds.Rows}x{ds.Columns} pixels, the labels' slices {shape[1]}x{shape[0]}"
            raise Ar3dInputError(problem, path)
        orientation = np.array(ds.ImageOrientationPatient, dtype=np.float64).reshape(2, 3) * _LPS  # RAS rows
        ijk = world_to_voxel(affine, np.array(ds.ImagePositionPatient, dtype=np.float64) * _LPS)
        k = int(round(ijk[2]))
        off_grid = np.abs(ijk - (0, 0, k)).max() > _ON_GRID or not 0 <= k < shape[2]
        if off_grid or not np.allclose(orientation, axes.T, atol=1e-3):
            raise Ar3dInputError(f"{where} does not lie on a slice of the labels' grid", path)
        frames[n] = labels[:, :, k].T
    return frames


def _describe(value: int, name: str, algorithm: Algorithm | None, kind: str):
    """Segment `value`: its label, category and type codes, and how it was made (`kind`, by `algorithm`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    category, property_type, side = _codes(name)
    identification = None
    if algorithm is not None:
        family = codes.cid7162.ArtificialIntelligence
        identification = hd.AlgorithmIdentificationSequence(algorithm.name, family, algorithm.version,
                                                            source="napari-ar3d")
    description = hd.seg.SegmentDescription(
        segment_number=value,
        segment_label=name[:64],
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type=kind,
        algorithm_identification=identification,
        tracking_uid=hd.UID(),
        tracking_id=name[:64],
    )
    if side is not None:  # "kidney_right": Kidney, modified by Right
        description.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(side)]
    return description


def _codes(name: str):
    """(category, type, side or None) codes of a class: SNOMED CT anatomy for a known structure
    ("kidney_right": Kidney and Right), else the class name in `LOCAL_SCHEME`."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    words = [w for w in name.replace("-", "_").replace(" ", "_").lower().split("_") if w]
    sides = [w for w in words if w in SIDES]
    if (concept := _snomed(words)) is not None:
        return codes.cid7150.AnatomicalStructure, concept, None
    if len(sides) == 1 and (concept := _snomed([w for w in words if w not in SIDES])) is not None:
        return codes.cid7150.AnatomicalStructure, concept, getattr(codes.SCT, sides[0].capitalize())
    plain = len(name) <= 16 and all(c.isascii() and (c.isalnum() or c in "_- ") for c in name)
    value = name if plain else hashlib.sha256(name.encode()).hexdigest()[:16]
    return Code("class", LOCAL_SCHEME, "napari-ar3d class"), Code(value, LOCAL_SCHEME, name[:64]), None


def _snomed(words: list[str]):
    """pydicom's SNOMED CT code named by these words ("adrenal", "gland" -> AdrenalGland), or None."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    concept = getattr(codes.SCT, "".join(w.capitalize() for w in words), None) if words else None
    return concept if isinstance(concept, Code) else None
