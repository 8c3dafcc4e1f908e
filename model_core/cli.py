"""The `ar3d` command line: `ar3d pretrain | info` (finetune, segment, explain, evaluate to come).

Each subcommand is a `Command`: a name, a one-line help, a function that adds its arguments and a
function that runs it and returns the exit code. Add one by writing those two functions and
listing it in `COMMANDS`. Heavy imports (torch, the model) happen inside the run functions so
that `ar3d --help` is instant.

Errors: `Ar3dInputError` (bad files, arguments, checkpoints) prints `ar3d: error: <message>` on
stderr and exits with code 2, without a traceback; argparse errors exit 2 too.

Model size on the command line: `--config` takes a preset (tiny, small, base) or a JSON file
(a ViT3DConfig dict, or a checkpoint's config.json whose "encoder" is used), and `--set KEY=VALUE`
(repeatable) overrides single fields, e.g. `--config tiny --set width=32 --set depth=2`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import Ar3dInputError

PRESETS = ("tiny", "small", "base")
SEQUENCE_KINDS = ("spatial", "contrast", "semantic")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------
# pretrain


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, metavar="PATH_OR_MANIFEST",
                   help="image files, folders, JSON manifests, or 'phantoms' / 'phantom:ct' / 'phantom:mri'")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    model = p.add_argument_group("model (fixed by the checkpoint on --resume)")
    model.add_argument("--config", metavar="SIZE_OR_JSON",
                       help=f"encoder size ({', '.join(PRESETS)}) or a JSON file; default tiny (the shipped size)")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override one encoder field, e.g. --set depth=2 (repeatable)")
    model.add_argument("--objective", choices=("ar", "mae"), help="autoregressive (default) or MAE baseline")
    data = p.add_argument_group("data (fixed by the checkpoint on --resume)")
    data.add_argument("--sequence", metavar="KINDS",
                      help="comma-separated sequence kinds (default spatial,contrast,semantic: those the data supports)")
    data.add_argument("--crop", type=int, help="in-plane size of each sub-volume in voxels (default 128)")
    data.add_argument("--slab", type=int, help="depth of each sub-volume in voxels (default 32)")
    data.add_argument("--spacing", metavar="MM", help="model voxel spacing: one value or three, comma-separated (default 1.5)")
    data.add_argument("--modality", choices=("CT", "MRI", "any"), help="recorded in the model card (default any)")
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
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    run.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="bf16 autocast (auto: where supported)")


def _pretrain(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .checkpoint import has_checkpoint, make_config
    from .data import SequenceConfig, make_pretrain_dataset
    from .models import ViT3D, ViT3DConfig
    from .objectives import build_objective
    from .preprocess import PreprocessConfig
    from .train import TrainConfig, train

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise Ar3dInputError("--out must be a folder, and this is a file", out)
    resuming = args.resume and has_checkpoint(out)
    if has_checkpoint(out) and not args.resume:
        raise Ar3dInputError("already holds a checkpoint; pass --resume to continue it or choose another --out folder", out)

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup if args.warmup is not None else args.steps // 20,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        seed=args.seed,
        num_workers=args.workers,
        amp=args.amp,
        device=args.device,
    )
    main_rank = int(os.environ.get("RANK", "0")) == 0
    settings = _run_settings(args, out, resuming)
    encoder_cfg = ViT3DConfig.from_dict(settings["encoder"])
    dataset_progress = _TqdmProgress(tqdm, "preprocessing", enabled=main_rank, unit="scan")
    try:
        dataset = make_pretrain_dataset(
            args.data,
            SequenceConfig.from_dict(settings["sequence"]),
            PreprocessConfig.from_dict(settings["preprocessing"]),
            seed=args.seed,
            cache_dir=args.cache_dir,
            n_phantoms=args.phantoms,
            progress=dataset_progress,
        )
    finally:
        dataset_progress.close()

    torch.manual_seed(args.seed)
    objective = build_objective(settings["objective"], ViT3D(encoder_cfg), **settings["options"])
    provenance = {
        "data": [str(d) for d in args.data],
        "licenses": _licenses(args.data),
        "sequence": settings["sequence"],
        "command": "ar3d " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
    }
    config = make_config(
        settings["encoder"],
        objective=settings["objective"],
        heads=_heads(settings["objective"], objective),
        preprocessing=settings["preprocessing"],
        modality=settings["modality"],
        provenance=provenance,
    )
    bar = _TqdmProgress(tqdm, "pretraining", enabled=main_rank, unit="step")
    try:
        with _StopOnSignal() as stop:
            result = train(objective, dataset, cfg, out, checkpoint_config=config, resume=args.resume,
                           progress=bar, should_stop=stop)
    finally:
        bar.close()
    if main_rank:
        if result.cancelled:
            print(f"stopped at step {result.step}; checkpoint: {result.checkpoint} (continue with --resume)")
            return 130
        print(f"checkpoint: {result.checkpoint} (step {result.step}, loss {result.loss:.4g}, log {out / 'loss_log.csv'})")
    return 0


def _run_settings(args: argparse.Namespace, out: Path, resuming: bool) -> dict:
    """Encoder, objective (and its options), sequence, preprocessing and modality of the run.

    A resumed run keeps the checkpoint's; options given again must agree with it.
    """
    from .checkpoint import read_config
    from .data import SequenceConfig
    from .preprocess import PreprocessConfig

    fresh = {
        "encoder": _encoder_config(args.config or "tiny", args.overrides).to_dict(),
        "objective": args.objective or "ar",
        "options": {},
        "sequence": SequenceConfig(
            kinds=_kinds(args.sequence or ",".join(SEQUENCE_KINDS)), crop=args.crop or 128, slab=args.slab or 32
        ).to_dict(),
        "preprocessing": PreprocessConfig(spacing=_spacing(args.spacing or "1.5")).to_dict(),
        "modality": args.modality or "any",
    }
    if not resuming:
        return fresh
    config = read_config(out)
    saved = {
        "encoder": config["encoder"],
        "objective": config["objective"],
        "options": config.get("heads", {}).get("mae_decoder", {}),
        "sequence": config["provenance"].get("sequence") or fresh["sequence"],
        "preprocessing": config["preprocessing"],
        "modality": config.get("modality", "any"),
    }
    given = {
        "encoder": args.config or args.overrides,
        "objective": args.objective,
        "sequence": args.sequence or args.crop or args.slab,
        "preprocessing": args.spacing,
        "modality": args.modality,
    }
    changed = [key for key, flag in given.items() if flag and fresh[key] != saved[key]]
    if changed:
        raise Ar3dInputError(
            f"the {' and '.join(changed)} settings differ from the checkpoint's; a resumed run keeps its "
            "settings (drop those options or choose another --out folder)", out / "config.json")
    return saved


def _encoder_config(spec: str, overrides: Sequence[str]):
    """A ViT3DConfig from a preset name or JSON file plus KEY=VALUE overrides."""
    from .models import ViT3DConfig

    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise Ar3dInputError(f"--set {item!r} is not KEY=VALUE")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    if spec in PRESETS:
        return ViT3DConfig.preset(spec, **values)
    path = Path(spec)
    if not path.is_file():
        raise Ar3dInputError(f"--config {spec!r} is neither a size ({', '.join(PRESETS)}) nor a JSON file")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Ar3dInputError(f"cannot read the model config ({exc})", path) from None
    if not isinstance(doc, dict):
        raise Ar3dInputError("model config must be a JSON object", path)
    encoder = doc.get("encoder", doc)
    return ViT3DConfig.from_dict({**encoder, **values})


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SEQUENCE_KINDS]
    if bad or not kinds:
        raise Ar3dInputError(f"--sequence {text!r}: choose among {', '.join(SEQUENCE_KINDS)}")
    return kinds


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or min(values) <= 0:
        raise Ar3dInputError(f"--spacing {text!r} must be one positive number or three, comma-separated")
    return tuple(values * 3 if len(values) == 1 else values)


def _heads(objective_name: str, objective) -> dict:
    """What the checkpoint holds beside the encoder (and how to rebuild it)."""
    if objective_name == "ar":
        return {"next_token": {"type": "linear", "out_features": objective.head.proj.out_features}}
    return {"mae_decoder": {
        "mask_ratio": objective.mask_ratio,
        "decoder_width": objective.decoder_embed.out_features,
        "decoder_depth": len(objective.decoder_blocks),
        "decoder_heads": objective.decoder_blocks[0].attn.heads,
    }}


def _licenses(data: Sequence[str]) -> list[str]:
    """Licenses of the data, as far as the manifests say: one entry per distinct license."""
    found: list[str] = []
    for item in data:
        text = str(item)
        if text == "phantoms" or text.startswith("phantom:"):
            found.append("procedural phantoms (generated by napari-ar3d)")
            continue
        path = Path(text)
        manifest = path / "manifest.json" if path.is_dir() else path
        if manifest.suffix == ".json" and manifest.is_file():
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            cases = doc.get("cases", []) if isinstance(doc, dict) else doc
            found += [str(c["license"]) for c in cases if isinstance(c, dict) and c.get("license")
                      and "pretrain" in c.get("use", ["pretrain"])]
        else:
            found.append(f"unknown ({text})")
    return list(dict.fromkeys(found))


class _TqdmProgress:
    """A `model_core.progress` callback that drives a tqdm bar (on stderr)."""

    def __init__(self, tqdm, desc: str, enabled: bool = True, unit: str = "it"):
        self.tqdm, self.desc, self.enabled, self.unit = tqdm, desc, enabled, unit
        self.bar = None

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = self.tqdm(total=p.total or None, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        self.bar.update(p.step - self.bar.n)
        if p.metrics:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in p.metrics.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StopOnSignal:
    """`should_stop` for Ctrl-C / SIGTERM: the first signal stops training cleanly, a second kills."""

    def __init__(self):
        self.stop = False
        self.previous = {}

    def __enter__(self) -> Callable[[], bool]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return lambda: self.stop

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step (saving a checkpoint); press Ctrl-C again to kill", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# demo


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="ar3d-demo", metavar="DIR", help="folder for the demo's files (default ar3d-demo)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, seed=args.seed)
    s = result.summary
    print(f"CT phantom {s['shape'][0]}x{s['shape'][1]}x{s['shape'][2]} voxels, spacing {s['spacing_mm']} mm, "
          f"orientation {s['orientation']}; {len(s['classes'])} labelled structures")
    print(f"geometry checked: liver centroid at RAS {s['liver_centroid_ras_mm']} mm "
          f"(patient's right: {s['liver_on_patient_right']})")
    for name, path in result.files.items():
        print(f"  {name:12s} {path}")
    files = " ".join(str(result.files[k]) for k in ("image", "labels"))
    print(f"open them in napari with:  napari {files} --plugin napari-ar3d")
    return 0


# ---------------------------------------------------------------------------------------------
# info


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="NAME_OR_DIR", help="a shipped model's name or a checkpoint folder")


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import DEFAULT_ENCODER, ENCODER_ENV, list_shipped, read_config, resolve_model

    if args.model is None:
        names = list_shipped()
        if not names:
            print(f"no models are shipped with this version; pass a checkpoint folder, or set {ENCODER_ENV}=DIR "
                  f"to use one as {DEFAULT_ENCODER!r}")
        for name in names:
            print(f"{name}: {_summary(read_config(resolve_model(name)))}")
        return 0
    path = resolve_model(args.model)
    config = read_config(path)
    for key, value in _card(path, config):
        print(f"{key}: {value}")
    return 0


def _summary(config: dict) -> str:
    enc, prov = config["encoder"], config.get("provenance", {})
    steps = f", {prov['steps']} steps" if "steps" in prov else ""
    return f"{config['architecture']} width {enc.get('width')} depth {enc.get('depth')}, objective {config.get('objective')}{steps}"


def _card(path: Path, config: dict) -> list[tuple[str, str]]:
    """The model card of a checkpoint as (field, text) rows."""
    from safetensors import safe_open

    from .checkpoint import TRAIN_STATE_DIR, WEIGHTS_FILE

    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    prov = dict(config.get("provenance", {}))
    prov.pop("train", None)
    rows = [
        ("model", str(path)),
        ("architecture", _summary(config)),
        ("encoder", ", ".join(f"{k}={v}" for k, v in config["encoder"].items())),
        ("parameters", f"{n_params / 1e6:.2f} M (all tensors in {WEIGHTS_FILE})"),
        ("heads", ", ".join(config.get("heads", {})) or "none"),
        ("modality", config.get("modality", "any")),
        ("preprocessing", json.dumps(config.get("preprocessing", {}))),
        ("classes", ", ".join(config.get("classes", [])) or "none (an encoder)"),
        ("resumable", "yes" if (path / TRAIN_STATE_DIR / "state.json").is_file() else "no"),
    ]
    for key, value in prov.items():
        rows.append((key, ", ".join(map(str, value)) if isinstance(value, list) else
                     json.dumps(value) if isinstance(value, dict) else str(value)))
    return rows


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------
# explain


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="a 3D image: NIfTI, NRRD, MHA/MHD or a DICOM folder")
    p.add_argument("--model", default="ar3d-encoder", metavar="NAME_OR_DIR",
                   help="an AR-pretrained checkpoint folder or a shipped model's name (default ar3d-encoder)")
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
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=0)


def _explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .explain import explain

    query = _three(args.query, int, "--query") if args.query else None
    query_mm = _three(args.query_mm, float, "--query-mm") if args.query_mm else None
    maps = [m.strip() for m in args.maps.split(",") if m.strip()]
    bar = _TqdmProgress(tqdm, "explain", unit="step")
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


def _three(text: str, kind: type, option: str) -> tuple:
    """Three comma-separated numbers of `kind` (int or float)."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        what = "whole numbers" if kind is int else "numbers"
        raise Ar3dInputError(f"{option} {text!r} must be three comma-separated {what}")
    return values


# ---------------------------------------------------------------------------------------------


COMMANDS = [
    Command("demo", "the built-in default job: write the CT phantom, check its geometry, show how to open it", _demo_arguments, _demo),
    Command("pretrain", "pretrain an encoder (autoregressive or MAE); torchrun-ready", _pretrain_arguments, _pretrain),
    Command("info", "list shipped models, or print a checkpoint's model card", _info_arguments, _info),
    Command("explain", "attention, next-token prediction, surprise and PCA maps of a scan", _explain_arguments, _explain),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ar3d", description="napari-ar3d: pretrain, fine-tune and inspect 3D CT/MRI encoders."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _one_line(err: Exception) -> str:
    """The message of an error, also when a DataLoader worker wrapped it with its traceback."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    last = lines[-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ar3d` with `argv` (default: sys.argv[1:]); returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return args.run(args)
    except Ar3dInputError as err:
        print(f"ar3d: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
