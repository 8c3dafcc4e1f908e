"""Speed of explain: all four maps (attention, prediction, surprise, PCA) for a 240x240x155 volume.

Target (issue 5): <= 30 s on a CPU, end to end, with the config that ships.

Model: `--model NAME_OR_DIR` (a checkpoint), else a randomly initialised model of the shipped
config (ViT3D "tiny": width 192, depth 12, 3 heads, patch 16; model spacing 1.5 mm; windows of
128x128x32 voxels) -- random weights compute exactly as fast as trained ones, and the output says
which was used. Input: `--input FILE`, else a brain MRI phantom of `--shape` (default 240,240,155).

Reported: `prepare` (preprocessing and padding), each map computed from the prepared grid (its
forward passes and the resampling onto the input grid), and `explain()` end to end (read the file,
preprocess, all four maps, write four NIfTI files), which is what `ar3d explain` costs.

    python benchmarks/explain_speed.py
    python benchmarks/explain_speed.py --model runs/ar-tiny --input scan.nii.gz --device cuda
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_core.data.preprocess import PreprocessConfig  # noqa: E402
from model_core.device import resolve_device  # noqa: E402
from model_core.inference.explain import (  # noqa: E402
    ExplainModel,
    attention_map,
    explain,
    load_explain_model,
    next_token_prediction,
    pca_features,
    prepare,
    surprise_map,
)
from model_core.io.volume import read_volume, write_volume  # noqa: E402
from model_core.models.vit import ViT3D, ViT3DConfig  # noqa: E402
from model_core.objectives.autoregressive import AutoregressiveObjective  # noqa: E402
from model_core.vocabulary import PRETRAIN_WINDOW


def shipped_config_model(device: torch.device, seed: int) -> ExplainModel:
    """A random-init AR model of the shipped config (tiny, patch 16, 1.5 mm, 128x128x32 windows)."""
    torch.manual_seed(seed)
    objective = AutoregressiveObjective(ViT3D(ViT3DConfig.preset("tiny")))
    model = ExplainModel(objective.encoder, objective.head, PreprocessConfig(), PRETRAIN_WINDOW, name="random tiny")
    return model.to(device)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or shipped name (default: random init, shipped config)")
    parser.add_argument("--input", type=Path, help="a 3D image (default: a brain MRI phantom of --shape)")
    parser.add_argument("--shape", default="240,240,155", help="phantom shape (default 240,240,155)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    if args.model:
        model = load_explain_model(args.model, device)
        origin = f"checkpoint {args.model}"
    else:
        model = shipped_config_model(device, args.seed)
        origin = "RANDOM INIT of the shipped config (no --model given; same speed as trained weights)"

    with tempfile.TemporaryDirectory() as tmp:
        if args.input is None:
            from model_core.data.phantoms import make_brain_mri

            shape = tuple(int(n) for n in args.shape.split(","))
            phantom = make_brain_mri(seed=args.seed, shape=shape)
            args.input = write_volume(Path(tmp) / "phantom.nii.gz", phantom.images["t2f"], phantom.affine, kind="float")
        volume = read_volume(args.input)
        query = tuple(n // 2 for n in volume.shape)

        rows = []
        t, grid = timed(prepare, model, volume)
        rows.append(("prepare (preprocess + pad)", t))
        rows.append(("attention (last block)", timed(attention_map, model, grid, query)[0]))
        rows.append(("prediction", timed(next_token_prediction, model, grid)[0]))
        rows.append(("surprise", timed(surprise_map, model, grid)[0]))
        rows.append(("pca", timed(pca_features, model, grid)[0]))
        total, _ = timed(explain, model, args.input, Path(tmp) / "out", query_ijk=query, device=device, seed=args.seed)

    cfg = model.encoder.cfg
    print(f"model: {origin}")
    print(f"encoder: width {cfg.width}, depth {cfg.depth}, heads {cfg.heads}, patch {cfg.patch_size}; "
          f"spacing {model.preprocess.spacing} mm; window {model.window}")
    print(f"input: {args.input if args.model or args.input else 'brain MRI phantom'} {volume.shape} "
          f"spacing {tuple(round(float(s), 3) for s in volume.spacing)} mm -> model grid {grid.array.shape}, "
          f"{grid.tokens} tokens")
    print(f"device: {device} ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})")
    print()
    print("| stage | time (s) |")
    print("|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    stages = sum(t for _, t in rows)
    print(f"| sum of the stages (prediction and surprise each with their own causal pass) | {stages:.2f} |")
    print(f"| **explain() end to end: read, 4 maps (one causal pass), write 4 files** | **{total:.2f}** |")
    print()
    print(f"target <= 30 s end to end: {'met' if total <= 30 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
