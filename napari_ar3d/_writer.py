"""napari writers: a labels layer saved in the geometry napari shows it in (.nii.gz, .nii, .nrrd), or as a
DICOM-SEG (.dcm) of the DICOM series its image was read from (`metadata["ar3d"]["source_files"]`).

The file's RAS+ affine comes from the layer's full data-to-world transform, so it works for a
layer made by our reader, by the Segment widget, or by napari's "new labels layer" (which copies
the image's scale / translate / rotate / shear / affine but not its metadata).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: `data` is the layer data `(k, j, i)`, `meta` its attributes."""
    from model_core.errors import Ar3dInputError
    from model_core.io.volume import from_napari, write_volume

    data = np.asarray(data)
    if data.ndim != 3:
        problem = f"labels layer {meta.get('name')!r} is {data.ndim}D with shape {data.shape}; need 3D"
        raise Ar3dInputError(problem, path)
    written = write_volume(path, *from_napari(data, data_to_world(meta)), kind="labels")
    return [str(written)]


def data_to_world(meta: dict) -> np.ndarray:
    """The layer's 4x4 data-to-world matrix: affine @ (rotate @ shear @ scale, translate), as napari composes it."""
    from napari.utils.transforms import CompositeAffine

    data_to_physical = CompositeAffine(
        scale=meta.get("scale", (1.0, 1.0, 1.0)),
        translate=meta.get("translate", (0.0, 0.0, 0.0)),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=3,
    )
    physical_to_world = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    return physical_to_world @ data_to_physical.affine_matrix


def write_dicom_seg(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: labels on an image opened from a DICOM series, as a DICOM-SEG of that series.

    The segments are named by the layer's features ("index"/"class"); labels the Segment widget made
    (metadata "algorithm") are SEMIAUTOMATIC and name the model, painted ones MANUAL.
    """
    from model_core.errors import Ar3dInputError
    from model_core.io.dicom_seg import Algorithm
    from model_core.io.dicom_seg import write_dicom_seg as write
    from model_core.io.volume import from_napari

    data = np.asarray(data)
    metadata = meta.get("metadata") or {}
    files = (metadata.get("ar3d") or {}).get("source_files")
    if not files:
        problem = (f"labels layer {meta.get('name')!r} is not on an image opened from a DICOM series, so it cannot be "
                   "saved as DICOM-SEG; save it as .nii.gz, or paint it on the DICOM image's own labels layer")
        raise Ar3dInputError(problem, path)
    if data.ndim != 3:
        raise Ar3dInputError(f"labels layer {meta.get('name')!r} is {data.ndim}D with shape {data.shape}; need 3D", path)
    labels, affine = from_napari(data, data_to_world(meta))
    algorithm = Algorithm(**metadata["algorithm"]) if metadata.get("algorithm") else None
    return [str(write(path, labels, affine, files, class_names(meta), algorithm, semiautomatic=True))]


def class_names(meta: dict) -> dict[int, str]:
    """Label value -> class name from a labels layer's features ("index" and "class" columns)."""
    features = meta.get("features")
    if features is None or "class" not in features:
        return {}
    classes = list(features["class"])
    values = list(features["index"]) if "index" in features else range(len(classes))
    return {int(v): str(name) for v, name in zip(values, classes) if int(v) != 0}
