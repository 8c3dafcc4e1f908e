"""Pretrained against scratch, paired: how much one initialisation beats another over repeated runs.

Reads the `--out` JSON files of several `benchmarks/fewshot.py` runs (one per seed), pairs the two
initialisations on the same (run, task, case, class), and prints the mean of each, the mean paired
difference with a 95 % bootstrap interval (pairs resampled), and how many pairs each one wins.
The same cases recur in every run, so the interval measures the run-to-run noise (seeds: crops,
initial weights, point draws) on these patients, not how the gap would carry over to new ones.

    for s in 1 2 3; do python benchmarks/fewshot.py --ar runs/ar --inits ar,scratch \
        --tasks brats_whole_tumor --seed $s --out runs/seeds/wt_seed$s.json; done
    python benchmarks/paired_dice.py runs/seeds/wt_seed*.json --a ar --b scratch
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def paired(files: list[Path], a: str, b: str) -> dict[str, list[tuple[str, float, float]]]:
    """class -> [(run/case, Dice of a, Dice of b)] for every case both initialisations scored in a run."""
    pairs: dict[str, list[tuple[str, float, float]]] = {}
    for path in files:
        runs = json.loads(path.read_text())
        scores = {(r["init"], r["task"], r["case"], c): d for r in runs for c, d in r["dice"].items()}
        for (init, task, case, cls), d in sorted(scores.items()):
            if init == a and (b, task, case, cls) in scores:
                pairs.setdefault(f"{task}/{cls}", []).append((f"{path.stem}/{case}", d, scores[b, task, case, cls]))
    return pairs


def bootstrap_interval(diff: np.ndarray, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of `diff`, resampling its entries."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", type=Path, nargs="+", help="fewshot.py --out JSON files")
    parser.add_argument("--a", default="ar", help="initialisation tested (default ar)")
    parser.add_argument("--b", default="scratch", help="baseline (default scratch)")
    args = parser.parse_args(argv)
    pairs = paired(args.files, args.a, args.b)
    if not pairs:
        raise SystemExit(f"no case scored by both {args.a} and {args.b} in {', '.join(map(str, args.files))}")
    print(f"| task/class | pairs | {args.a} | {args.b} | {args.a} - {args.b} | 95 % interval | {args.a} wins |")
    print("|---|---|---|---|---|---|---|")
    for cls, rows in pairs.items():
        da, db = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
        lo, hi = bootstrap_interval(da - db)
        print(f"| {cls} | {len(rows)} | {da.mean():.3f} | {db.mean():.3f} | {(da - db).mean():+.3f} | "
              f"{lo:+.3f} to {hi:+.3f} | {(da > db).sum()}/{len(rows)} |")


if __name__ == "__main__":
    main()
