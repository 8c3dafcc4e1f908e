"""`ar3d demo`: the built-in default job, on a procedural CT phantom.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model_core.io.volume import (
    read_label_names,
    read_volume,
    voxel_to_world,
    world_to_voxel,
    write_label_names,
    write_volume,
)
from model_core.progress import ProgressFn, report
from model_core.vocabulary import DEFAULT_ENCODER, DEFAULT_SEGMENTER

if TYPE_CHECKING:
    from model_core.checkpoint.config import CheckpointConfig

EXPLAIN_MAPS = ("attention", "prediction", "surprise")  # the PCA map is left out: slow, and 4D in napari


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
