"""`ar3d demo`: the built-in default job, on a real CT (default) or on a procedural CT phantom.

On the real scan (`run_scan_demo`), the headline workflow with a simulated user:
1. Copy TotalSegmentator's example CT and its silver labels (shipped as package data of
   `napari_ar3d.sample_data`, Apache-2.0) into the output folder.
2. Paint strokes as a user would, on three slices of one organ (liver or spleen): the organ's
   skeleton in each slice as object, a ring 4-6 mm outside it as background (`initial_strokes`).
3. Segment the volume live with `model_core.inference.scribble.ScribbleSession` (the shipped encoder's
   features computed once), then correct it round by round: each round a stroke on the largest
   3D error region's largest slice with the right label (`correction`); Dice against the silver
   labels and the seconds of each update are recorded.
4. Explain the scan with the shipped encoder (attention from an organ voxel, prediction, surprise).

On the phantom (`run_demo`):
1. Generate a CT phantom (`make_ct_abdomen(seed)`), write it and its true labels as NIfTI, read
   both back through `model_core.io.volume` and check that they share one geometry.
2. Segment it with the shipped segmenter `ar3d-ct-organs` (`model_core.inference.segment`, as `ar3d segment`).
3. Explain it with the shipped encoder `ar3d-encoder` (`model_core.inference.explain.explain`, as
   `ar3d explain`): attention from a liver voxel, next-token prediction and surprise.
4. Score the segmentation against the phantom's true labels: Dice per class, matched by name.

Every file goes into one folder; `DemoResult.files` says where each is.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib.resources import files as package_files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.ndimage as ndi

from model_core.errors import Ar3dInputError
from model_core.io.volume import (
    read_label_names,
    read_volume,
    voxel_to_world,
    world_to_voxel,
    write_label_names,
    write_volume,
)
from model_core.progress import ProgressFn, report
from model_core.vocabulary import DEFAULT_ENCODER, DEFAULT_SEGMENTER, DEMO_ORGANS

if TYPE_CHECKING:
    from model_core.checkpoint.config import CheckpointConfig

EXPLAIN_MAPS = ("attention", "prediction", "surprise")  # the PCA map is left out: slow, and 4D in napari
OBJECT, BACKGROUND = 2, 1  # the simulated user's painted values
SAMPLE_CREDIT = "TotalSegmentator's example CT (Wasserthal et al., Apache-2.0), silver labels"


@dataclass
class DemoResult:
    out_dir: Path
    files: dict[str, Path]  # name -> written file
    summary: dict  # what was checked, for the printout and the tests (a pure function of the seed)
    dice: dict[str, float] = field(default_factory=dict)  # class name -> Dice against the phantom's truth
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def write_phantom(out_dir: str | Path, *, seed: int = 0, progress: ProgressFn = None) -> DemoResult:
    """Generate the CT phantom into `out_dir`, read it back and verify its geometry (step 1)."""
    from model_core.data.phantoms import make_ct_abdomen

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report(progress, 0, 2, "generating the CT phantom")
    phantom = make_ct_abdomen(seed=seed)
    files = {
        "image": write_volume(out_dir / "ct_phantom.nii.gz", phantom.images["ct"], phantom.affine, kind="float"),
        "truth": write_volume(out_dir / "ct_phantom_labels.nii.gz", phantom.labels, phantom.affine, kind="labels"),
    }
    names = {int(k): v for k, v in phantom.class_names.items()}
    files["truth_names"] = write_label_names(files["truth"], names)

    report(progress, 1, 2, "reading back and checking geometry")
    image, labels = read_volume(files["image"]), read_volume(files["truth"])
    if not np.array_equal(labels.array, phantom.labels):
        raise RuntimeError("labels changed in the round trip through NIfTI")
    if not np.allclose(image.affine, labels.affine, atol=1e-5):
        raise RuntimeError("image and labels were written with different geometry")
    liver = np.argwhere(labels.array == 1)  # (N, 3) voxel indices
    centroid = liver.mean(axis=0)
    liver_world = voxel_to_world(image.affine, centroid)
    back = world_to_voxel(labels.affine, liver_world)
    query = liver[np.argmin(np.linalg.norm(liver - centroid, axis=1))]  # the liver voxel nearest its centroid
    summary = {
        "seed": seed,
        "shape": list(image.shape),
        "spacing_mm": [round(float(s), 3) for s in image.spacing],
        "orientation": image.orientation,
        "classes": {k: v for k, v in names.items() if k},
        "liver_centroid_ras_mm": [round(float(v), 1) for v in liver_world],
        "liver_on_patient_right": bool(liver_world[0] > 0),
        "world_to_voxel_error": float(np.abs(back - centroid).max()),
        "liver_query_ijk": [int(v) for v in query],
    }
    report(progress, 2, 2, "reading back and checking geometry")
    return DemoResult(out_dir, files, summary)


def class_dice(
    pred: np.ndarray, pred_classes: list[str], truth: np.ndarray, truth_names: dict[int, str]
) -> dict[str, float]:
    """Dice of each predicted class (value k = pred_classes[k-1]) against the truth value of the same name."""
    from model_core.inference.evaluate import dice, truth_by_name

    truth, matched, _ = truth_by_name(truth, truth_names, dict(enumerate(pred_classes, start=1)))
    return {pred_classes[k - 1]: round(dice(pred == k, truth == k), 4) for k in matched}


def training_phantom_seeds(config: CheckpointConfig) -> set[int]:
    """Seeds of the CT phantoms a model was fine-tuned on, as the "cases" of its provenance list them
    ({"phantom_100/101": {"split": "train", ...}}; data files are recorded by name only)."""
    cases = config.provenance.extra.get("cases")
    seeds: set[int] = set()
    for name, case in cases.items() if isinstance(cases, dict) else ():
        match = re.fullmatch(r"phantom_(\d+(?:/\d+)*)", name)
        if match and isinstance(case, dict) and case.get("split") == "train":
            seeds |= {int(s) for s in match.group(1).split("/")}
    return seeds


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    segmenter: str = DEFAULT_SEGMENTER,
    explainer: str = DEFAULT_ENCODER,
    device: str = "auto",
    progress: ProgressFn = None,
) -> DemoResult:
    """Write a CT phantom into `out_dir`, segment it, explain it and score the segmentation.

    segmenter: a segmentation model (shipped name or folder); explainer: an AR-pretrained encoder.
    progress: reports of each stage (messages: phantom, "segmenting", then the explain maps).
    """
    from model_core.inference.explain import explain
    from model_core.inference.segment import load_segmenter, segment

    t0 = time.perf_counter()
    result = write_phantom(out_dir, seed=seed, progress=progress)
    out, files, timings = result.out_dir, result.files, result.timings
    timings["phantom"] = time.perf_counter() - t0

    t = time.perf_counter()
    model = load_segmenter(segmenter)
    image = read_volume(files["image"])
    seg = segment(model, image, device=device, progress=progress)
    files["segmentation"] = write_volume(out / "ct_phantom_seg.nii.gz", seg.labels, image.affine, kind="labels",
                                         like=image)
    files["segmentation_names"] = write_label_names(files["segmentation"], dict(enumerate(seg.classes, 1)))
    files["uncertainty"] = write_volume(out / "ct_phantom_uncertainty.nii.gz", seg.uncertainty, image.affine,
                                        kind="float", like=image)
    timings["segment"] = time.perf_counter() - t

    t = time.perf_counter()
    maps = explain(explainer, files["image"], out / "explain", query_ijk=result.summary["liver_query_ijk"],
                   maps=EXPLAIN_MAPS, device=device, progress=progress)
    files.update({name: maps[name] for name in EXPLAIN_MAPS})
    timings["explain"] = time.perf_counter() - t

    truth = read_volume(files["truth"]).array
    truth_names = read_label_names(files["truth"])
    result.dice = class_dice(seg.labels, seg.classes, truth, truth_names)
    files["dice"] = out / "dice.json"
    files["dice"].write_text(json.dumps({"segmenter": segmenter, "seed": seed, "dice": result.dice}, indent=1))
    result.summary["seed_in_training_data"] = seed in training_phantom_seeds(model.config)
    timings["total"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the real scan


def shipped_ct() -> Path:
    """The folder of the shipped CT sample (image.nii.gz, seg.nii.gz, labels.json): package data of
    `napari_ar3d.sample_data`, found without importing the plugin's code (its `__init__` is a docstring)."""
    return Path(str(package_files("napari_ar3d.sample_data").joinpath("files", "totalseg_ct")))


def stroke_axis(spacing: np.ndarray) -> int:
    """The axis a user paints across: the coarsest one, the last on ties."""
    return int(max(range(3), key=lambda a: (round(float(spacing[a]), 3), a)))


def _plane(axis: int, k: int) -> tuple:
    return tuple(k if a == axis else slice(None) for a in range(3))


def _skeleton(mask2d: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize

    return skeletonize(mask2d) if mask2d.any() else mask2d


def initial_strokes(truth: np.ndarray, spacing: np.ndarray, axis: int) -> tuple[np.ndarray, list[int]]:
    """Strokes on 3 slices through the object (its 25th, 50th, 75th percentile along `axis`): the object's
    skeleton as OBJECT, a ring 4-6 mm outside it as BACKGROUND. Returns (uint8 map like truth, slices)."""
    scribbles = np.zeros(truth.shape, dtype=np.uint8)
    coords = np.nonzero(truth)[axis]
    in_plane = [float(spacing[a]) for a in range(3) if a != axis]
    slices = [int(np.percentile(coords, q, method="nearest")) for q in (25, 50, 75)]
    for k in slices:
        mask = truth[_plane(axis, k)]
        distance = ndi.distance_transform_edt(~mask, sampling=in_plane)  # mm to the object
        plane = scribbles[_plane(axis, k)]
        plane[(distance >= 4) & (distance <= 6)] = BACKGROUND
        plane[_skeleton(mask)] = OBJECT
    return scribbles, slices


def correction(scribbles: np.ndarray, pred: np.ndarray, truth: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """The next round's strokes (a new array): on the largest 3D error region's largest slice, the skeleton of
    its section, painted BACKGROUND for a false positive, OBJECT for a false negative; and that slice."""
    best = None
    for wrong, value in ((pred & ~truth, BACKGROUND), (~pred & truth, OBJECT)):
        regions, n = ndi.label(wrong)
        if n:
            sizes = np.bincount(regions.ravel())[1:]
            if best is None or sizes.max() > best[0]:
                best = (int(sizes.max()), regions == 1 + int(sizes.argmax()), value)
    out = scribbles.copy()
    if best is None:
        return out, -1
    _, region, value = best
    k = int(region.sum(axis=tuple(a for a in range(3) if a != axis)).argmax())
    section = region[_plane(axis, k)]
    stroke = _skeleton(section)
    out[_plane(axis, k)][stroke if stroke.any() else section] = value
    return out, k


def demo_settings():
    """The scribble session's settings in the demo: the widget's, with fewer training steps, so that the
    whole demo stays near a minute on a 2-core CPU."""
    from model_core.inference.scribble import ScribbleSettings

    return ScribbleSettings(steps_first=60, steps_warm=25)


def _copy_sample(out: Path, organ: str) -> tuple[dict[str, Path], dict[int, str], int]:
    """Copy the shipped CT and its silver labels into `out`; (files, label names, the organ's label value)."""
    sample = shipped_ct()
    names = {int(k): v for k, v in json.loads((sample / "labels.json").read_text()).items()}
    value = next((k for k, v in names.items() if v == organ), None)
    if organ not in DEMO_ORGANS or value is None:
        raise Ar3dInputError(f"the demo segments one of {', '.join(DEMO_ORGANS)}, not {organ!r}")
    files = {"image": out / "ct.nii.gz", "truth": out / "ct_silver_labels.nii.gz"}
    shutil.copyfile(sample / "image.nii.gz", files["image"])
    shutil.copyfile(sample / "seg.nii.gz", files["truth"])
    files["truth_names"] = write_label_names(files["truth"], names)
    return files, names, value


def run_scan_demo(
    out_dir: str | Path,
    *,
    organ: str = "liver",
    corrections: int = 3,
    encoder: str = DEFAULT_ENCODER,
    device: str = "auto",
    progress: ProgressFn = None,
) -> DemoResult:
    """Segment `organ` of the shipped real CT from simulated strokes, correct it `corrections` times, explain it.

    `summary["rounds"]`: one entry per update (0 = the three first slices), with the slice painted,
    the Dice against the silver labels and the update's seconds (training and predicting the volume).
    """
    from model_core.inference.evaluate import dice
    from model_core.inference.explain import explain
    from model_core.inference.scribble import ScribbleSession

    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "explain").mkdir(parents=True, exist_ok=True)
    files, names, value = _copy_sample(out, organ)
    image, labels = read_volume(files["image"]), read_volume(files["truth"])
    truth = np.rint(labels.array).astype(np.int64) == value  # (I, J, K)
    axis = stroke_axis(image.spacing)
    scribbles, first_slices = initial_strokes(truth, image.spacing, axis)
    result = DemoResult(out, files, {"organ": organ, "shape": list(image.shape), "axis": axis,
                                     "spacing_mm": [round(float(s), 3) for s in image.spacing],
                                     "orientation": image.orientation, "rounds": []})
    timings = result.timings
    timings["read"] = time.perf_counter() - t0

    t = time.perf_counter()
    session = ScribbleSession(image, encoder, settings=demo_settings(), device=device, cache=False, progress=progress)
    timings["features"] = time.perf_counter() - t
    painted = first_slices
    for round_ in range(corrections + 1):
        t = time.perf_counter()
        pred = session.update(scribbles, BACKGROUND, progress=progress)
        seconds = time.perf_counter() - t
        mask = pred.labels == OBJECT
        result.summary["rounds"].append({"round": round_, "slices": painted, "dice": round(dice(mask, truth), 4),
                                         "seconds": round(seconds, 2)})
        if round_ < corrections:
            scribbles, k = correction(scribbles, mask, truth, axis)
            painted = [k]
    timings["updates"] = sum(r["seconds"] for r in result.summary["rounds"])
    _write_scan_outputs(result, image, scribbles, pred, organ)

    t = time.perf_counter()
    centre = np.argwhere(truth)
    query = centre[np.argmin(np.linalg.norm(centre - centre.mean(0), axis=1))]  # the organ voxel nearest its centroid
    result.summary["query_ijk"] = [int(v) for v in query]
    maps = explain(encoder, files["image"], out / "explain", query_ijk=result.summary["query_ijk"],
                   maps=EXPLAIN_MAPS, device=device, progress=progress)
    files.update({name: maps[name] for name in EXPLAIN_MAPS})
    timings["explain"] = time.perf_counter() - t
    result.dice = {organ: result.summary["rounds"][-1]["dice"]}
    files["dice"] = out / "dice.json"
    files["dice"].write_text(json.dumps({"sample": SAMPLE_CREDIT, "organ": organ, "labels": "silver",
                                         "rounds": result.summary["rounds"]}, indent=1))
    timings["total"] = time.perf_counter() - t0
    return result


def _write_scan_outputs(result: DemoResult, image, scribbles: np.ndarray, pred, organ: str) -> None:
    """The final strokes, segmentation (with class names) and uncertainty, on the image's grid."""
    out, files = result.out_dir, result.files
    files["scribbles"] = write_volume(out / "ct_scribble_labels.nii.gz", scribbles, image.affine, kind="labels",
                                      like=image)
    files["scribbles_names"] = write_label_names(files["scribbles"], {BACKGROUND: "background", OBJECT: organ})
    seg = (pred.labels == OBJECT).astype(np.uint8)
    files["segmentation"] = write_volume(out / f"ct_{organ}_seg.nii.gz", seg, image.affine, kind="labels", like=image)
    files["segmentation_names"] = write_label_names(files["segmentation"], {1: organ})
    files["uncertainty"] = write_volume(out / f"ct_{organ}_uncertainty.nii.gz", pred.uncertainty, image.affine,
                                        kind="float", like=image)
