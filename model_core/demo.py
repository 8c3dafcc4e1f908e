"""`ar3d demo`: the built-in default job, on a procedural CT phantom.

It writes the phantom CT and its labels as NIfTI, reads both back through `model_core.io`, checks
that they share one geometry, and tells where the files are and how to open them in napari.
Later stages of the project (segment, explain) add their outputs to the same folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import read_volume, voxel_to_world, world_to_voxel, write_volume
from .progress import ProgressFn, report


@dataclass
class DemoResult:
    out_dir: Path
    files: dict[str, Path]  # name -> written file
    summary: dict  # what was checked, for the printout and the tests


def run_demo(out_dir: str | Path, *, seed: int = 0, progress: ProgressFn = None) -> DemoResult:
    """Generate the CT phantom into `out_dir`, read it back and verify its geometry."""
    from napari_ar3d.sample_data.phantoms import make_ct_abdomen

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 3
    report(progress, 0, steps, "generating the CT phantom")
    phantom = make_ct_abdomen(seed=seed)

    report(progress, 1, steps, "writing NIfTI files")
    files = {
        "image": write_volume(out_dir / "ct_phantom.nii.gz", phantom.images["ct"], phantom.affine, kind="float"),
        "labels": write_volume(out_dir / "ct_phantom_labels.nii.gz", phantom.labels, phantom.affine, kind="labels"),
    }
    names = {int(k): v for k, v in phantom.class_names.items()}
    files["class_names"] = out_dir / "ct_phantom_labels.json"
    files["class_names"].write_text(json.dumps(names, indent=1))

    report(progress, 2, steps, "reading back and checking geometry")
    image, labels = read_volume(files["image"]), read_volume(files["labels"])
    if not np.array_equal(labels.array, phantom.labels):
        raise RuntimeError("labels changed in the round trip through NIfTI")
    if not np.allclose(image.affine, labels.affine, atol=1e-5):
        raise RuntimeError("image and labels were written with different geometry")
    liver = np.argwhere(labels.array == 1).mean(axis=0)
    liver_world = voxel_to_world(image.affine, liver)
    back = world_to_voxel(labels.affine, liver_world)
    summary = {
        "shape": list(image.shape),
        "spacing_mm": [round(float(s), 3) for s in image.spacing],
        "orientation": image.orientation,
        "classes": {k: v for k, v in names.items() if k},
        "liver_centroid_ras_mm": [round(float(v), 1) for v in liver_world],
        "liver_on_patient_right": bool(liver_world[0] > 0),
        "world_to_voxel_error": float(np.abs(back - liver).max()),
    }
    report(progress, 3, steps, "done")
    return DemoResult(out_dir, files, summary)
