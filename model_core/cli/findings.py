"""`ar3d findings`: zero-shot findings on the scans of one study with a vision-language (HLIP) model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model_core.cli._common import Command, add_device
from model_core.errors import Ar3dInputError
from model_core.vocabulary import MODALITIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scans", nargs="*", metavar="SCAN",
                   help="the scans of one study (any number, any contrasts): NIfTI, NRRD, MHA/MHD or DICOM folders")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="a model pretrained with --objective hlip")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", required=True,
                   help="a finding to look for, e.g. 'enlarged spleen' (repeatable); scored against 'no TEXT'")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="also write each prompt's token-level similarity map on the first scan's grid "
                        "(findings_<prompt>.nii.gz)")
    p.add_argument("--modality", choices=MODALITIES, help="modality hint for the intensity normalisation")
    add_device(p)


def run(args: argparse.Namespace) -> int:
    from model_core.data.studies import load_scan
    from model_core.inference.findings import check_prompts, find_findings, load_vision_language_model, write_maps

    check_prompts(args.prompt)  # before anything is loaded
    if not args.scans:
        raise Ar3dInputError("no scans: give the scans of one study (any number, any contrasts)")
    model = load_vision_language_model(args.model)
    scans = [load_scan(path) for path in args.scans]
    result = find_findings(model, scans, args.prompt, modality=args.modality, device=args.device)
    written = write_maps(result, args.out) if args.out is not None else []
    for prompt, probability in zip(result.prompts, result.probabilities):
        print(json.dumps({"prompt": prompt, "probability": round(probability, 4)}))
    for path in written:
        print(f"map: {path}", file=sys.stderr)
    return 0


COMMAND = Command("findings", "zero-shot findings on the scans of one study (vision-language model)", add_arguments, run)
