"""Scribble segmentation with a simulated user: ours (shipped and random encoder) against an ilastik-style forest.

The simulated user paints on slices across the image's coarsest axis (the last axis on ties):
- first, 3 slices through the object (at the 25th, 50th and 75th percentile of its voxels along
  that axis): the object's 2D skeleton in each as object, and a ring 4-6 mm outside it as
  background (painted value 2 for the object, 1 for background);
- then 5 corrective rounds: after each update, the largest 3D connected region of false positives
  or false negatives; on its largest slice, the skeleton of its 2D section, painted with the right
  label (background for a false positive, object for a false negative).
By default every method gets the same strokes: each round's correction is computed from the
prediction of the first method listed (ours with the shipped encoder), then replayed to the others;
with `--own-corrections` each method's corrections target its own errors.

Methods (each trains on the painted voxels only, then predicts the whole volume):
- `ours`: `ScribbleSession` with the shipped encoder (`ar3d-encoder`), light decoder warm-started;
- `ours-random`: the same with a randomly initialised encoder of the same size (seed 0);
- `forest`: an ilastik-style pixel classifier: scikit-learn RandomForestClassifier (100 trees) on
  ilastik's default filter bank at sigma 0.7, 1.0, 1.6, 3.5, 5.0 voxels (Gaussian smoothing,
  Laplacian of Gaussian, Gaussian gradient magnitude, structure-tensor eigenvalues, Hessian of
  Gaussian eigenvalues: 45 features) plus the raw intensity; features computed once per image.

Reported per case and method: Dice after the first update and after each corrective round, the
seconds of each update (training and predicting the volume, in-process, features excluded), and the
one-off feature time. `--cli` also times the command line on a 240x240x155 MRI (BraTS FLAIR): a
first `ar3d scribble` call with an empty feature cache and a repeated call, wall time of the whole
process (start, imports, reading, writing included).

    nice -n 10 python benchmarks/scribble.py --out runs/scribble.json            # every case
    nice -n 10 python benchmarks/scribble.py --cases brats --methods ours forest --cli
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared machine
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0)  # ilastik's default scales between 0.7 and 5 (voxels)


@dataclass
class Case:
    name: str
    image: str  # relative to the data folder
    truth: str
    values: tuple[int, ...]  # truth values that make the object
    note: str


CASES = {
    "brats": Case("BraTS 2015 pat0003 FLAIR, whole tumour", "brats2015/pat0003/flair.nii.gz",
                  "brats2015/pat0003/seg.nii.gz", (1, 2, 3, 4), "manual labels, 240x240x155, 1 mm"),
    "tcia": Case("TCIA PGBM-001 T1 post-contrast, tumour", "tcia_progression/PGBM-001/1991-11-19/t1post.nii.gz",
                 "tcia_progression/PGBM-001/1991-11-19/tumor.nii.gz", (1,), "MaskTumor, 0.69 mm in-plane, 6.4 mm slices"),
    "hippocampus": Case("MSD hippocampus_001, whole hippocampus", "hippocampus/imagesTr/hippocampus_001.nii.gz",
                        "hippocampus/labelsTr/hippocampus_001.nii.gz", (1, 2), "manual labels, 35x51x35, 1 mm"),
    "ct-spleen": Case("TotalSegmentator ct_sm, spleen", "totalseg/ct_sm/image.nii.gz", "totalseg/ct_sm/seg.nii.gz",
                      (1,), "silver labels, 122x101x30, 3 mm"),
}


# ----------------------------------------------------------------------------- the simulated user

# The same simulated user as `ar3d demo`: strokes on 3 slices, corrections on the largest error region.
from model_core.demo import BACKGROUND, OBJECT, correction, initial_strokes, stroke_axis  # noqa: E402
from model_core.inference.evaluate import dice  # noqa: E402


# ----------------------------------------------------------------------------- methods


class Ours:
    def __init__(self, encoder: str):
        self.encoder = encoder

    def start(self, volume) -> float:
        import torch

        from model_core.inference.scribble import ScribbleSession
        from model_core.models.vit import ViT3D, ViT3DConfig

        t = time.perf_counter()
        model = self.encoder
        if model == "random":
            torch.manual_seed(0)
            model = ViT3D(ViT3DConfig.preset("tiny"))
        self.session = ScribbleSession(volume, model, cache=False)
        return time.perf_counter() - t

    def update(self, scribbles: np.ndarray) -> np.ndarray:
        return self.session.update(scribbles, background=BACKGROUND).labels == OBJECT


class Forest:
    """ilastik's pixel classification, with scikit-learn's random forest."""

    def start(self, volume) -> float:
        t = time.perf_counter()
        self.features = ilastik_features(np.asarray(volume.array, dtype=np.float32))
        return time.perf_counter() - t

    def update(self, scribbles: np.ndarray) -> np.ndarray:
        from sklearn.ensemble import RandomForestClassifier

        painted = scribbles.reshape(-1) > 0
        forest = RandomForestClassifier(n_estimators=100, n_jobs=2, random_state=0)
        forest.fit(self.features[painted], scribbles.reshape(-1)[painted])
        pred = np.empty(len(self.features), dtype=np.uint8)
        for i in range(0, len(pred), 2**20):
            pred[i : i + 2**20] = forest.predict(self.features[i : i + 2**20])
        return pred.reshape(scribbles.shape) == OBJECT


def ilastik_features(image: np.ndarray) -> np.ndarray:
    """(voxels, 46) float32: the raw intensity and 9 filters at each of `SIGMAS` (see the module docstring)."""
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals, structure_tensor, structure_tensor_eigenvalues

    columns = [image.reshape(-1)]
    for sigma in SIGMAS:
        columns.append(ndi.gaussian_filter(image, sigma).reshape(-1))
        columns.append(ndi.gaussian_laplace(image, sigma).reshape(-1))
        columns.append(ndi.gaussian_gradient_magnitude(image, sigma).reshape(-1))
        tensor = structure_tensor(image, sigma=sigma, mode="reflect")  # ilastik: inner scale sigma/2
        columns += list(structure_tensor_eigenvalues(tensor).reshape(3, -1))
        hessian = hessian_matrix(image, sigma=sigma, mode="reflect", use_gaussian_derivatives=True)
        columns += list(hessian_matrix_eigvals(hessian).reshape(3, -1))
    return np.stack(columns, axis=1).astype(np.float32)


METHODS = {"ours": lambda: Ours("ar3d-encoder"), "ours-random": lambda: Ours("random"), "forest": Forest}


# ----------------------------------------------------------------------------- runs


def run_case(case: Case, data: Path, methods: list[str], rounds: int, own: bool = False) -> dict:
    """Dice and seconds of every update of each method. `own`: each method's corrections come from its own
    errors (the same first strokes); otherwise every method gets the strokes computed from the first one's."""
    from model_core.io.volume import read_volume

    volume = read_volume(data / case.image)
    truth = np.isin(np.rint(read_volume(data / case.truth).array).astype(np.int64), case.values)
    axis = stroke_axis(volume.spacing)
    runners = {name: METHODS[name]() for name in methods}
    results = {name: {"dice": [], "update_s": [], "start_s": runner.start(volume)} for name, runner in runners.items()}
    strokes = dict.fromkeys(runners, initial_strokes(truth, volume.spacing, axis)[0])
    for r in range(rounds + 1):
        preds = {}
        for name, runner in runners.items():
            t = time.perf_counter()
            preds[name] = runner.update(strokes[name])
            results[name]["update_s"].append(round(time.perf_counter() - t, 2))
            results[name]["dice"].append(round(dice(preds[name], truth), 4))
            print(f"{case.name} | {name} | round {r}: Dice {results[name]['dice'][-1]:.3f} "
                  f"({results[name]['update_s'][-1]:.1f} s)", flush=True)
        if r < rounds:
            lead = methods[0]
            strokes = {name: correction(strokes[name if own else lead], preds[name if own else lead], truth, axis)[0]
                       for name in runners}
    for name in runners:
        results[name]["painted_at_end"] = {"object": int((strokes[name] == OBJECT).sum()),
                                           "background": int((strokes[name] == BACKGROUND).sum())}
    return {"case": case.name, "note": case.note, "shape": list(volume.shape), "axis": axis, "methods": results}


def cli_timing(data: Path) -> dict:
    """Wall seconds of a first and a repeated `ar3d scribble` call on the BraTS FLAIR (3 initial slices)."""
    from model_core.io.volume import read_volume, write_volume

    case = CASES["brats"]
    volume = read_volume(data / case.image)
    truth = np.isin(np.rint(read_volume(data / case.truth).array).astype(np.int64), case.values)
    with tempfile.TemporaryDirectory() as tmp:
        strokes = Path(tmp) / "scribbles.nii.gz"
        write_volume(strokes, initial_strokes(truth, volume.spacing, stroke_axis(volume.spacing))[0],
                     volume.affine, kind="labels", like=volume)
        env = dict(os.environ, AR3D_CACHE_DIR=str(Path(tmp) / "cache"))
        command = [sys.executable, "-m", "model_core.cli", "scribble", str(data / case.image),
                   "--scribbles", str(strokes), "-o", str(Path(tmp) / "out.nii.gz")]
        times = []
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run(command, env=env, check=True, cwd=REPO, capture_output=True)
            times.append(round(time.perf_counter() - t, 2))
    return {"image": case.image, "shape": list(volume.shape), "command": " ".join(command[1:]),
            "first_s": times[0], "repeated_s": times[1]}


def table(results: list[dict]) -> str:
    lines = ["| case | method | Dice: 3 slices -> each correction | s per update (median) | features s |",
             "|---|---|---|---|---|"]
    for case in results:
        for name, r in case["methods"].items():
            lines.append(f"| {case['case']} | {name} | {' / '.join(f'{d:.3f}' for d in r['dice'])} | "
                         f"{float(np.median(r['update_s'])):.1f} | {r['start_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("AR3D_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=5, help="corrective rounds (default 5)")
    parser.add_argument("--own-corrections", action="store_true",
                        help="correct each method's own errors (default: every method gets the first method's strokes)")
    parser.add_argument("--cli", action="store_true", help="also time `ar3d scribble` (first and repeated call)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if not (args.data / "manifest.json").is_file():
        raise SystemExit(f"no shared data at {args.data} (set AR3D_DATA)")
    import torch

    report = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "corrections": "own" if args.own_corrections else f"from {args.methods[0]}",
              "cases": [run_case(CASES[c], args.data, args.methods, args.rounds, args.own_corrections)
                        for c in args.cases]}
    if args.cli:
        report["cli"] = cli_timing(args.data)
    print(table(report["cases"]))
    if "cli" in report:
        print(f"ar3d scribble on {report['cli']['shape']}: first call {report['cli']['first_s']} s, "
              f"repeated {report['cli']['repeated_s']} s (wall, process start included)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
