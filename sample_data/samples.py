"""napari sample data: the procedural CT abdomen and brain MRI phantoms, with their labels.

Layers follow the reader's geometry: data shown in ITK order `(k, j, i)` and a layer `affine` from
`model_core.io.volume.napari_affine` (napari world = LPS mm as (z, y, x)); `metadata["ar3d"]` carries the
same geometry fields as the reader plus "class_names". The labels layer lists the class names in
its `features` table (column "class", one row per label value) and colours them anatomically.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model_core.data.phantoms import Phantom, make_brain_mri, make_ct_abdomen
from model_core.vocabulary import CT_SOFT_TISSUE_HU

LayerData = tuple[np.ndarray, dict[str, Any], str]



def ct_abdomen(seed: int = 0) -> list[LayerData]:
    """The CT abdomen phantom (Hounsfield units, soft-tissue window) and its organ labels."""
    phantom = make_ct_abdomen(seed=seed)
    image_kwargs = {"contrast_limits": CT_SOFT_TISSUE_HU, "colormap": "gray"}
    return phantom_layers(phantom, "ct_abdomen", {"ct": image_kwargs})


def brain_mri(seed: int = 0) -> list[LayerData]:
    """The brain MRI phantom: t1n, t1c, t2w, t2f (only t1c visible) and the tissue / tumour labels."""
    phantom = make_brain_mri(seed=seed)
    image_kwargs = {
        name: {
            "contrast_limits": tuple(float(c) for c in np.percentile(image, [0.5, 99.8])),
            "colormap": "gray",
            "visible": name == "t1c",
        }
        for name, image in phantom.images.items()
    }
    return phantom_layers(phantom, "brain_mri", image_kwargs)


def phantom_layers(phantom: Phantom, name: str, image_kwargs: dict[str, dict[str, Any]]) -> list[LayerData]:
    """Image layers named "<name> <image>" (or "<name>" for a single image) and a "<name> labels" layer."""
    from nibabel import aff2axcodes

    from model_core.io.volume import napari_affine

    affine = napari_affine(phantom.affine)
    geometry = {
        "path": None,
        "affine_ras": phantom.affine.tolist(),
        "shape_ijk": list(phantom.shape),
        "orientation": "".join(aff2axcodes(phantom.affine)),
        "spacing": list(phantom.spacing),
        "modality": phantom.modality,
        "class_names": dict(phantom.class_names),
    }
    layers = []
    for key, image in phantom.images.items():
        layer_name = name if len(phantom.images) == 1 else f"{name} {key}"
        kwargs = {"name": layer_name, "affine": affine, "metadata": {"ar3d": dict(geometry)}, **image_kwargs[key]}
        layers.append((image.transpose(2, 1, 0), kwargs, "image"))  # (K, J, I)
    values = sorted(phantom.class_names)
    labels_kwargs = {
        "name": f"{name} labels",
        "affine": affine,
        "metadata": {"ar3d": dict(geometry)},
        "features": {"index": values, "class": [phantom.class_names[v] for v in values]},
        "colormap": {None: (0.0, 0.0, 0.0, 0.0), **phantom.colors},
        "opacity": 0.5,
    }
    layers.append((phantom.labels.transpose(2, 1, 0), labels_kwargs, "labels"))  # (K, J, I)
    return layers
