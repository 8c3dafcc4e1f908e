"""`ar3d segment`: segment scans with a fine-tuned model; labels in each input's own geometry."""

from __future__ import annotations

import argparse
from pathlib import Path

from model_core.cli._common import Command, TqdmProgress, add_device
from model_core.vocabulary import MODALITIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="3D images: NIfTI, NRRD, MHA/MHD or DICOM folders")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="a fine-tuned segmentation model")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTPUT",
                   help="label file for one input (.nii.gz, .nii, .nrrd, .mha, or .dcm: a DICOM-SEG of a DICOM "
                        "series); a folder for several. The class names go beside each label file as "
                        "<name>.labels.json (inside a DICOM-SEG)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write each class's probability (<name>_prob_<class>) and the uncertainty beside")
    p.add_argument("--modality", choices=MODALITIES, help="modality hint for the intensity normalisation")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring windows (default 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--tta", action="store_true",
                   help="average the 8 mirror images of each window (8x slower; only for models fine-tuned with "
                        "flips: a mirror swaps left and right organs)")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    from model_core.inference.outputs import segment_files
    from model_core.inference.segment import load_segmenter

    bars: list[TqdmProgress] = []

    def progress_for(name: str) -> TqdmProgress:
        if bars:
            bars[-1].close()
        bars.append(TqdmProgress(name, unit="batch"))
        return bars[-1]

    segmenter = load_segmenter(args.model)
    try:
        done = segment_files(segmenter, args.inputs, args.output, probabilities=args.probabilities,
                             progress_for=progress_for, device=args.device, sw_batch_size=args.sw_batch_size,
                             overlap=args.overlap, modality=args.modality, tta=args.tta)
    finally:
        if bars:
            bars[-1].close()
    for item in done:
        counts = ", ".join(f"{name} {n}" for name, n in zip(item.classes, item.voxels))
        print(f"{item.labels} ({counts} voxels)")
    return 0


COMMAND = Command("segment", "segment scans with a fine-tuned model; labels in each input's own geometry",
                  add_arguments, run)
