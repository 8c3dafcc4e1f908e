"""`ar3d evaluate`: Dice and HD95 per class of a label map against a reference."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from model_core.cli._common import Command, label_values, merge


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, type=Path, metavar="P", help="predicted label map")
    p.add_argument("--truth", required=True, type=Path, metavar="T", help="reference label map on the same grid")
    p.add_argument("--labels", metavar="1,2", help="label values to score (default: every non-zero value found)")
    p.add_argument("--by-name", action="store_true",
                   help="pair the classes by name (from <file>.labels.json or labels.json beside each map), "
                        "for maps that number them differently")
    p.add_argument("--merge", action="append", default=[], metavar="NAME=1,2,3",
                   help="with --by-name: join these truth values into the class NAME (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _number(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else round(x, 4)


def run(args: argparse.Namespace) -> int:
    from model_core.inference.evaluate import evaluate_files, mean_dice

    labels = label_values(args.labels) if args.labels else None
    result = evaluate_files(args.pred, args.truth, None if labels == "all" else labels, by_name=args.by_name,
                            merge=dict(merge(item) for item in args.merge))
    scores, names = result.scores, result.names
    if args.json:
        print(json.dumps({
            "pred": str(args.pred), "truth": str(args.truth),
            "classes": [{"label": s.label, "name": names.get(s.label), "dice": _number(s.dice),
                         "hd95_mm": _number(s.hd95_mm), "truth_voxels": s.truth_voxels, "pred_voxels": s.pred_voxels}
                        for s in scores],
            "mean_dice": _number(mean_dice(scores)),
            "not_in_truth": result.unmatched,
        }, indent=2))
        return 0
    print(f"{'label':>5}  {'name':<20} {'dice':>6} {'hd95_mm':>8} {'truth':>9} {'pred':>9}")
    for s in scores:
        print(f"{s.label:>5}  {names.get(s.label, ''):<20} {s.dice:>6.3f} {s.hd95_mm:>8.2f} "
              f"{s.truth_voxels:>9} {s.pred_voxels:>9}")
    print(f"mean Dice {mean_dice(scores):.3f} over {sum(not math.isnan(s.dice) for s in scores)} classes")
    if result.unmatched:
        print(f"not scored (no truth class of that name): {', '.join(result.unmatched)}")
    return 0


COMMAND = Command("evaluate", "Dice and HD95 per class of a label map against a reference", add_arguments, run)
