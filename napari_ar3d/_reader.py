"""napari reader: CT / MRI volumes (NIfTI, NRRD, MHA/MHD, DICOM folder) as layers in LPS world mm.

A volume opens as an image layer, except a label map (whole-number values in a file whose name
says seg / label / mask), which opens as a labels layer on the same grid, with its class names in
the layer's `features` ("index", "class") when a `<name>.labels.json` or `labels.json` is beside it.

napari calls `napari_get_reader` to ask whether a path is ours: it answers None for names it does
not read (another plugin may), and never reads the file there. `read_layers` raises
`Ar3dInputError` ("<path>: <problem>") for a bad file; napari wraps it in a `ReaderPluginError`,
shows the message, and the viewer carries on with no layer added.

The layer shows the volume in ITK order `(k, j, i)` and its `affine` holds the whole data-to-world
transform (see `model_core.io.volume.napari_affine`); `metadata["ar3d"]` keeps the source geometry
(and, for a DICOM series, its uid and files in slice order: the napari writer's DICOM-SEG references them).
No torch here: `model_core.io.volume` is imported inside the functions and imports only nibabel / SimpleITK.
Opening a file in a viewer installs the crash recovery of painted labels there (`widgets.recovery`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from model_core.vocabulary import CT_SOFT_TISSUE_HU

LayerData = tuple[np.ndarray, dict[str, Any], str]

LABEL_WORDS = ("seg", "label", "mask")  # a file name with one of these may hold a label map


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The reader function for `path` (a file, a DICOM folder, or a list of them), or None."""
    from model_core.io.volume import volume_format

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or any(volume_format(p) is None for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerData]:
    """One image (or labels) layer per path; raises `Ar3dInputError` for a bad file.

    Volumes with some NaN or infinite voxels open (they can be looked at); a label map with a
    negative label or one above 65535 is refused (`model_core.io.volume.check_labels`).
    """
    from model_core.io.volume import (
        check_labels,
        read_label_names,
        read_volume,
        split_suffix,
        to_napari,
    )

    layers = []
    for p in [path] if isinstance(path, (str, os.PathLike)) else path:
        volume = read_volume(p)
        data, affine = to_napari(volume)  # (k, j, i) view, LPS (z, y, x) world
        geometry = {
            "path": str(volume.path),
            "affine_ras": volume.affine.tolist(),
            "shape_ijk": list(volume.shape),
            "orientation": volume.orientation,
            "spacing": volume.spacing.tolist(),
            "modality": volume.meta.get("modality"),
            "format": volume.meta.get("format"),
        }
        if "source_files" in volume.meta:  # a DICOM series: what a DICOM-SEG of labels on it references
            geometry.update(series_uid=volume.meta["series_uid"], source_files=volume.meta["source_files"])
        kwargs = {"name": split_suffix(p)[0], "affine": affine, "metadata": {"ar3d": geometry}}
        if _is_label_map(Path(p), volume.array):
            labels = check_labels(data, volume.path)  # uint8 / uint16 (k, j, i)
            names = read_label_names(p)  # <name>.labels.json beside it (as `ar3d segment` writes), or labels.json
            if names:
                values = sorted({0, *names})
                kwargs["features"] = {"index": values, "class": [names.get(v, "background") for v in values]}
            layers.append((labels.astype(np.int32, copy=False), kwargs, "labels"))
            continue
        kwargs["contrast_limits"] = contrast_limits(volume.array, volume.meta.get("modality"))
        kwargs["colormap"] = "gray"
        layers.append((data, kwargs, "image"))
    _watch_for_recovery()
    return layers


def _watch_for_recovery() -> None:
    """In the viewer opening these files: offer labels saved before a crash, save painted ones (`widgets.recovery`)."""
    if "napari.viewer" not in sys.modules:
        return  # not called by napari (a script, a test): no viewer to watch
    from napari import current_viewer

    viewer = current_viewer()
    if viewer is not None:
        from napari_ar3d.widgets.recovery import install

        install(viewer)


def contrast_limits(array: np.ndarray, modality: str | None = None) -> tuple[float, float]:
    """A soft-tissue window for CT (or data that looks like Hounsfield units), else 0.5-99.5th percentiles."""
    step = max(1, round((array.size / 1_000_000) ** (1 / 3)))  # about a million voxels is plenty
    sample = array[::step, ::step, ::step].astype(np.float32).ravel()
    sample = sample[np.isfinite(sample)]
    if not sample.size:  # the finite voxels all fall between the sampled ones
        sample = array[np.isfinite(array)].astype(np.float32)
    low, high = float(sample.min()), float(sample.max())
    if modality == "CT" or (low <= -500 and high >= 500):  # air is -1000 HU, bone several hundred
        return CT_SOFT_TISSUE_HU
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def _is_label_map(path: Path, array: np.ndarray) -> bool:
    """A file named like a segmentation whose values are all whole numbers (float label files exist)."""
    if not any(word in path.name.lower() for word in LABEL_WORDS):
        return False
    if np.issubdtype(array.dtype, np.integer):
        return True
    return bool(np.issubdtype(array.dtype, np.floating) and np.array_equal(array, np.round(array)))
