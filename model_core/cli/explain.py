"""`ar3d explain`: attention, next-token prediction, surprise and PCA maps of a scan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_core.cli._common import Command, TqdmProgress, add_device, three
from model_core.vocabulary import DEFAULT_ENCODER


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="a 3D image: NIfTI, NRRD, MHA/MHD or a DICOM folder")
    p.add_argument("--model", default=DEFAULT_ENCODER, metavar="NAME_OR_DIR",
                   help=f"an AR-pretrained checkpoint folder or a shipped model's name (default {DEFAULT_ENCODER})")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the <map>.nii.gz files")
    query = p.add_mutually_exclusive_group()
    query.add_argument("--query", metavar="I,J,K",
                       help="attention query voxel in the file's own index order, as nibabel and ITK-SNAP "
                            "number voxels (default: the volume centre)")
    query.add_argument("--query-mm", metavar="X,Y,Z",
                       help="attention query point in RAS world millimetres (write --query-mm=-10,5,3 when X < 0)")
    p.add_argument("--maps", default="attention,prediction,surprise,pca", metavar="LIST",
                   help="comma-separated maps to write (default attention,prediction,surprise,pca)")
    p.add_argument("--layer", type=int, default=-1,
                   help="attention block, 0-based; negative counts from the last (default -1, the last)")
    add_device(p)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from model_core.inference.explain import explain

    query = three(args.query, int, "--query") if args.query else None
    query_mm = three(args.query_mm, float, "--query-mm") if args.query_mm else None
    maps = [m.strip() for m in args.maps.split(",") if m.strip()]
    bar = TqdmProgress("explain", unit="step")
    try:
        written = explain(args.model, args.input, args.out, query_ijk=query, query_mm=query_mm, maps=maps,
                          layer=args.layer, device=args.device, seed=args.seed, progress=bar)
    except KeyboardInterrupt:
        print("\nstopped; nothing was written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


COMMAND = Command("explain", "attention, next-token prediction, surprise and PCA maps of a scan", add_arguments, run)
