"""napari layers <-> `model_core.io.volume.Volume`, and output layers aligned with their image.

Geometry (docs/architecture.md): layer data is `(k, j, i)`, the layer's full data-to-world
transform (affine composed with scale / translate / rotate / shear, as napari composes it) maps it
to LPS millimetres as `(z, y, x)`. `layer_volume` turns a layer into a `Volume` `(i, j, k)` with
its RAS+ affine; `show_output` adds or updates an output layer with the image's transform.
No Qt here and no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model_core.errors import Ar3dInputError
from model_core.io.volume import Volume, from_napari
from napari_ar3d._writer import data_to_world

TRANSFORM_ATTRS = ("scale", "translate", "rotate", "shear")
USER_CHOICES = {  # display attributes an output layer keeps when a re-run updates it
    "image": ("opacity", "blending", "colormap", "rgb"),
    "labels": ("opacity", "blending"),
}
DEFAULT_COLORS = (  # label 1, 2, ...: a qualitative palette (Tableau 10), then repeated
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)


def real_viewer(viewer: Any) -> Any:
    """The viewer itself: napari hands plugin widgets a proxy that wraps every object it returns anew."""
    return getattr(viewer, "__wrapped__", viewer)


def transform_meta(layer: Any) -> dict:
    """The layer's transform attributes as `data_to_world` reads them."""
    meta = {name: np.asarray(getattr(layer, name)) for name in TRANSFORM_ATTRS}
    meta["affine"] = np.asarray(layer.affine.affine_matrix)
    return meta


def check_volume_layer(layer: Any, kind: str = "image") -> None:
    """Raise `Ar3dInputError` unless `layer` holds a single-resolution 3D volume."""
    if layer is None:
        raise Ar3dInputError(f"no {kind} layer: open a CT / MRI volume (File > Open) or a sample "
                             "(File > Open Sample > napari-ar3d) and pick it in the widget")
    if getattr(layer, "multiscale", False):
        raise Ar3dInputError(f"{kind} layer {layer.name!r} is multiscale; napari-ar3d needs a single 3D volume")
    if getattr(layer, "rgb", False) or layer.data.ndim != 3:
        raise Ar3dInputError(
            f"{kind} layer {layer.name!r} has shape {tuple(layer.data.shape)}; napari-ar3d needs a 3D volume"
        )


def layer_volume(layer: Any, *, copy: bool = False) -> Volume:
    """The `Volume` (i, j, k) an image or labels layer shows; `copy` detaches it from the layer's data."""
    check_volume_layer(layer, "labels" if layer.__class__.__name__ == "Labels" else "image")
    data = np.array(layer.data, copy=True) if copy else np.asarray(layer.data)
    array, affine = from_napari(data, data_to_world(transform_meta(layer)))
    modality = (layer.metadata.get("ar3d") or {}).get("modality")
    return Volume(array, affine, path=layer.name, meta={"modality": modality} if modality else {})


def same_grid(a: Any, b: Any) -> bool:
    """True when two 3D layers have the same shape and the same data-to-world transform."""
    return tuple(a.data.shape) == tuple(b.data.shape) and np.allclose(
        data_to_world(transform_meta(a)), data_to_world(transform_meta(b)), atol=1e-3
    )


def aligned_kwargs(image: Any) -> dict:
    """Layer keyword arguments that put a new layer exactly on `image`: its transform and metadata."""
    kwargs = {name: np.array(getattr(image, name)) for name in TRANSFORM_ATTRS}
    kwargs["affine"] = np.array(image.affine.affine_matrix)
    kwargs["metadata"] = dict(image.metadata)
    return kwargs


def to_layer_data(array_ijk: np.ndarray) -> np.ndarray:
    """(I, J, K[, C]) core output -> (K, J, I[, C]) napari layer data (a view)."""
    return array_ijk.transpose(2, 1, 0, *range(3, array_ijk.ndim))


def show_output(viewer: Any, image: Any, kind: str, data: np.ndarray, name: str, **attrs: Any) -> Any:
    """Add the output layer `name` aligned with `image`, or update it in place if it is still in the viewer.

    kind: "image" or "labels"; attrs: display attributes (colormap, contrast_limits, blending...).
    An existing layer keeps its identity and the user's display choices (`USER_CHOICES`): its data
    is replaced, its transform re-copied from `image`, and what follows the data is set again
    (contrast limits; a labels layer's class names and colours).
    """
    if name in viewer.layers and viewer.layers[name].__class__.__name__.lower() == kind:
        layer = viewer.layers[name]
        for key, value in aligned_kwargs(image).items():
            setattr(layer, key, value)
        if kind == "image" and "contrast_limits" in attrs:
            # widen the range first so that new data never falls outside the allowed limits
            layer.contrast_limits_range = _span(data, attrs["contrast_limits"])
        layer.data = data
        for key, value in attrs.items():
            if key not in USER_CHOICES[kind]:
                setattr(layer, key, value)
        return layer
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, name=name, **aligned_kwargs(image), **attrs)


def _span(data: np.ndarray, limits: tuple[float, float]) -> tuple[float, float]:
    low, high = float(np.nanmin(data)), float(np.nanmax(data))
    low, high = min(low, limits[0]), max(high, limits[1])
    return (low, high) if high > low else (low, low + 1.0)


def percentile_limits(data: np.ndarray, low: float, high: float, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Contrast limits from percentiles of `data` (of `data[mask]` when given), never empty."""
    values = data[mask] if mask is not None and mask.any() else data.ravel()
    step = max(1, values.size // 2_000_000)  # a couple of million samples are plenty
    lo, hi = (float(v) for v in np.percentile(values[::step], [low, high]))
    return (lo, hi) if hi > lo else (lo, lo + 1e-6)


def class_colors(classes: list[str]) -> dict:
    """napari labels colormap for label values 1..K named `classes` (anatomical colours for known names)."""
    from model_core.data.phantoms import CT_CLASSES, CT_COLORS, MRI_CLASSES, MRI_COLORS

    known = {name: CT_COLORS[v] for v, name in CT_CLASSES.items()}
    known.update({name: MRI_COLORS[v] for v, name in MRI_CLASSES.items()})
    colors: dict = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for value, name in enumerate(classes, start=1):
        colors[value] = known.get(name, (*DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)], 1.0))
    return colors


def class_features(classes: list[str]) -> dict:
    """A labels layer's features table: one row per value, 0 = background."""
    return {"index": list(range(len(classes) + 1)), "class": ["background", *classes]}


def label_names(layer: Any) -> dict[int, str]:
    """Names of a labels layer's values from its features ("index"/"class") or metadata["ar3d"]["class_names"]."""
    names: dict[int, str] = {}
    geometry = layer.metadata.get("ar3d") or {}
    for value, name in (geometry.get("class_names") or {}).items():
        names[int(value)] = str(name)
    features = getattr(layer, "features", None)
    if features is not None and "class" in features and len(features):
        values = features["index"] if "index" in features else range(len(features))
        names.update({int(v): str(n) for v, n in zip(values, features["class"])})
    return names


def label_values(data: np.ndarray) -> list[int]:
    """The non-zero values in a labels array, ascending."""
    data = np.asarray(data)
    if data.dtype.kind in "ui" and data.size and int(data.min()) >= 0 and int(data.max()) < 1 << 16:
        counts = np.bincount(data.ravel())
        return [int(v) for v in np.flatnonzero(counts) if v]
    return [int(v) for v in np.unique(data) if v]
