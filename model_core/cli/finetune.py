"""`ar3d finetune`: fine-tune a segmentation model on a few annotated scans."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_core.cli._common import (
    Command,
    PhaseProgress,
    StopOnSignal,
    add_device,
    command_line,
    ct_window,
    label_values,
    merge,
    overrides,
    spacing,
)
from model_core.errors import Ar3dInputError
from model_core.vocabulary import (
    ANNOTATIONS,
    DEFAULT_LR,
    DEFAULT_STEPS,
    SCRATCH,
    TRAINING_MODES,
    WINDOW_PATCHES,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR|scratch",
                   help="pretrained encoder: a checkpoint folder, a shipped model's name (ar3d-encoder), or scratch")
    p.add_argument("--train", action="append", nargs=2, required=True, metavar=("IMAGE", "SEG"),
                   help="a training image and its segmentation on the same grid (repeatable)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new folder for the segmentation model")
    labels = p.add_argument_group("classes")
    labels.add_argument("--labels", metavar="1,2|all",
                        help="label values kept as classes (default all, or only the --merge classes)")
    labels.add_argument("--merge", action="append", default=[], metavar="NAME=1,2,3",
                        help="join label values into one class NAME (repeatable)")
    labels.add_argument("--annotation", choices=(*ANNOTATIONS, "full"), default="dense",
                        help="dense: every voxel annotated, 0 is background (\"full\" is its old name); "
                             "sparse (scribbles): 0 is unannotated and ignored")
    labels.add_argument("--background-label", metavar="NAME_OR_VALUE",
                        help="sparse annotation: the label that is background (default: the one named background)")
    model = p.add_argument_group("model")
    model.add_argument("--mode", choices=TRAINING_MODES, default="head",
                       help="head: frozen encoder, light decoder on cached features (fast on a CPU); "
                            "full: UNETR decoder and encoder with layer-wise lr decay")
    model.add_argument("--config", metavar="SIZE_OR_JSON", help="encoder size for --model scratch (default tiny)")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override one encoder field for --model scratch (repeatable)")
    model.add_argument("--spacing", metavar="MM", help="model voxel spacing (default: the encoder's, else 1.5)")
    model.add_argument("--window", "--roi", type=int, metavar="VOXELS", help=f"window edge (default {WINDOW_PATCHES} patches: 96 for 16^3)")
    model.add_argument("--ct-window", metavar="LOW,HIGH",
                       help="HU window of the CT input for --model scratch (default -160,240: soft tissue); "
                            "a pretrained encoder keeps its own")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS['head']} head, {DEFAULT_STEPS['full']} full)")
    run.add_argument("--batch-size", type=int, default=2, help="crops per step (default 2)")
    run.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULT_LR['head']:g} head, {DEFAULT_LR['full']:g} full)")
    run.add_argument("--crops", type=int, default=16, help="head mode: augmented crops cached per scan (default 16)")
    run.add_argument("--ckpt-every", type=int, default=50,
                     help="steps between resumable checkpoints in the hidden work folder .OUT.finetuning (default 50)")
    run.add_argument("--resume", action="store_true",
                     help="continue a killed run from its work folder's last checkpoint (give the same options)")
    run.add_argument("--flip-prob", type=float, default=0.0,
                     help="probability of a flip along each axis (default 0: flips swap left and right)")
    run.add_argument("--zoom", type=float, default=0.15, help="random scaling of each crop by 1 +- this (default 0.15)")
    run.add_argument("--rotate", type=float, default=0.1, metavar="RADIANS",
                     help="random rotation of each crop about each axis, up to this (default 0.1)")
    run.add_argument("--contrast-curve", type=float, default=0.0, metavar="P",
                     help="probability of a random smooth intensity curve per crop, for other contrast phases or "
                          "scanners (default 0: off)")
    run.add_argument("--gamma", type=float, default=0.0, help="random gamma in [1/(1+G), 1+G] (default 0: off)")
    run.add_argument("--bias-field", type=float, default=0.0, metavar="C",
                     help="random MRI bias field with coefficients up to C, e.g. 0.3 (default 0: off)")
    run.add_argument("--blocks", metavar="3,6,9,12",
                     help="head mode: encoder blocks (1-based) whose tokens the light decoder reads "
                          "(default: 4 evenly spaced, ending with the last)")
    run.add_argument("--thick-slices", type=int, default=1, metavar="N",
                     help="simulate slices up to N voxels thick along S, for thick-slice scans (default 1: off)")
    run.add_argument("--seed", type=int, default=0)
    add_device(run, amp=True)


def _config(args: argparse.Namespace):
    from model_core.models.vit import ViT3DConfig
    from model_core.training.finetune import FinetuneConfig

    if args.model != SCRATCH and (args.config or args.overrides):
        raise Ar3dInputError("--config and --set choose the encoder for --model scratch only")
    return FinetuneConfig(
        mode=args.mode, annotation=args.annotation, labels=label_values(args.labels) if args.labels else "all",
        merge=dict(merge(item) for item in args.merge), background_label=args.background_label,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, window=args.window, crops_per_scan=args.crops,
        ckpt_every=args.ckpt_every, flip_prob=args.flip_prob, zoom=args.zoom, rotate=args.rotate,
        blocks=_blocks(args.blocks) if args.blocks else None, contrast_curve=args.contrast_curve, gamma=args.gamma, bias_field=args.bias_field, thick_slices=args.thick_slices,
        ct_window=ct_window(args.ct_window) if args.ct_window else None,
        spacing=spacing(args.spacing) if args.spacing else None,
        scratch_config=ViT3DConfig.from_spec(args.config or "tiny", **overrides(args.overrides)),
        seed=args.seed, device=args.device, amp=args.amp,
    )


def _blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise Ar3dInputError(f"--blocks {text!r} must be block numbers, comma-separated") from None


def run(args: argparse.Namespace) -> int:
    from model_core.progress import Cancelled
    from model_core.training.finetune import finetune

    cfg = _config(args)
    bars = PhaseProgress()
    try:
        with StopOnSignal() as stop:
            result = finetune(args.model, [tuple(pair) for pair in args.train], args.out, cfg,
                              provenance={"command": command_line(args)}, progress=bars, should_stop=stop,
                              resume=args.resume)
    except Cancelled:
        print("stopped before training; nothing was written", file=sys.stderr)
        return 130
    finally:
        bars.close()
    summary = (f"classes {', '.join(result.classes)}; {result.steps} steps, loss {result.loss:.4g}, "
               f"training Dice {result.dice:.3f}, {result.wall_s:.0f} s")
    if result.cancelled:
        print(f"stopped at step {result.steps}; model: {result.checkpoint} ({summary})")
        return 130
    print(f"model: {result.checkpoint} ({summary})")
    return 0


COMMAND = Command("finetune", "fine-tune a segmentation model on a few annotated scans", add_arguments, run)
