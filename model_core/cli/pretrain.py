"""`ar3d pretrain`: pretrain an encoder (autoregressive, MAE, Alice or HLIP); torchrun-ready."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from model_core.cli._common import Command, StopOnSignal, TqdmProgress, add_device, command_line, overrides, spacing
from model_core.cli._hlip import add_hlip_arguments, hlip_options
from model_core.errors import Ar3dInputError
from model_core.vocabulary import (
    ENCODER_SIZES,
    HLIP_SCANS,
    MAX_STUDY_SCANS,
    MODALITIES,
    MODALITY_ANY,
    PRETRAIN_WINDOW,
    SEQUENCE_KINDS,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, metavar="PATH_OR_MANIFEST",
                   help="image files, folders, JSON manifests, or 'phantoms' / 'phantom:ct' / 'phantom:mri'; "
                        "hlip: studies manifests (.json) or 'phantom-studies' / 'phantom-studies:ct' / ':mri'")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    p.add_argument("--init", metavar="NAME_OR_DIR",
                   help="start a new run from this checkpoint's encoder (e.g. ar3d-encoder: continue pretraining it "
                        "on more data); its size and spacing are kept, the optimizer starts afresh")
    model = p.add_argument_group("model (fixed by the checkpoint on --resume)")
    model.add_argument("--config", metavar="SIZE_OR_JSON",
                       help=f"encoder size ({', '.join(ENCODER_SIZES)}) or a JSON file; default tiny (the shipped size)")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override one encoder field, e.g. --set depth=2 (repeatable)")
    model.add_argument("--objective", choices=("ar", "mae", "alice", "hlip"),
                       help="autoregressive (default), MAE baseline, Alice (cross-patient views, EMA teacher), or "
                            "HLIP (studies and reports: slice / scan / study attention, contrastive)")
    model.add_argument("--stats-weight", type=float, default=0.1, metavar="W",
                       help="ar: weight of the next patch's brightness and texture beside its normalised voxels, "
                            "which the surprise map needs (default 0.1; 0: the paper's objective alone)")
    add_hlip_arguments(p)
    data = p.add_argument_group("data (fixed by the checkpoint on --resume)")
    data.add_argument("--sequence", metavar="KINDS",
                      help="comma-separated sequence kinds (default spatial,contrast,semantic: those the data supports)")
    data.add_argument("--crop", type=int,
                      help=f"in-plane size of each sub-volume in voxels (default {PRETRAIN_WINDOW[0]}; alice: 64)")
    data.add_argument("--slab", type=int,
                      help=f"depth of each sub-volume in voxels (default {PRETRAIN_WINDOW[2]}; alice: 64)")
    data.add_argument("--spacing", metavar="MM", help="model voxel spacing: one value or three, comma-separated (default 1.5)")
    data.add_argument("--modality", choices=(*MODALITIES, MODALITY_ANY), help="recorded in the model card (default any)")
    data.add_argument("--phantoms", type=int, default=8, metavar="N", help="phantoms of each kind for 'phantoms' (default 8)")
    data.add_argument("--cache-dir", type=Path, default=os.environ.get("AR3D_CACHE"),
                      help="folder for preprocessed scans (default $AR3D_CACHE; unset: memory only)")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=int, default=10000, help="optimizer steps in all (default 10000)")
    run.add_argument("--batch-size", type=int, default=2, help="sequences per step and per process (default 2)")
    run.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    run.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    run.add_argument("--warmup", type=int, help="linear warmup steps (default 5%% of --steps)")
    run.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of the peak (default 0)")
    run.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none (default 1)")
    run.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints (default 500)")
    run.add_argument("--log-every", type=int, default=10, help="steps between loss_log.csv rows (default 10)")
    run.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training step (compiling takes minutes; then each step is faster)")
    add_device(run, amp=True)


def _settings(args: argparse.Namespace):
    """The run's settings from the options (a resumed run keeps its checkpoint's)."""
    from model_core.data.preprocess import PreprocessConfig
    from model_core.models.vit import ViT3DConfig
    from model_core.objectives.registry import objective_entry
    from model_core.training.pretrain import PretrainSettings, init_settings, resolve_settings

    window = objective_entry(args.objective or "ar").window
    fresh = PretrainSettings(
        encoder=ViT3DConfig.from_spec(args.config or "tiny", **{**_encoder_defaults(args), **overrides(args.overrides)})
        .to_dict(),
        objective=args.objective or "ar",
        options=_options(args),
        sequence=_sequence(args, window).to_dict(),
        preprocessing=PreprocessConfig(spacing=spacing(args.spacing or "1.5")).to_dict(),
        modality=args.modality or MODALITY_ANY,
    )
    given = {"encoder": bool(args.config or args.overrides), "objective": bool(args.objective),
             "sequence": bool(args.sequence or args.crop or args.slab or args.scans), "preprocessing": bool(args.spacing),
             "modality": bool(args.modality)}
    if args.init:
        if args.config or args.overrides:
            raise Ar3dInputError("--config and --set choose a new encoder; --init keeps the size of the one it starts from")
        fresh = init_settings(args.init, fresh)
    return resolve_settings(args.out, fresh, given, args.resume)


def _options(args: argparse.Namespace) -> dict:
    """The objective's options from the command line."""
    objective = args.objective or "ar"
    if objective == "hlip":
        return hlip_options(args)
    return {"stats_weight": args.stats_weight} if objective == "ar" and args.stats_weight else {}


def _sequence(args: argparse.Namespace, window: tuple[int, int, int]):
    """What a sample looks like; for hlip, n_sub is the number of scans per sample."""
    from model_core.data.pretraining import SequenceConfig

    crop, slab = args.crop or window[0], args.slab or window[2]
    if args.objective == "hlip":
        return SequenceConfig(kinds=("spatial",), crop=crop, slab=slab, n_sub=args.scans or HLIP_SCANS)
    return SequenceConfig(kinds=_kinds(args.sequence or ",".join(SEQUENCE_KINDS)), crop=crop, slab=slab)


def _encoder_defaults(args: argparse.Namespace) -> dict:
    """hlip: an encoder that takes up to 40 scans per study (the size of the fixed scan-index table)."""
    return {"max_subvolumes": MAX_STUDY_SCANS} if args.objective == "hlip" and not args.init else {}


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SEQUENCE_KINDS]
    if bad or not kinds:
        raise Ar3dInputError(f"--sequence {text!r}: choose among {', '.join(SEQUENCE_KINDS)}")
    return kinds


def run(args: argparse.Namespace) -> int:
    from model_core.training.loop import LOSS_LOG, TrainConfig
    from model_core.training.pretrain import pretrain

    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup if args.warmup is not None else args.steps // 20, min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip, ckpt_every=args.ckpt_every, log_every=args.log_every, seed=args.seed,
        num_workers=args.workers, amp=args.amp, device=args.device, compile=args.compile,
    )
    main_rank = int(os.environ.get("RANK", "0")) == 0
    settings = _settings(args)
    data_bar = TqdmProgress("preprocessing", enabled=main_rank, unit="scan")
    bar = TqdmProgress("pretraining", enabled=main_rank, unit="step")
    try:
        with StopOnSignal() as stop:
            result = pretrain(args.data, args.out, settings, cfg, resume=args.resume, init=args.init,
                              n_phantoms=args.phantoms,
                              cache_dir=args.cache_dir, provenance={"command": command_line(args)},
                              data_progress=data_bar, progress=bar, should_stop=stop)
    finally:
        data_bar.close()
        bar.close()
    if main_rank:
        if result.cancelled:
            print(f"stopped at step {result.step}; checkpoint: {result.checkpoint} (continue with --resume)")
            return 130
        print(f"checkpoint: {result.checkpoint} (step {result.step}, loss {result.loss:.4g}, log {args.out / LOSS_LOG})")
    return 0


COMMAND = Command("pretrain", "pretrain an encoder (autoregressive, MAE, Alice or HLIP); torchrun-ready",
                  add_arguments, run)
