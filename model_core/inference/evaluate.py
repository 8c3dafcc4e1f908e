"""Segmentation metrics per class: Dice and the 95th-percentile Hausdorff distance (HD95) in mm.

HD95 follows MONAI's `compute_hausdorff_distance(percentile=95)`: the distances from every
surface voxel of the prediction to the nearest surface voxel of the truth, and the other way
round; HD95 is the larger of the two 95th percentiles. Distances are in millimetres along the
voxel axes (the column norms of the affine), computed with scipy's Euclidean distance transform.

Conventions when a class is missing: absent from both -> Dice and HD95 are NaN (the class does
not count in means); absent from one -> Dice 0 and HD95 infinite.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from model_core.data.preprocess import as_label_array, voxel_spacing
from model_core.errors import Ar3dInputError
from model_core.io.volume import Volume, label_names_path, read_label_names, read_volume


@dataclass
class ClassScore:
    label: int
    dice: float
    hd95_mm: float
    truth_voxels: int
    pred_voxels: int


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total if total else math.nan


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a 6-neighbour outside it (the array border counts as outside)."""
    inner = ndi.binary_erosion(mask, structure=ndi.generate_binary_structure(3, 1), border_value=0)
    return mask & ~inner


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm of two boolean masks on a grid of `spacing` mm; NaN if both empty, inf if one is."""
    if not pred.any() and not truth.any():
        return math.nan
    if not pred.any() or not truth.any():
        return math.inf
    # Only the bounding box of both masks matters (plus one voxel, so the border is outside).
    both = np.argwhere(pred | truth)
    lo, hi = np.maximum(both.min(0) - 1, 0), both.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p = np.pad(pred[box], 1)
    t = np.pad(truth[box], 1)
    sp, st = _surface(p), _surface(t)
    to_truth = ndi.distance_transform_edt(~st, sampling=spacing)[sp]  # pred surface -> nearest truth surface
    to_pred = ndi.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def check_same_grid(pred: Volume, truth: Volume) -> None:
    """Raise `Ar3dInputError` naming both files when two volumes are not on one voxel grid."""
    if pred.shape != truth.shape or not np.allclose(pred.affine, truth.affine, atol=1e-3):
        raise Ar3dInputError(
            f"prediction {pred.path} (shape {pred.shape}, affine {np.round(pred.affine, 3).tolist()}) and "
            f"truth {truth.path} (shape {truth.shape}, affine {np.round(truth.affine, 3).tolist()}) "
            "are not on the same voxel grid"
        )


def evaluate_labels(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], labels: Sequence[int] | None = None
) -> list[ClassScore]:
    """Dice and HD95 of every label value (default: the non-zero values in either map)."""
    pred, truth = as_label_array(pred), as_label_array(truth)
    if pred.shape != truth.shape:
        raise Ar3dInputError(f"prediction of shape {pred.shape} and truth of shape {truth.shape} differ")
    if labels is None:
        labels = sorted((set(np.unique(pred).tolist()) | set(np.unique(truth).tolist())) - {0})
    scores = []
    for value in labels:
        p, t = pred == value, truth == value
        scores.append(ClassScore(int(value), dice(p, t), hd95(p, t, spacing), int(t.sum()), int(p.sum())))
    return scores


def evaluate_volumes(pred: Volume, truth: Volume, labels: Sequence[int] | None = None) -> list[ClassScore]:
    """`evaluate_labels` of two label volumes on the same grid; `labels` must occur in one of them."""
    check_same_grid(pred, truth)
    pred_labels, truth_labels = as_label_array(pred.array, pred.path), as_label_array(truth.array, truth.path)
    if labels is not None:
        found = set(np.unique(pred_labels).tolist()) | set(np.unique(truth_labels).tolist())
        missing = [v for v in labels if v not in found]
        if missing:
            raise Ar3dInputError(
                f"label value(s) {', '.join(map(str, missing))} occur in neither {pred.path} nor {truth.path}"
            )
    return evaluate_labels(pred_labels, truth_labels, voxel_spacing(truth.affine), labels)


def truth_by_name(
    truth: np.ndarray,
    truth_names: dict[int, str],
    pred_names: dict[int, str],
    merge: dict[str, Sequence[int]] | None = None,
) -> tuple[np.ndarray, list[int], list[str]]:
    """The truth renumbered to the prediction's label values by class name, for maps numbered differently.

    merge: class name -> truth values joined into it first (e.g. {"vertebrae": [26, 27, ..., 33]}).
    Returns (truth with the prediction's values, the prediction's values that have a truth class,
    the prediction's class names that have none). Truth classes the prediction lacks become 0.
    """
    by_name = {name: [value] for value, name in truth_names.items()}
    by_name.update({name: [int(v) for v in values] for name, values in (merge or {}).items()})
    size = max([int(truth.max()), *(v for values in by_name.values() for v in values)]) + 1
    lut = np.zeros(size, dtype=np.uint16)
    matched, missing = [], []
    for value, name in sorted(pred_names.items()):
        if name in by_name:
            lut[by_name[name]] = value
            matched.append(value)
        else:
            missing.append(name)
    return lut[as_label_array(truth)], matched, missing


def mean_dice(scores: Sequence[ClassScore]) -> float:
    """Mean Dice over the classes present in the prediction or the truth (NaN if none)."""
    values = [s.dice for s in scores if not math.isnan(s.dice)]
    return float(np.mean(values)) if values else math.nan


@dataclass
class Evaluation:
    """The scores of a label map against a reference, with the class names they were paired by."""

    scores: list[ClassScore]
    names: dict[int, str]  # label value -> class name (the prediction's with `by_name`, else the truth's)
    unmatched: list[str]  # with `by_name`: the prediction's classes that have no truth class of that name


def evaluate_files(
    pred_path: str | os.PathLike,
    truth_path: str | os.PathLike,
    labels: Sequence[int] | None = None,
    *,
    by_name: bool = False,
    merge: dict[str, Sequence[int]] | None = None,
) -> Evaluation:
    """Dice and HD95 per class of the label map `pred_path` against `truth_path` (on the same grid).

    labels: the values to score (default every non-zero value found). by_name: pair the classes by
    the names beside each file (`<name>.labels.json` or `labels.json`), for maps that number them
    differently; merge: truth values joined into one class first (only with `by_name`).
    """
    if merge and not by_name:
        raise Ar3dInputError("--merge joins truth classes for --by-name; add --by-name")
    pred, truth = read_volume(pred_path), read_volume(truth_path)
    truth_names = read_label_names(truth_path)
    if not by_name:
        return Evaluation(evaluate_volumes(pred, truth, labels), truth_names, [])
    names = read_label_names(pred_path)
    for path, found in ((pred_path, names), (truth_path, truth_names)):
        if not found:
            raise Ar3dInputError(f"--by-name needs class names beside the file ({label_names_path(path).name} "
                                 "or labels.json)", path)
    truth.array, matched, unmatched = truth_by_name(truth.array, truth_names, names, merge)
    if not matched:
        raise Ar3dInputError(f"no class of {pred_path} ({', '.join(names.values())}) has a namesake in "
                             f"{truth_path} ({', '.join(truth_names.values())}); --merge can join truth classes")
    labels = [v for v in matched if labels is None or v in labels]
    return Evaluation(evaluate_volumes(pred, truth, labels), names, unmatched)
