"""napari writer: a labels layer saved in the geometry napari shows it in (.nii.gz, .nii, .nrrd).

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
