"""`ar3d scribble`: segment a scan from a few painted strokes (the encoder's features are cached on disk)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from model_core.cli._common import Command, PhaseProgress, add_device
from model_core.errors import Ar3dInputError
from model_core.vocabulary import DEFAULT_ENCODER


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="3D image: NIfTI, NRRD, MHA/MHD or a DICOM folder")
    p.add_argument("--scribbles", required=True, metavar="SCRIBBLES",
                   help="label map on IMAGE's grid: 0 unpainted, the --background value, every other value a class")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="label file (.nii.gz, .nii, .nrrd, .mha): each voxel holds the painted value of its class, "
                        "0 background; the class names go beside it as <name>.labels.json")
    p.add_argument("--model", default=DEFAULT_ENCODER, metavar="NAME_OR_DIR",
                   help=f"the encoder: a shipped name or a checkpoint folder (default {DEFAULT_ENCODER})")
    p.add_argument("--background", type=int, default=1, metavar="VALUE",
                   help="the painted value that means background (default 1)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write each class's probability (<name>_prob_<class>) and the uncertainty beside OUT")
    p.add_argument("--save-model", type=Path, metavar="DIR",
                   help="also write the trained model as a segmentation checkpoint folder (new or empty), for "
                        "`ar3d segment` on another scan")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)


def run(args: argparse.Namespace) -> int:
    from model_core.inference.outputs import output_paths, write_segmentation
    from model_core.inference.scribble import ScribbleSession, check_scribbles
    from model_core.io.volume import WRITE_SUFFIXES, read_label_names, read_volume
    from model_core.training.finetune import check_new_model_folder

    for item in (args.image, args.scribbles):
        if not Path(item).exists():
            raise Ar3dInputError("file not found", item)
    ((target, stem),) = output_paths([args.image], args.output)
    if not target.name.lower().endswith(WRITE_SUFFIXES):
        raise Ar3dInputError(f"the output must end with one of {', '.join(WRITE_SUFFIXES)}", target)
    if args.save_model is not None:
        check_new_model_folder(args.save_model)
    image, scribbles = read_volume(args.image), read_volume(args.scribbles)
    _, classes = check_scribbles(scribbles, image, args.background)  # before the encoder runs
    names = {v: read_label_names(args.scribbles).get(v, f"label_{v}") for v in classes}

    t = time.perf_counter()
    bar = PhaseProgress()
    try:
        session = ScribbleSession(image, args.model, device=args.device, seed=args.seed, progress=bar)
        result = session.update(scribbles, args.background, progress=bar, probabilities=args.probabilities)
    finally:
        bar.close()
    written = []
    try:
        if args.save_model is not None:
            written.append(session.save_model(args.save_model, names, {"command": "ar3d scribble"}))
        written += write_segmentation(result, image, target, stem, args.probabilities,
                                      names={v: names[v] for v in result.classes})
    except BaseException:
        if args.save_model is not None and written:
            shutil.rmtree(written[0], ignore_errors=True)  # the model: the outputs removed their own files
        raise
    counts = ", ".join(f"{names[v]} {int((result.labels == v).sum())}" for v in classes)
    features = "features from the cache" if session.cache_hit else f"features {session.features_s:.1f} s"
    print(f"{target} ({counts} voxels; {features}, {time.perf_counter() - t:.1f} s)")
    if args.save_model is not None:
        print(f"model: {args.save_model}")
    return 0


COMMAND = Command("scribble", "segment a scan from a few painted strokes; labels hold the painted values",
                  add_arguments, run)
