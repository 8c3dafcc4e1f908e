"""napari sample data: the procedural CT abdomen and brain MRI phantoms, and real scans, with their labels.

Real scans (attribution and licence in each sample's name and in `files/README.md`):
- `totalseg_ct`, `totalseg_mr`: TotalSegmentator's example CT and MR (Wasserthal et al., Apache-2.0;
  `files/LICENSE_TotalSegmentator_Apache-2.0.txt`), shipped in the package with their silver labels
  (TotalSegmentator's output, not manual);
- `tcia_brain`: TCIA Brain-Tumor-Progression PGBM-001 (CC BY 3.0), T1 post-contrast, FLAIR and the
  tumour mask, downloaded on first use (`download.fetch`).
They open through the reader (`napari_ar3d._reader.read_layers`), so their geometry is the reader's.

Layers follow the reader's geometry: data shown in ITK order `(k, j, i)` and a layer `affine` from
`model_core.io.volume.napari_affine` (napari world = LPS mm as (z, y, x)); `metadata["ar3d"]` carries the
same geometry fields as the reader plus "class_names". The labels layer lists the class names in
its `features` table (column "class", one row per label value) and colours them anatomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model_core.data.phantoms import Phantom, make_brain_mri, make_ct_abdomen
from model_core.vocabulary import CT_SOFT_TISSUE_HU

LayerData = tuple[np.ndarray, dict[str, Any], str]

FILES = Path(__file__).resolve().parent / "files"  # the scans shipped in the package
TCIA_STUDY = "PGBM-001/1991-11-19"


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


def totalseg_ct() -> list[LayerData]:
    """TotalSegmentator's example CT (3 mm, lower thorax and abdomen) and its silver organ labels."""
    return scan_layers("totalseg_ct", [FILES / "totalseg_ct" / "image.nii.gz"], FILES / "totalseg_ct" / "seg.nii.gz")


def totalseg_mr() -> list[LayerData]:
    """TotalSegmentator's example abdominal MR (3 mm) and its silver organ labels."""
    return scan_layers("totalseg_mr", [FILES / "totalseg_mr" / "image.nii.gz"], FILES / "totalseg_mr" / "seg.nii.gz")


def tcia_brain() -> list[LayerData]:
    """TCIA PGBM-001 (glioblastoma): T1 post-contrast, FLAIR (hidden) and the tumour mask; downloaded once."""
    from napari_ar3d.sample_data.download import fetch

    images = [fetch(f"{TCIA_STUDY}/{name}.nii.gz") for name in ("t1post", "flair")]
    mask = fetch(f"{TCIA_STUDY}/tumor.nii.gz")
    layers = scan_layers("tcia_pgbm001", images, mask, class_names={1: "tumor"})
    layers[1][1]["visible"] = False  # FLAIR: one click away
    return layers


def scan_layers(name: str, images: list[Path], labels: Path,
                class_names: dict[int, str] | None = None) -> list[LayerData]:
    """Image layers ("<name>" for one image, else "<name> <file>") and a "<name> labels" layer, as the
    reader opens the files; class names from `class_names`, else the labels.json beside `labels`."""
    from model_core.io.volume import check_labels, read_label_names, split_suffix
    from napari_ar3d._reader import read_layers

    layers = []
    for path, (data, kwargs, kind) in zip(images, read_layers([str(p) for p in images])):
        kwargs["name"] = name if len(images) == 1 else f"{name} {split_suffix(path)[0]}"
        layers.append((data, kwargs, kind))
    (data, kwargs, kind), = read_layers(str(labels))
    if kind != "labels":  # a mask whose file name does not say so (tumor.nii.gz)
        data = check_labels(data, labels).astype(np.int32)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("contrast_limits", "colormap")}
    names = class_names or read_label_names(labels)
    values = sorted({0, *names})
    kwargs.update(name=f"{name} labels", opacity=0.5,
                  features={"index": values, "class": [names.get(v, "background") for v in values]})
    kwargs["metadata"]["ar3d"]["class_names"] = {0: "background", **names}
    for _, image_kwargs, _ in layers:
        image_kwargs["metadata"]["ar3d"]["class_names"] = kwargs["metadata"]["ar3d"]["class_names"]
    layers.append((data, kwargs, "labels"))
    for data, kwargs, _ in layers[1:]:  # co-registered files whose headers were rounded apart (float32)
        if data.shape == layers[0][0].shape and np.allclose(kwargs["affine"], layers[0][1]["affine"], atol=1e-4):
            kwargs["affine"] = layers[0][1]["affine"]  # one grid: one transform, so napari aligns them exactly
    return layers
