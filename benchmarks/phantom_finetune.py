"""Fine-tune on one CT phantom, segment the liver of other phantoms: the segmentation issue's test target.

The issue asks for Dice >= 0.9 on another phantom of the same generator after fine-tuning on one
(tiny config, CPU, under a minute). This runs that protocol for `model_core.training.finetune` (by default
the settings of the slow test `test_head_mode_on_one_phantom_segments_the_liver_of_another`) and,
as a reference, for MONAI's UNet trained on crops of the same phantom on the same model grid, with
optional random zoom. Both are scored the same way: `model_core.segment` on each phantom's own grid,
Dice of the liver. Phantom 0 is the training phantom; the others are unseen.

    python benchmarks/phantom_finetune.py                        # ar3d head mode, from scratch
    python benchmarks/phantom_finetune.py --unet-steps 800 --unet-zoom 0.15
    python benchmarks/phantom_finetune.py --model ar3d-encoder --spacing 3 --window 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_core.data.phantoms import CT_CLASSES, make_ct_abdomen
from model_core.data.preprocess import (
    IntensityConfig,
    PreprocessConfig,
    preprocess_volume,
)
from model_core.inference.segment import Segmenter, load_segmenter, segment
from model_core.io.volume import Volume
from model_core.models.vit import ViT3DConfig
from model_core.training.finetune import FinetuneConfig, finetune

TEST_TINY = ViT3DConfig(patch_size=8, width=48, depth=4, heads=2)  # the tests' tiny encoder
LIVER = 1


def liver_dice(segmenter: Segmenter, seed: int) -> float:
    """Dice of the liver of phantom `seed`, segmented on its own grid."""
    ph = make_ct_abdomen(seed)
    pred = segment(segmenter, Volume(ph.images["ct"], ph.affine), device="cpu").labels == 1
    truth = ph.labels == LIVER
    return float(2.0 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum()))


def ar3d_finetune(args) -> tuple[Segmenter, float]:
    """`finetune` on phantom 0 (liver only), as the slow test does; returns the model and its seconds."""
    ph = make_ct_abdomen(0)
    pairs = [(Volume(ph.images["ct"], ph.affine), Volume(ph.labels, ph.affine))]
    spacing = (args.spacing,) * 3 if args.spacing else None
    cfg = FinetuneConfig(labels=[LIVER], steps=args.steps, crops_per_scan=args.crops, points=args.points,
                         window=args.window, spacing=spacing, zoom=args.zoom, rotate=args.rotate,
                         mode=args.mode, scratch_config=TEST_TINY, seed=args.seed, device="cpu")
    out = Path(tempfile.mkdtemp(prefix="phantom-")) / "m"
    t0 = time.perf_counter()
    finetune(args.model, pairs, out, cfg, class_names=CT_CLASSES)
    return load_segmenter(out), time.perf_counter() - t0


def unet(args) -> tuple[Segmenter, float]:
    """MONAI UNet on random crops of phantom 0 (resampled `--unet-zoom` copies), DiceCE, AdamW."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    spacing = args.spacing or 4.0
    pre_cfg = PreprocessConfig(spacing=(spacing,) * 3, intensity=IntensityConfig("ct"))
    ph = make_ct_abdomen(0)
    window = args.window or 48
    t0 = time.perf_counter()
    zooms = [np.ones(3)] + [rng.uniform(1 - args.unet_zoom, 1 + args.unet_zoom, 3) for _ in range(args.unet_copies)]
    volumes = []
    for zoom in zooms if args.unet_zoom else zooms[:1]:
        cfg = PreprocessConfig(spacing=tuple(spacing / zoom), intensity=pre_cfg.intensity)
        pre = preprocess_volume(Volume(ph.images["ct"], ph.affine), cfg, labels=(ph.labels == LIVER).astype(np.uint8))
        pad = [(0, max(0, window - n)) for n in pre.array.shape]
        volumes.append((np.pad(pre.array, pad), np.pad(pre.labels, pad)))
    net = UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(args.unet_steps):
        xs, ys = [], []
        for _ in range(2):
            image, labels = volumes[rng.integers(len(volumes))]
            corner = [rng.integers(0, n - window + 1) for n in image.shape]
            box = tuple(slice(c, c + window) for c in corner)
            xs.append(image[box] * rng.uniform(0.98, 1.02) + rng.uniform(-0.02, 0.02))
            ys.append(labels[box])
        x = torch.from_numpy(np.stack(xs)[:, None]).float()
        y = torch.from_numpy(np.stack(ys)[:, None].astype(np.int64))
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    return Segmenter(model=net.eval(), classes=["liver"], preprocess=pre_cfg, window=(window,) * 3, modality="CT",
                     config={}), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="scratch", help="encoder to fine-tune: scratch (the tests' tiny config) or a name/folder")
    parser.add_argument("--mode", default="head", choices=("head", "full"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--crops", type=int, default=128, help="cached crops (head mode)")
    parser.add_argument("--points", type=int, default=8192, help="voxels per crop per step (head mode)")
    parser.add_argument("--zoom", type=float, default=0.15, help="ar3d: random zoom range of the crops")
    parser.add_argument("--rotate", type=float, default=0.1, help="ar3d: random rotation of the crops (radians)")
    parser.add_argument("--window", type=int, default=48, help="window edge in voxels")
    parser.add_argument("--spacing", type=float, default=4.0, help="model spacing in mm (0: the encoder's)")
    parser.add_argument("--unet-steps", type=int, default=0, help="also train the MONAI UNet reference this many steps")
    parser.add_argument("--unet-zoom", type=float, default=0.0, help="UNet: random zoom range of the resampled copies")
    parser.add_argument("--unet-copies", type=int, default=16, help="UNet: zoomed copies of the phantom")
    parser.add_argument("--test-seeds", default="11,12,13,14", help="unseen phantoms to segment")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    seeds = [0] + [int(s) for s in args.test_seeds.split(",")]
    runs = [(f"ar3d {args.mode} ({args.model}, {args.steps} steps)", ar3d_finetune)]
    if args.unet_steps:
        runs.append((f"MONAI UNet ({args.unet_steps} steps, zoom {args.unet_zoom})", unet))
    print("| model | train s | phantom 0 (trained on) | " + " | ".join(f"phantom {s}" for s in seeds[1:]) + " | unseen mean |")
    print("|---|---|---|" + "---|" * len(seeds))
    for name, train in runs:
        segmenter, seconds = train(args)
        dice = [liver_dice(segmenter, s) for s in seeds]
        print(f"| {name} | {seconds:.1f} | {dice[0]:.3f} | " + " | ".join(f"{d:.3f}" for d in dice[1:])
              + f" | {np.mean(dice[1:]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
