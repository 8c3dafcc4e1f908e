"""Geometry and intensity preprocessing: RAS orientation, resampling, per-modality normalisation.

Every function takes and returns plain numpy arrays in voxel index order `(i, j, k)` with a 4x4
affine that maps `(i, j, k, 1)` to RAS+ millimetres (see `model_core.io.volume.Volume`). The model sees
volumes that went through `preprocess_volume`: intensities in [0, 1], axes reoriented to RAS
(exact flips and transposes), voxels resampled to the model spacing. `resample_to_grid` puts model
outputs back onto any input grid, oblique ones included.

Pure numpy / scipy / nibabel: no torch, napari or Qt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.ndimage as ndi
from nibabel.orientations import (
    apply_orientation,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from model_core.errors import Ar3dInputError
from model_core.io.volume import check_labels
from model_core.vocabulary import CT_FULL_HU, INTENSITY_KINDS, MODEL_SPACING

_RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]])  # axis n runs along world axis n, increasing
_CT_AIR_HU = -500.0  # voxels at or below this are air in a CT; MRI intensities never go this low
_CT_AIR_FRACTION = 0.01  # a CT has at least 1% air voxels (outside the body, lungs, bowel gas)
_MRI_BACKGROUND_FRACTION = 0.05  # a constant minimum on this share of the voxels is an MRI's air (see mri_background)


# ---------------------------------------------------------------- geometry


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis: the column norms of the affine."""  # (3,)
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip and transpose the axes so that i, j, k run along R, A, S; exact, no interpolation.

    Every voxel keeps its world position. An oblique affine is brought to the closest RAS axes
    (nibabel's `io_orientation`); the remaining rotation stays in the returned affine.
    """
    array, affine = _check_grid(array, affine)
    transform = ornt_transform(io_orientation(affine), _RAS_ORNT)
    out = np.ascontiguousarray(apply_orientation(array, transform))
    return out, affine @ inv_ornt_aff(transform, array.shape)


def resample_to_spacing(
    array: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float] | float, *, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resample to voxels of `spacing` mm along each array axis, keeping the world centre of the grid.

    The new shape is `round(shape * old_spacing / spacing)` (at least 1); the axis directions are
    kept. `order=1` (trilinear) for images, `order=0` (nearest) for labels, whose dtype is kept;
    images of integer type come back as float32. Voxel centres within half a voxel of the border
    take the border value. No anti-aliasing filter is applied (as MONAI `Spacing`), so training
    and inference see volumes made the same way.
    """
    array, affine = _check_grid(array, affine)
    spacing = _check_spacing(spacing)
    old_spacing = voxel_spacing(affine)
    shape = np.array(array.shape, dtype=np.float64)
    new_shape = np.maximum(1, np.round(shape * old_spacing / spacing)).astype(int)
    scale = spacing / old_spacing  # input voxels per output voxel, per axis
    offset = (shape - 1) / 2 - scale * (new_shape - 1) / 2  # output voxel 0 in input voxels
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale  # scale column n by scale[n]
    new_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    if np.array_equal(new_shape, array.shape) and np.allclose(scale, 1.0):
        return array.copy(), affine.copy()
    if order > 0 and array.dtype.kind != "f":
        array = array.astype(np.float32)
    out = ndi.affine_transform(array, scale, offset=offset, output_shape=tuple(new_shape), order=order, mode="nearest")
    return out, new_affine


def resample_to_grid(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    *,
    order: int,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample `array` (on the grid of `src_affine`) at the voxel centres of another grid.

    The grids may differ in orientation, spacing, extent, even be oblique to each other: each
    destination voxel is mapped through world space to a source position. Positions within half a
    source voxel of the source grid take the nearest border value; farther out they get `cval`.
    `order=1` for images and probabilities, `order=0` for labels (dtype kept).
    """
    array, src_affine = _check_grid(array, src_affine)
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    dst_shape = tuple(int(n) for n in dst_shape)
    if dst_affine.shape != (4, 4) or len(dst_shape) != 3 or min(dst_shape) < 1:
        raise ValueError(f"destination grid must be a 3D shape and a 4x4 affine, got {dst_shape}, {dst_affine.shape}")
    if order > 0 and array.dtype.kind != "f":
        array = array.astype(np.float32)
    to_src = np.linalg.inv(src_affine) @ dst_affine  # destination voxel -> source voxel
    matrix, offset = to_src[:3, :3], to_src[:3, 3]
    if np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0:
        matrix = np.diag(matrix)  # axis-aligned: scipy takes its faster zoom-and-shift path
    out = ndi.affine_transform(array, matrix, offset=offset, output_shape=dst_shape, order=order, mode="nearest")
    # Nearest-neighbour sampling of a ones-array marks destination voxels within half a voxel of the source grid.
    ones = np.ones(array.shape, dtype=np.uint8)
    inside = ndi.affine_transform(ones, matrix, offset=offset, output_shape=dst_shape, order=0, mode="grid-constant")
    out[inside == 0] = cval
    return out


def _check_grid(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"expected an invertible 4x4 affine, got {affine.tolist()}")
    return array, affine


def _check_spacing(spacing: tuple[float, float, float] | float) -> np.ndarray:
    values = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise Ar3dInputError(f"spacing must be three positive millimetre values, got {spacing!r}")
    return values


# ---------------------------------------------------------------- intensity


@dataclass
class IntensityConfig:
    """How raw intensities become ~[0, 1].

    CT: clip to the Hounsfield `window`, then scale it to [0, 1].
    MRI: scale the `percentiles` of the non-zero voxels to [0, 1], then clip to [0, 1].
    """

    kind: str  # "ct" | "mri"
    window: tuple[float, float] = CT_FULL_HU  # HU
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.kind not in INTENSITY_KINDS:
            raise Ar3dInputError(f"intensity kind must be one of {INTENSITY_KINDS}, got {self.kind!r}")
        self.window = (float(self.window[0]), float(self.window[1]))
        self.percentiles = (float(self.percentiles[0]), float(self.percentiles[1]))
        if not self.window[0] < self.window[1]:
            raise Ar3dInputError(f"CT window must be (low, high) with low < high, got {self.window}")
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise Ar3dInputError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "window": list(self.window), "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntensityConfig:
        return cls(**_known_keys(cls, d, "intensity"))


def mri_background(x: np.ndarray) -> float:
    """The background value of an MRI: its minimum when at least 5% of the voxels hold it, else 0.

    Raw scans store the air as 0; skull-stripped scans z-scored inside the brain (BraTS-style) store
    it as one negative constant, which would otherwise count as foreground and pull the percentiles.
    """
    low = float(x.min())
    if low != 0 and np.count_nonzero(x == low) >= _MRI_BACKGROUND_FRACTION * x.size:
        return low
    return 0.0


def normalize_intensity(array: np.ndarray, cfg: IntensityConfig, *, source: str | None = None) -> np.ndarray:
    """Map raw intensities to float32 in [0, 1] by `cfg` (a new array; the input is untouched).

    NaN and +-Inf voxels are first replaced by the minimum of the finite voxels (background in CT
    and MRI alike). A volume with no finite voxel raises `Ar3dInputError` naming `source`.
    MRI: percentiles are taken over the voxels that are not background (`mri_background`: zero, or
    the constant a skull-stripped, z-scored scan stores in its air); when they coincide (one
    foreground value) the volume's min..max is used, and a constant volume gives zeros.
    """
    x = np.array(array, dtype=np.float32)  # a copy
    finite = np.isfinite(x)
    if not finite.all():
        if not finite.any():
            raise Ar3dInputError("image has no finite voxel (all NaN or infinite)", source)
        x[~finite] = x[finite].min()
    if cfg.kind == "ct":
        low, high = cfg.window
    else:
        foreground = x[x != mri_background(x)]
        low, high = np.percentile(foreground, cfg.percentiles) if foreground.size else (0.0, 0.0)
        if high <= low:
            low, high = float(x.min()), float(x.max())
        if high <= low:
            return np.zeros_like(x)
    low, high = np.float32(low), np.float32(high)  # float32 arithmetic: the window's ends map to exactly 0 and 1
    np.clip(x, low, high, out=x)
    x -= low
    x /= high - low
    return x


def guess_modality(array: np.ndarray, hint: str | None = None) -> str:
    """"ct" or "mri" for a volume.

    `hint` is a free-text modality, e.g. a manifest's "CT, 3 mm" or a DICOM Modality tag "MR":
    the word CT gives "ct", MR or MRI gives "mri" (case-insensitive, whole words). Without a usable
    hint: "ct" when at least 1% of the voxels are at or below -500 (air in Hounsfield units),
    else "mri".
    """
    if hint:
        if re.search(r"\bct\b", hint, re.IGNORECASE):
            return "ct"
        if re.search(r"\bmri?\b", hint, re.IGNORECASE):
            return "mri"
    sample = np.asarray(array)[::2, ::2, ::2]
    return "ct" if np.mean(sample <= _CT_AIR_HU) >= _CT_AIR_FRACTION else "mri"


# ---------------------------------------------------------------- the whole path


@dataclass
class PreprocessConfig:
    """The model's input convention; saved in a checkpoint's config.json."""

    spacing: tuple[float, float, float] = MODEL_SPACING  # mm along R, A, S
    intensity: IntensityConfig | None = None  # None: per volume, IntensityConfig(guess_modality(...))

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in _check_spacing(self.spacing))
        if isinstance(self.intensity, dict):
            self.intensity = IntensityConfig.from_dict(self.intensity)

    def intensity_for(self, kind: str) -> IntensityConfig:
        """The intensity config for a volume of modality `kind` ("ct" | "mri")."""
        return self.intensity if self.intensity is not None else IntensityConfig(kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "intensity": None if self.intensity is None else self.intensity.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        return cls(**_known_keys(cls, d, "preprocess"))


@dataclass
class Preprocessed:
    """A volume as the model sees it, with what is needed to map outputs back."""

    array: np.ndarray  # (X, Y, Z) float32 in [0, 1], axes along R, A, S, at the model spacing
    affine: np.ndarray  # (4, 4) RAS+ affine of `array`
    modality: str  # "ct" | "mri"
    labels: np.ndarray | None  # (X, Y, Z) integer labels on the same grid, or None
    source_shape: tuple[int, int, int]  # grid of the input volume
    source_affine: np.ndarray = field(repr=False)  # (4, 4)

    def to_source(self, array: np.ndarray, *, order: int, cval: float = 0.0) -> np.ndarray:
        """Resample a map on this grid (probabilities: order 1, labels: order 0) onto the input grid."""
        return resample_to_grid(array, self.affine, self.source_shape, self.source_affine, order=order, cval=cval)


def preprocess_volume(
    image: Any,
    cfg: PreprocessConfig,
    *,
    affine: np.ndarray | None = None,
    modality: str | None = None,
    labels: np.ndarray | None = None,
    source: str | None = None,
) -> Preprocessed:
    """Normalise intensities, reorient to RAS and resample to `cfg.spacing`.

    `image` is a `model_core.io.volume.Volume` or a 3D array with its `affine`. `modality` is a hint for
    `guess_modality` (used when `cfg.intensity` is None). `labels`, on the image's grid, go through
    the same reorientation and resampling with nearest-neighbour interpolation; they must be whole
    numbers in 0..65535 (`model_core.io.volume.check_labels`). `source` names the file in error messages
    (default: the Volume's path).
    """
    if hasattr(image, "array") and hasattr(image, "affine"):
        array, affine = image.array, image.affine
        source = source or getattr(image, "path", None)
        modality = modality or (getattr(image, "meta", None) or {}).get("modality")
    else:
        array = image
        if affine is None:
            raise ValueError("preprocess_volume needs `affine` when `image` is an array")
    array = np.asarray(array)
    if array.ndim != 3:
        raise Ar3dInputError(f"image has shape {array.shape}; napari-ar3d needs a 3D volume", source)
    kind = cfg.intensity.kind if cfg.intensity is not None else guess_modality(array, modality)
    x = normalize_intensity(array, cfg.intensity_for(kind), source=source)
    x, ras_affine = reorient_to_ras(x, affine)
    x, out_affine = resample_to_spacing(x, ras_affine, cfg.spacing, order=1)
    out_labels = None
    if labels is not None:
        out_labels = as_label_array(labels, source)
        if out_labels.shape != array.shape:
            raise Ar3dInputError(f"labels have shape {out_labels.shape} but the image has shape {array.shape}", source)
        out_labels, _ = reorient_to_ras(out_labels, affine)
        out_labels, _ = resample_to_spacing(out_labels, ras_affine, cfg.spacing, order=0)
    return Preprocessed(x, out_affine, kind, out_labels, tuple(array.shape), np.asarray(affine, dtype=np.float64))


def as_label_array(labels: np.ndarray, source: str | None = None) -> np.ndarray:
    """Integer label map (uint8 / uint16) after `model_core.io.volume.check_labels`: whole numbers in 0..65535."""
    return check_labels(labels, source)


def _known_keys(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise Ar3dInputError(f"unknown {what} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(d)
