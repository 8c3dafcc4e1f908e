"""Zero-shot findings of an HLIP model on unseen phantom studies (generated reports), and `ar3d findings` speed.

For `--studies` CT and brain-MRI phantom studies whose seeds the training never saw (from
`--first-seed`, far above the `--phantoms` seeds 0..n-1 of `--data phantom-studies`), every finding
of the study's modality is scored by `model_core.inference.findings.find_findings` ("X" against
"no X"); the AUROC of each finding is that of the studies that have it against those that do not
(Mann-Whitney U, ties counted half; 0.5 = chance). The phantoms' findings and reports are
*generated* (`model_core.data.reports`): these figures say what the model learned from generated
reports on procedural anatomy, not how it reads real studies.

`--timing` also times the command line end to end (a fresh `python -m model_core.cli findings`
process: start, imports, model load, four scans read and preprocessed, the prompt) on a 4-scan
brain study written to NIfTI, `--repeats` times, and reports the median.

    python benchmarks/findings_zero_shot.py --model runs/hlip_phantoms --studies 40 --timing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_core.data.reports import FINDINGS  # noqa: E402
from model_core.data.studies import load_scan, phantom_study  # noqa: E402
from model_core.inference.findings import find_findings, load_vision_language_model  # noqa: E402
from model_core.io.volume import write_volume  # noqa: E402


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean labels `positive` (rank formula, ties averaged)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_studies(model, kinds: list[str], n: int, first_seed: int, device: str) -> dict[str, dict]:
    """Per finding: the probabilities of "X" and whether each study has it."""
    found: dict[str, dict] = {}
    for kind in kinds:
        for seed in range(first_seed, first_seed + n):
            study = phantom_study(kind, seed)
            prompts = [FINDINGS[k].prompt for k in study.findings]
            result = find_findings(model, [load_scan(s) for s in study.scans], prompts, device=device)
            for finding, probability in zip(study.findings, result.probabilities):
                entry = found.setdefault(finding, {"scores": [], "present": []})
                entry["scores"].append(probability)
                entry["present"].append(study.findings[finding])
    return found


def time_cli(model: str, repeats: int) -> list[float]:
    """Wall-clock seconds of `ar3d findings` on a 4-scan brain phantom study written to NIfTI, per run."""
    study = next(s for s in (phantom_study("mri", seed) for seed in range(900, 950)) if len(s.scans) == 4)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for scan in study.scans:
            volume = load_scan(scan)
            paths.append(str(write_volume(Path(tmp) / f"{scan.name}.nii.gz", volume.array, volume.affine, kind="float")))
        cmd = [sys.executable, "-m", "model_core.cli", "findings", "--model", model, "--prompt", "brain tumour",
               "--device", "cpu", *paths]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an HLIP checkpoint folder")
    parser.add_argument("--studies", type=int, default=40, help="unseen studies of each kind (default 40)")
    parser.add_argument("--first-seed", type=int, default=100000, help="seed of the first unseen study")
    parser.add_argument("--kinds", default="ct,mri", help="phantom study kinds (default ct,mri)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing", action="store_true", help="also time `ar3d findings` on a 4-scan study")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    model = load_vision_language_model(args.model)
    start = time.perf_counter()
    found = score_studies(model, args.kinds.split(","), args.studies, args.first_seed, args.device)
    figures = {"model": Path(args.model).name, "studies_per_kind": args.studies, "first_seed": args.first_seed,
               "reports": "generated", "scoring_s": round(time.perf_counter() - start, 1), "auroc": {}}
    print(f"zero-shot AUROC on unseen phantom studies (generated reports), model {Path(args.model).name}")
    for finding, entry in found.items():
        present = np.array(entry["present"], bool)
        value = auroc(np.array(entry["scores"]), present)
        figures["auroc"][finding] = {"auroc": round(value, 3), "with": int(present.sum()), "without": int((~present).sum())}
        print(f"  {finding:15s} AUROC {value:.3f}  ({int(present.sum())} with, {int((~present).sum())} without)")
    if args.timing:
        times = time_cli(args.model, args.repeats)
        figures["findings_cli_s"] = {"median": round(float(np.median(times)), 2), "runs": [round(t, 2) for t in times]}
        print(f"  ar3d findings, 4-scan study: median {np.median(times):.2f} s over {len(times)} runs "
              f"({', '.join(f'{t:.2f}' for t in times)})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
