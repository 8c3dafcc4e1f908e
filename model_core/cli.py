"""The `ar3d` command line: `ar3d demo | pretrain | info | explain | finetune | segment | evaluate`.

Each subcommand is a `Command`: a name, a one-line help, a function that adds its arguments and a
function that runs it and returns the exit code. Add one by writing those two functions and
listing it in `COMMANDS`. Heavy imports (torch, the model) happen inside the run functions so
that `ar3d --help` is instant.

Errors: `Ar3dInputError` (bad files, arguments, checkpoints) prints `ar3d: error: <message>` on
stderr and exits with code 2, without a traceback; argparse errors exit 2 too. Warnings from the
core (e.g. "CUDA out of memory ...; falling back to CPU") print as `ar3d: warning: <message>`.

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
import warnings
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


def _ct_window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise Ar3dInputError(f"--ct-window {text!r} must be two numbers LOW,HIGH in HU") from None
    return low, high


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
        if p.total and p.total != self.bar.total:  # e.g. a retry with fewer windows per batch
            self.bar.reset(total=p.total)
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
    p.add_argument("--model", default="ar3d-ct-organs", metavar="NAME_OR_DIR",
                   help="segmentation model (default ar3d-ct-organs)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")


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


def _demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .demo import DEFAULT_EXPLAINER, run_demo

    bars = _PhaseProgress(tqdm)
    try:
        result = run_demo(args.out, seed=args.seed, segmenter=args.model, device=args.device, progress=bars)
    finally:
        bars.close()
    s, t = result.summary, result.timings
    print(f"CT phantom (seed {s['seed']}) {s['shape'][0]}x{s['shape'][1]}x{s['shape'][2]} voxels, spacing "
          f"{s['spacing_mm']} mm, orientation {s['orientation']}; {len(s['classes'])} labelled structures")
    print(f"geometry checked: liver centroid at RAS {s['liver_centroid_ras_mm']} mm "
          f"(patient's right: {s['liver_on_patient_right']})")
    print(f"segmented with {args.model} in {t['segment']:.1f} s; explained with {DEFAULT_EXPLAINER} "
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


# ---------------------------------------------------------------------------------------------
# info


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="NAME_OR_DIR", help="a shipped model's name or a checkpoint folder")


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import DEFAULT_ENCODER, ENCODER_ENV, SHIPPED_DIR, list_shipped, read_config, resolve_model

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
    if path.parent == SHIPPED_DIR:
        card = Path(__file__).resolve().parents[1] / "docs" / "models" / f"{path.name}.md"
        print(f"model card: {card if card.is_file() else f'docs/models/{path.name}.md in the napari-ar3d repository'}")
    return 0


def _summary(config: dict) -> str:
    enc, prov = config["encoder"], config.get("provenance", {})
    steps = f", {prov['steps']} steps" if "steps" in prov else ""
    return f"{config['architecture']} width {enc.get('width')} depth {enc.get('depth')}, objective {config.get('objective')}{steps}"


def _card(path: Path, config: dict) -> list[tuple[str, str]]:
    """The model card of a checkpoint as (field, text) rows."""
    from .checkpoint import TRAIN_STATE_DIR, WEIGHTS_FILE, count_values

    n_params = count_values(path)
    prov = dict(config.get("provenance", {}))
    prov.pop("train", None)
    rows = [
        ("model", str(path)),
        ("architecture", _summary(config)),
        ("encoder", ", ".join(f"{k}={v}" for k, v in config["encoder"].items())),
        ("parameters", f"{n_params / 1e6:.2f} M (all tensors in {WEIGHTS_FILE})"),
        ("heads", ", ".join(config.get("heads", {})) or "none"),
        *_segmentation_rows(config),
        ("modality", config.get("modality", "any")),
        ("preprocessing", json.dumps(config.get("preprocessing", {}))),
        ("classes", ", ".join(f"{k}={name}" for k, name in enumerate(config.get("classes", []), 1))
         or "none (an encoder)"),
        ("resumable", "yes" if (path / TRAIN_STATE_DIR / "state.json").is_file() else "no"),
    ]
    for key, value in prov.items():
        rows.append((key, ", ".join(map(str, value)) if isinstance(value, list) else
                     json.dumps(value) if isinstance(value, dict) else str(value)))
    return rows


def _segmentation_rows(config: dict) -> list[tuple[str, str]]:
    """The decoder and window of a segmentation model (none for an encoder)."""
    head = config.get("heads", {}).get("segmentation")
    if not isinstance(head, dict) or "decoder" not in head:
        return []
    decoder = dict(head["decoder"])
    kind = decoder.pop("kind", "?")
    options = ", ".join(f"{k}={v}" for k, v in decoder.items())
    return [("decoder", f"{kind} ({options}), window {'x'.join(map(str, head.get('roi', [])))} voxels")]


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
# finetune


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
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
    labels.add_argument("--annotation", choices=("full", "sparse"), default="full",
                        help="full: 0 is background; sparse (scribbles): 0 is unannotated and ignored")
    labels.add_argument("--background-label", metavar="NAME_OR_VALUE",
                        help="sparse annotation: the label that is background (default: the one named background)")
    model = p.add_argument_group("model")
    model.add_argument("--mode", choices=("head", "full"), default="head",
                       help="head: frozen encoder, light decoder on cached features (fast on a CPU); "
                            "full: UNETR decoder and encoder with layer-wise lr decay")
    model.add_argument("--config", metavar="SIZE_OR_JSON", help="encoder size for --model scratch (default tiny)")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override one encoder field for --model scratch (repeatable)")
    model.add_argument("--spacing", metavar="MM", help="model voxel spacing (default: the encoder's, else 1.5)")
    model.add_argument("--roi", type=int, metavar="VOXELS", help="window edge (default 6 patches: 96 for 16^3)")
    model.add_argument("--ct-window", metavar="LOW,HIGH",
                       help="HU window of the CT input for --model scratch (default -160,240: soft tissue); "
                            "a pretrained encoder keeps its own")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=int, help="optimizer steps (default 400 head, 300 full)")
    run.add_argument("--batch-size", type=int, default=2, help="crops per step (default 2)")
    run.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 head, 1e-4 full)")
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
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    run.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="bf16 autocast (auto: where supported)")


def _finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .finetune import SCRATCH, FinetuneConfig, finetune
    from .io import read_label_names
    from .progress import Cancelled

    if args.model != SCRATCH and (args.config or args.overrides):
        raise Ar3dInputError("--config and --set choose the encoder for --model scratch only")
    names: dict[int, str] = {}
    for _, seg in args.train:
        names = {**read_label_names(seg), **names}
    cfg = FinetuneConfig(
        mode=args.mode,
        annotation=args.annotation,
        labels=_label_values(args.labels) if args.labels else "all",
        merge=dict(_merge(item) for item in args.merge),
        background_label=args.background_label,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        roi=args.roi,
        crops_per_scan=args.crops,
        ckpt_every=args.ckpt_every,
        flip_prob=args.flip_prob,
        zoom=args.zoom,
        rotate=args.rotate,
        ct_window=_ct_window(args.ct_window) if args.ct_window else None,
        spacing=_spacing(args.spacing) if args.spacing else None,
        scratch_config=_encoder_config(args.config or "tiny", args.overrides),
        seed=args.seed,
        device=args.device,
        amp=args.amp,
    )
    command = "ar3d " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    bars = _PhaseProgress(tqdm)
    try:
        with _StopOnSignal() as stop:
            result = finetune(args.model, [tuple(pair) for pair in args.train], args.out, cfg, class_names=names,
                              provenance={"command": command}, progress=bars, should_stop=stop, resume=args.resume)
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


def _label_values(text: str) -> str | list[int]:
    if text.strip() == "all":
        return "all"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise Ar3dInputError(f"--labels {text!r} must be 'all' or positive label values, comma-separated")
    return values


def _merge(item: str) -> tuple[str, list[int]]:
    name, sep, values = item.partition("=")
    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not sep or not name.strip() or not numbers or min(numbers) < 1:
        raise Ar3dInputError(f"--merge {item!r} is not NAME=VALUE,VALUE,... with positive label values")
    return name.strip(), numbers


class _PhaseProgress:
    """One tqdm bar per phase of a job (the `Progress.message`: reading, caching, training...)."""

    def __init__(self, tqdm):
        self.tqdm, self.message, self.bar = tqdm, None, None

    def __call__(self, p) -> None:
        if p.message != self.message:
            self.close()
            self.message, self.bar = p.message, _TqdmProgress(self.tqdm, p.message, unit="step")
        self.bar(p)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------------
# segment


def _segment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="3D images: NIfTI, NRRD, MHA/MHD or DICOM folders")
    p.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="a fine-tuned segmentation model")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTPUT",
                   help="label file for one input (.nii.gz, .nii, .nrrd, .mha); a folder for several. "
                        "The class names go beside each label file as <name>.labels.json")
    p.add_argument("--probabilities", action="store_true",
                   help="also write each class's probability (<name>_prob_<class>) and the uncertainty beside")
    p.add_argument("--modality", choices=("CT", "MRI"), help="modality hint for the intensity normalisation")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring windows (default 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--tta", action="store_true",
                   help="average the 8 mirror images of each window (8x slower; only for models fine-tuned with "
                        "flips: a mirror swaps left and right organs)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")


def _segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .infer import load_segmenter, segment
    from .io import WRITE_SUFFIXES, read_volume, split_suffix, volume_format, write_label_names, write_volume

    for item in args.inputs:
        if not Path(item).exists():
            raise Ar3dInputError("file not found", item)
        if volume_format(item) is None:
            raise Ar3dInputError("not a NIfTI, NRRD, MHA/MHD file or DICOM folder", item)
    targets = _label_outputs(args.inputs, args.output, WRITE_SUFFIXES)
    segmenter = load_segmenter(args.model)
    for item, (target, base) in zip(args.inputs, targets):
        volume = read_volume(item)
        bar = _TqdmProgress(tqdm, Path(item).name, unit="batch")
        try:
            result = segment(segmenter, volume, device=args.device, sw_batch_size=args.sw_batch_size,
                             overlap=args.overlap, probabilities=args.probabilities, modality=args.modality,
                             tta=args.tta, progress=bar)
        finally:
            bar.close()
        written: list[Path] = []
        try:
            if args.probabilities:
                suffix = split_suffix(target)[1]
                for name, prob in zip(["background", *result.classes], result.probabilities):
                    written.append(write_volume(f"{base}_prob_{_file_safe(name)}{suffix}", prob,
                                                volume.affine, kind="float", like=volume))
                written.append(write_volume(f"{base}_uncertainty{suffix}", result.uncertainty,
                                            volume.affine, kind="float", like=volume))
            written.append(write_label_names(target, dict(enumerate(result.classes, 1))))
            written.append(write_volume(target, result.labels, volume.affine, kind="labels", like=volume))
        except BaseException:
            for path in written:  # the label map is written last: an input's files appear together or not at all
                path.unlink(missing_ok=True)
            raise
        counts = ", ".join(f"{name} {int((result.labels == k).sum())}" for k, name in enumerate(result.classes, 1))
        print(f"{target} ({counts} voxels)")
    return 0


def _label_outputs(inputs: Sequence[str], output: Path, suffixes: Sequence[str]) -> list[tuple[Path, Path]]:
    """(label file, stem for the probability files) of each input.

    One input: `output` itself, e.g. out.nii.gz and out_prob_<class>.nii.gz. Several (or `output` is a
    folder): <output>/<input name>_seg.<ext> and <output>/<input name>_prob_<class>.<ext>.
    """
    from .io import split_suffix

    if len(inputs) == 1 and not output.is_dir():
        if not output.name.lower().endswith(tuple(suffixes)):
            raise Ar3dInputError(f"the output must end with one of {', '.join(suffixes)} (or be a folder)", output)
        if not output.parent.is_dir():
            raise Ar3dInputError(f"folder {output.parent} does not exist", output)
        return [(output, output.parent / split_suffix(output)[0])]
    if output.exists() and not output.is_dir():
        raise Ar3dInputError("with several inputs the output must be a folder, and this is a file", output)
    targets = []
    for item in inputs:
        stem, suffix = split_suffix(Path(item))
        targets.append((output / f"{stem}_seg{suffix if suffix.lower() in suffixes else '.nii.gz'}", output / stem))
    names = [t.name for t, _ in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise Ar3dInputError(f"several inputs would write {', '.join(duplicates)}; segment them into separate folders")
    output.mkdir(parents=True, exist_ok=True)
    return targets


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ---------------------------------------------------------------------------------------------
# evaluate


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, type=Path, metavar="P", help="predicted label map")
    p.add_argument("--truth", required=True, type=Path, metavar="T", help="reference label map on the same grid")
    p.add_argument("--labels", metavar="1,2", help="label values to score (default: every non-zero value found)")
    p.add_argument("--by-name", action="store_true",
                   help="pair the classes by name (from <file>.labels.json or labels.json beside each map), "
                        "for maps that number them differently")
    p.add_argument("--merge", action="append", default=[], metavar="NAME=1,2,3",
                   help="with --by-name: join these truth values into the class NAME (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _evaluate(args: argparse.Namespace) -> int:
    import math

    from .evaluate import evaluate_volumes, mean_dice, truth_by_name
    from .io import label_names_path, read_label_names, read_volume

    labels = _label_values(args.labels) if args.labels else None
    if labels == "all":
        labels = None
    if args.merge and not args.by_name:
        raise Ar3dInputError("--merge joins truth classes for --by-name; add --by-name")
    pred, truth = read_volume(args.pred), read_volume(args.truth)
    truth_names = read_label_names(args.truth)
    names, unmatched = truth_names, []
    if args.by_name:
        names = read_label_names(args.pred)
        for path, found in ((args.pred, names), (args.truth, truth_names)):
            if not found:
                raise Ar3dInputError(f"--by-name needs class names beside the file ({label_names_path(path).name} "
                                     "or labels.json)", path)
        truth.array, matched, unmatched = truth_by_name(truth.array, truth_names, names,
                                                        dict(_merge(item) for item in args.merge))
        if not matched:
            raise Ar3dInputError(f"no class of {args.pred} ({', '.join(names.values())}) has a namesake in "
                                 f"{args.truth} ({', '.join(truth_names.values())}); --merge can join truth classes")
        labels = [v for v in matched if labels is None or v in labels]
    scores = evaluate_volumes(pred, truth, labels)

    def number(x: float) -> float | None:
        return None if math.isnan(x) or math.isinf(x) else round(x, 4)

    if args.json:
        print(json.dumps({
            "pred": str(args.pred), "truth": str(args.truth),
            "classes": [{"label": s.label, "name": names.get(s.label), "dice": number(s.dice),
                         "hd95_mm": number(s.hd95_mm), "truth_voxels": s.truth_voxels, "pred_voxels": s.pred_voxels}
                        for s in scores],
            "mean_dice": number(mean_dice(scores)),
            "not_in_truth": unmatched,
        }, indent=2))
        return 0
    print(f"{'label':>5}  {'name':<20} {'dice':>6} {'hd95_mm':>8} {'truth':>9} {'pred':>9}")
    for s in scores:
        print(f"{s.label:>5}  {names.get(s.label, ''):<20} {s.dice:>6.3f} {s.hd95_mm:>8.2f} "
              f"{s.truth_voxels:>9} {s.pred_voxels:>9}")
    print(f"mean Dice {mean_dice(scores):.3f} over {sum(not math.isnan(s.dice) for s in scores)} classes")
    if unmatched:
        print(f"not scored (no truth class of that name): {', '.join(unmatched)}")
    return 0


# ---------------------------------------------------------------------------------------------


COMMANDS = [
    Command("demo", "the built-in default job: a CT phantom, segmented and explained, with how to open the files",
            _demo_arguments, _demo),
    Command("pretrain", "pretrain an encoder (autoregressive or MAE); torchrun-ready", _pretrain_arguments, _pretrain),
    Command("info", "list shipped models, or print a checkpoint's model card", _info_arguments, _info),
    Command("explain", "attention, next-token prediction, surprise and PCA maps of a scan", _explain_arguments, _explain),
    Command("finetune", "fine-tune a segmentation model on a few annotated scans", _finetune_arguments, _finetune),
    Command("segment", "segment scans with a fine-tuned model; labels in each input's own geometry",
            _segment_arguments, _segment),
    Command("evaluate", "Dice and HD95 per class of a label map against a reference", _evaluate_arguments, _evaluate),
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings from the core (a modality mismatch, an out-of-memory fallback) as one line on stderr."""
    print(f"ar3d: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ar3d` with `argv` (default: sys.argv[1:]); returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except Ar3dInputError as err:
        print(f"ar3d: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
