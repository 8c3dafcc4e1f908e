"""`ar3d demo`: the built-in default job: a real CT segmented live from a simulated user's strokes (or, with
`--phantom`, a CT phantom segmented by the shipped segmenter), explained, with how to open the files."""

from __future__ import annotations

import argparse
import shlex

from model_core.cli._common import Command, PhaseProgress, add_device
from model_core.errors import Ar3dInputError
from model_core.vocabulary import DEFAULT_ENCODER, DEFAULT_SEGMENTER, DEMO_ORGANS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="ar3d-demo", metavar="DIR", help="folder for the demo's files (default ar3d-demo)")
    p.add_argument("--organ", choices=DEMO_ORGANS, default="liver", help="the organ the simulated user paints "
                   "on the real CT (default liver)")
    p.add_argument("--corrections", type=int, default=3, metavar="N",
                   help="corrective rounds after the first strokes (default 3)")
    p.add_argument("--phantom", action="store_true",
                   help="the phantom demo instead: a CT phantom segmented by the shipped segmenter")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0; with --phantom)")
    p.add_argument("--model", default=DEFAULT_SEGMENTER, metavar="NAME_OR_DIR",
                   help=f"segmentation model (default {DEFAULT_SEGMENTER}; with --phantom)")
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


_SCAN_FILES = {  # file key -> what it holds (the real-scan demo)
    "image": "the CT (Hounsfield units)",
    "truth": "its silver labels (TotalSegmentator's output)",
    "truth_names": "their names",
    "scribbles": "the simulated user's strokes (1 background, 2 the organ)",
    "scribbles_names": "their names",
    "segmentation": "the organ segmented from the strokes",
    "segmentation_names": "its class name",
    "uncertainty": "entropy of the prediction (0 certain, 1 uniform)",
    "attention": "where the encoder looks from the organ voxel",
    "prediction": "next-token prediction of each patch",
    "surprise": "how unexpected each patch is",
    "dice": "Dice and seconds of each round",
}


def run(args: argparse.Namespace) -> int:
    return run_phantom(args) if args.phantom else run_scan(args)


def run_scan(args: argparse.Namespace) -> int:
    from model_core.demo import SAMPLE_CREDIT, run_scan_demo

    if args.corrections < 0:
        raise Ar3dInputError(f"--corrections must be 0 or more, got {args.corrections}")
    bars = PhaseProgress()
    try:
        result = run_scan_demo(args.out, organ=args.organ, corrections=args.corrections, device=args.device,
                               progress=bars)
    finally:
        bars.close()
    s, t = result.summary, result.timings
    print(f"{SAMPLE_CREDIT}: {s['shape'][0]}x{s['shape'][1]}x{s['shape'][2]} voxels, spacing {s['spacing_mm']} mm, "
          f"orientation {s['orientation']}")
    print(f"encoder features ({DEFAULT_ENCODER}, once per scan) in {t['features']:.1f} s; a simulated user paints "
          f"the {s['organ']} on slices across axis {s['axis']}")
    print(f"Dice of the {s['organ']} against the silver labels after each update (seconds per update):")
    for r in s["rounds"]:
        what = "3 slices" if r["round"] == 0 else f"correction {r['round']}"
        print(f"  {what:13s} slice {','.join(map(str, r['slices'])):10s} Dice {r['dice']:.3f}  {r['seconds']:.1f} s")
    print(f"explained with {DEFAULT_ENCODER} (attention from {s['organ']} voxel {tuple(s['query_ijk'])}, prediction, "
          f"surprise) in {t['explain']:.1f} s; the encoder saw this scan, without labels, in its pretraining")
    _print_files(result, _SCAN_FILES, ("image", "truth", "scribbles", "segmentation", "uncertainty", "attention",
                                       "prediction", "surprise"))
    print(f"done in {t['total']:.1f} s (the phantom demo: ar3d demo --phantom)")
    return 0


def _print_files(result, described: dict[str, str], opened: tuple[str, ...]) -> None:
    """Every file with what it holds, and the napari command that opens the volumes."""
    print(f"files in {result.out_dir.resolve()}:")
    for key, path in result.files.items():
        print(f"  {path.relative_to(result.out_dir)!s:34s} {described.get(key, key)}")
    shown = " ".join(shlex.quote(str(result.files[k].resolve())) for k in opened)
    print(f"open them in napari (the napari-ar3d reader keeps the scanner geometry; *_seg / *_labels open as labels):\n"
          f"  napari {shown} --plugin napari-ar3d\n"
          f"or in napari: File > Open Files..., pick them and choose 'napari-ar3d' as the reader")


def run_phantom(args: argparse.Namespace) -> int:
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
    _print_files(result, _DEMO_FILES, ("image", "segmentation", "truth", "attention", "surprise"))
    print(f"done in {t['total']:.1f} s")
    return 0


COMMAND = Command("demo", "the built-in default job: a real CT segmented from a few simulated strokes and explained "
                  "(--phantom: a CT phantom), with how to open the files",
                  add_arguments, run)
