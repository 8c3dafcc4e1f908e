"""How well the anatomical matchers of Alice's cross-patient views match (`model_core.data.anatomy`).

For two scans that label the same structure, the structure's centroid in scan A is matched into
scan B; the error is the distance (mm) from the matched point to the structure's centroid in B.
The baseline ("random") is the mean distance from B's foreground voxels to that centroid: what an
anchor crop drawn anywhere in B would miss by. The label matcher leaves the structure out of its
fit (it sees only the other structures both scans label).

Sets (from the shared data, `--data` or $AR3D_DATA):
- hippocampus: MSD Task04 crops, anterior and posterior hippocampus, pairs of different patients;
- totalseg: TotalSegmentator CT and MRI organs (silver labels), pairs of different patients
  (ct_sm and ct_full are one patient and never paired);
- tcia: the two studies of each TCIA patient, tumour centroid (same patient, months apart: the
  tumour itself changes), matched through the MNI152 template by affine registration;
- brats / tcia registration: the Dice of each scan's foreground with the warped template.

    python benchmarks/alice_matcher.py --hippocampus 20 --out matcher.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_core.data.anatomy import (  # noqa: E402
    BodyMatcher,
    LabelMatcher,
    Matcher,
    RegistrationMatcher,
    describe,
    foreground_points,
    foreground_threshold,
    patient_of,
)
from model_core.data.preprocess import PreprocessConfig  # noqa: E402
from model_core.data.pretraining import Case, cases_from_manifest, preprocess_case  # noqa: E402

TOTALSEG = ("totalseg_ct_sm", "totalseg_ct_full", "totalseg_ct_dicom", "totalseg_mr_sm")
PATIENT = {"totalseg_ct_full": "totalseg_ct_sm"}  # ct_sm is a crop of ct_full: one patient


def load(cases: list[Case], cfg: PreprocessConfig, seed: int) -> list[tuple]:
    """(case, CaseData, Anatomy, foreground points) of each case."""
    rng = np.random.default_rng(seed)
    out = []
    for case in cases:
        data = preprocess_case(case, cfg)
        points = foreground_points(data.image, foreground_threshold(data.modality, cfg), rng)
        out.append((case, data, describe(case, data, points, PATIENT.get(case.id, patient_of(case))), points))
    return out


def structure_errors(scans: list[tuple], matchers: dict[str, Matcher], pairs: list[tuple[int, int]]) -> list[dict]:
    """One row per (pair, structure both label): the error of each matcher and of a random point, in mm."""
    rows = []
    for i, j in pairs:
        a, b, b_points = scans[i][2], scans[j][2], scans[j][3]
        for name in sorted(set(a.centroids) & set(b.centroids)):
            target = b.centroids[name]
            row = {"a": a.case_id, "b": b.case_id, "structure": name,
                   "random": float(np.linalg.norm((b_points - target) * b.spacing, axis=1).mean())}
            for label, matcher in matchers.items():
                m = LabelMatcher(exclude=[name]) if isinstance(matcher, LabelMatcher) else matcher
                found = m.match(a, a.centroids[name], b)
                row[label] = None if found is None else float(np.linalg.norm((found - target) * b.spacing))
            rows.append(row)
    return rows


def summary(rows: list[dict], columns: list[str], seed: int = 0) -> dict[str, dict]:
    """Per column: n, median, mean and a 95 % bootstrap interval of the mean (resampling rows)."""
    rng = np.random.default_rng(seed)
    out = {}
    for column in columns:
        values = np.array([r[column] for r in rows if r.get(column) is not None], float)
        if not values.size:
            out[column] = {"n": 0}
            continue
        means = [rng.choice(values, values.size).mean() for _ in range(2000)]
        out[column] = {"n": int(values.size), "median": float(np.median(values)), "mean": float(values.mean()),
                       "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}
    return out


def cross_patient_pairs(scans: list[tuple], limit: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    pairs = [(i, j) for i, j in itertools.permutations(range(len(scans)), 2)
             if scans[i][2].patient != scans[j][2].patient]
    if len(pairs) > limit:
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), limit, replace=False))]
    return pairs


def run(data: Path, n_hippocampus: int, seed: int) -> dict:
    cfg = PreprocessConfig()
    cases = {c.id: c for c in cases_from_manifest(data / "manifest.json", use=None)}
    rng = np.random.default_rng(seed)
    results: dict = {}

    hip_ids = sorted(k for k in cases if k.startswith("msd_hippocampus_"))[:n_hippocampus]
    hip = load([cases[k] for k in hip_ids], cfg, seed)
    rows = structure_errors(hip, {"body": BodyMatcher(), "labels": LabelMatcher()}, cross_patient_pairs(hip, 200, rng))
    results["hippocampus"] = {"scans": len(hip), "rows": rows, "summary": summary(rows, ["random", "body", "labels"])}

    organs = load([cases[k] for k in TOTALSEG if k in cases], cfg, seed)
    rows = structure_errors(organs, {"body": BodyMatcher(), "labels": LabelMatcher()},
                            cross_patient_pairs(organs, 100, rng))
    results["totalseg"] = {"scans": len(organs), "rows": rows, "summary": summary(rows, ["random", "body", "labels"])}

    template = preprocess_case(Case("mni152", str(data / "mni152" / "t1.nii.gz"), modality="MRI"), cfg)
    registration = RegistrationMatcher(template, cfg, seed)
    brain_ids = sorted(k for k in cases if k.startswith(("tcia_pgbm001", "tcia_pgbm006", "brats2015_")))
    brain = load([cases[k] for k in brain_ids], cfg, seed)
    for _, scan, anatomy, _ in brain:
        registration.prepare(anatomy, scan)
    tcia = [n for n, s in enumerate(brain) if s[0].id.startswith("tcia")]
    same_patient = [(i, j) for i, j in itertools.permutations(tcia, 2) if brain[i][2].patient == brain[j][2].patient]
    rows = structure_errors(brain, {"registration": registration, "body": BodyMatcher()}, same_patient)
    results["tcia_tumour"] = {"rows": rows, "summary": summary(rows, ["random", "registration", "body"])}
    results["registration_dice"] = {k: round(v, 3) for k, v in registration.dice.items()}
    return results


def table(results: dict) -> str:
    lines = ["| set | scans / rows | random point | body | labels (structure left out) | registration (MNI152) |",
             "|---|---|---|---|---|---|"]
    for name in ("hippocampus", "totalseg", "tcia_tumour"):
        s = results[name]["summary"]
        cells = []
        for column in ("random", "body", "labels", "registration"):
            c = s.get(column)
            cells.append("-" if not c or not c["n"] else
                         f"{c['median']:.1f} (mean {c['mean']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}])")
        counts = f"{results[name].get('scans', '-')} / {len(results[name]['rows'])}"
        lines.append(f"| {name} | {counts} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("AR3D_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--data", type=Path, default=default_data, help="the shared data folder (default ../shared/data)")
    p.add_argument("--hippocampus", type=int, default=20, help="hippocampus cases to pair (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write every row and the summaries as JSON")
    args = p.parse_args(argv)
    if not (args.data / "manifest.json").is_file():
        print(f"no shared data at {args.data}; pass --data or set AR3D_DATA", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run(args.data, args.hippocampus, args.seed)
    print("distance (mm) from the matched point to the same structure's centroid: median (mean [95% CI of the mean])")
    print("rows with n < 5 (tcia: two patients, both directions; refused registrations count as missing) are anecdotes")
    print(table(results))
    print("registration Dice (foreground vs warped MNI152; < 0.7 is refused):", results["registration_dice"])
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
