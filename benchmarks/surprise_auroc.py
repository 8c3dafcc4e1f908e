"""Does the surprise map light up brain tumours? AUROC on the BraTS 2015 dev cases.

For every manifest case `brats2015_*`: the image is the FLAIR, tumour voxels are `seg > 0` (all four
labels), brain voxels are `brainmask > 0` (extra image). The score of a voxel is the surprise map
(`model_core.inference.explain.surprise_map`, on the input grid); the AUROC is that of tumour voxels against
the other brain voxels (Mann-Whitney U, ties counted half; 0.5 = chance).

Compared: the pretrained encoder `--model` and a randomly initialised model of the same config
(same preprocessing and windows, `--seed`), so the difference is what pretraining learned. A model
whose head predicts patch brightness (`NextTokenHead.stats`) is also scored on its pattern error
alone ("pattern only", the surprise of a head without it), to show what the brightness term adds;
`--also NAME_OR_DIR` scores further models on the same cases (e.g. the shipped encoder).
Data: `--data` (default `$AR3D_DATA`, else `../shared/data` beside the repository). BraTS 2015 is
CC BY-NC-SA: it is only read here, for evaluation.

    python benchmarks/surprise_auroc.py --model runs/ar-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model_core.device import resolve_device  # noqa: E402
from model_core.inference.explain import (  # noqa: E402
    ExplainModel,
    load_explain_model,
    prepare,
    surprise_map,
)
from model_core.io.volume import read_volume  # noqa: E402
from model_core.models.vit import NextTokenHead, ViT3D  # noqa: E402
from model_core.objectives.autoregressive import AutoregressiveObjective  # noqa: E402


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean labels `positive` (rank formula, ties averaged)."""
    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def random_twin(model: ExplainModel, seed: int) -> ExplainModel:
    """A randomly initialised model with the config, head, preprocessing and windows of `model`."""
    torch.manual_seed(seed)
    objective = AutoregressiveObjective(ViT3D(model.encoder.cfg), stats_weight=0.1 if model.head.stats else 0.0)
    twin = ExplainModel(objective.encoder, objective.head, model.preprocess, model.window, name="random init")
    return twin.to(model.device)


def pattern_only(model: ExplainModel) -> ExplainModel:
    """`model` with a head that predicts no brightness: its surprise is the normalised pattern error alone."""
    head = NextTokenHead(model.encoder.cfg)  # no stats; the same voxel map
    head.proj = model.head.proj
    return ExplainModel(model.encoder, head, model.preprocess, model.window, name=f"{model.name}, pattern only")


def brats_cases(data: Path) -> list[dict]:
    manifest = json.loads((data / "manifest.json").read_text())
    return [c for c in manifest["cases"] if str(c.get("id", "")).startswith("brats2015_")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="AR-pretrained checkpoint folder or shipped name")
    default_data = os.environ.get("AR3D_DATA") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data", type=Path, default=Path(default_data), help=f"data folder (default {default_data})")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init model (default 0)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME_OR_DIR",
                        help="another AR checkpoint to score on the same cases (repeatable)")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.json").is_file():
        print(f"surprise_auroc: no manifest.json in {args.data}; pass --data or set AR3D_DATA", file=sys.stderr)
        return 2
    cases = brats_cases(args.data)
    if not cases:
        print(f"surprise_auroc: the manifest in {args.data} lists no brats2015_* case", file=sys.stderr)
        return 2

    pretrained = load_explain_model(args.model, resolve_device(args.device))
    models = {"pretrained": pretrained}
    if pretrained.head.stats is not None:
        models["pretrained, pattern only"] = pattern_only(pretrained)
    models.update({name: load_explain_model(name, resolve_device(args.device)) for name in args.also})
    models["random init"] = random_twin(pretrained, args.seed)
    rows = []
    start = time.perf_counter()
    for case in cases:
        volume = read_volume(args.data / case["image"])
        tumour = np.rint(read_volume(args.data / case["seg"]).array).astype(int) > 0
        brain = read_volume(args.data / case["extra_images"]["brainmask"]).array > 0
        inside = brain | tumour
        labels = tumour[inside]
        aurocs = {}
        for name, model in models.items():
            surprise = surprise_map(model, prepare(model, volume))
            aurocs[name] = auroc(surprise[inside], labels)
        rows.append((case["id"], int(labels.sum()), int(inside.sum()), aurocs))
    elapsed = time.perf_counter() - start

    cfg = pretrained.encoder.cfg
    print(f"model: {args.model} (width {cfg.width}, depth {cfg.depth}, patch {cfg.patch_size}, "
          f"spacing {pretrained.preprocess.spacing} mm, window {pretrained.window}); random init seed {args.seed}")
    print(f"data: {args.data} (FLAIR; tumour = seg > 0 vs other brainmask voxels); {elapsed:.1f} s")
    print()
    print("| case | tumour voxels | brain voxels | " + " | ".join(f"AUROC {name}" for name in models) + " |")
    print("|---|---:|---:|" + "---:|" * len(models))
    for case_id, n_tumour, n_brain, aurocs in rows:
        print(f"| {case_id} | {n_tumour:,} | {n_brain:,} | " + " | ".join(f"{aurocs[n]:.3f}" for n in models) + " |")
    means = {name: np.mean([r[3][name] for r in rows]) for name in models}
    print("| **mean** | | | " + " | ".join(f"**{means[n]:.3f}**" for n in models) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
