"""`ar3d demo`: the built-in default job: a CT phantom, segmented and explained, with how to open the files."""

from __future__ import annotations

import argparse
import shlex

from model_core.cli._common import Command, PhaseProgress, add_device
from model_core.vocabulary import DEFAULT_ENCODER, DEFAULT_SEGMENTER


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="ar3d-demo", metavar="DIR", help="folder for the demo's files (default ar3d-demo)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--model", default=DEFAULT_SEGMENTER, metavar="NAME_OR_DIR",
                   help=f"segmentation model (default {DEFAULT_SEGMENTER})")
    add_device(p)


_DEMO_FILES = {  # file key -> what it holds
    "image": "the CT phantom (Hounsfield units)",
    "truth": "its true labels",
    "truth_names": "their names",
    "segmentation": "labels predicted by the model",
    "segmentation_names": "their class names",
    "uncertainty": "entropy of the prediction (0 certain, 1 uniform)",
    "attention": "where the encoder looks from the liver voxel",
    "prediction": "next-token prediction of each patch",
    "surprise": "how unexpected each patch is",
    "dice": "Dice per class",
}


def run(args: argparse.Namespace) -> int:
    from model_core.demo import run_demo

    bars = PhaseProgress()
    try:
        result = run_demo(args.out, seed=args.seed, segmenter=args.model, device=args.device, progress=bars)
    finally:
        bars.close()
    s, t = result.summary, result.timings
    print(f"CT phantom (seed {s['seed']}) {s['shape'][0]}x{s['shape'][1]}x{s['shape'][2]} voxels, spacing "
          f"{s['spacing_mm']} mm, orientation {s['orientation']}; {len(s['classes'])} labelled structures")
    print(f"geometry checked: liver centroid at RAS {s['liver_centroid_ras_mm']} mm "
          f"(patient's right: {s['liver_on_patient_right']})")
    print(f"segmented with {args.model} in {t['segment']:.1f} s; explained with {DEFAULT_ENCODER} "
          f"(attention from liver voxel {tuple(s['liver_query_ijk'])}, prediction, surprise) in {t['explain']:.1f} s")
    seen = " (a phantom it was trained on)" if s["seed_in_training_data"] else " (a phantom it was not trained on)"
    print(f"Dice against the phantom's true labels{seen}:")
    for name, value in result.dice.items():
        print(f"  {name:14s} {value:.3f}")
    print(f"  {'mean':14s} {sum(result.dice.values()) / max(1, len(result.dice)):.3f}")
    print(f"files in {result.out_dir.resolve()}:")
    for key, path in result.files.items():
        print(f"  {path.relative_to(result.out_dir)!s:34s} {_DEMO_FILES.get(key, key)}")
    shown = " ".join(shlex.quote(str(result.files[k].resolve())) for k in
                     ("image", "segmentation", "truth", "attention", "surprise"))
    print(f"open them in napari (the napari-ar3d reader keeps the scanner geometry; *_seg / *_labels open as labels):\n"
          f"  napari {shown} --plugin napari-ar3d\n"
          f"or in napari: File > Open Files..., pick them and choose 'napari-ar3d' as the reader")
    print(f"done in {t['total']:.1f} s")
    return 0


COMMAND = Command("demo", "the built-in default job: a CT phantom, segmented and explained, with how to open the files",
                  add_arguments, run)
