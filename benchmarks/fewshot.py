"""Few-shot segmentation on the shared real data: pretrained encoders against scratch and a UNet, with intervals.

Tasks (cases from `<data>/manifest.json`):
- brats_whole_tumor: BraTS 2015 dev cases (FLAIR), whole tumour = every label > 0, merged into one class;
  leave-one-out;
- brats_classes: the same cases, one model for the four classes (necrosis, edema, non-enhancing,
  enhancing), Dice per class; leave-one-out;
- spleen: the TotalSegmentator CT cases whose labels.json names a spleen (silver labels); leave-one-out;
- hippocampus: MSD hippocampus (anterior and posterior): a learning curve, training on the first
  1, 2, 5, 10 (`--train-sizes`) cases of a seeded draw and testing each model on the same
  `--test-cases` held-out cases;
- tcia_followup: TCIA glioblastoma, T1 post-contrast tumour: train on a patient's first study, segment
  the follow-up.

Each split trains every initialisation once and segments its test cases
(`model_core.inference.segment`, on their own grid), scored with `model_core.inference.evaluate`
(Dice; HD95 in the JSON). The summary gives, per task, training-set size and class, the mean Dice of
each initialisation and the paired difference of ar against the others with a 95 % bootstrap
interval over the test cases (`paired_dice.bootstrap_interval`). Initialisations:
- ar: the AR-pretrained encoder (`--ar DIR` or a shipped name), `ar3d finetune --mode head` (or `--mode full`);
- mae: the MAE-pretrained encoder (`--mae DIR`), same settings;
- scratch: a randomly initialised encoder of the same size (of `--ar`'s, else `--scratch-config`);
- unet: MONAI `UNet` trained from scratch on the same preprocessed scans and crops, with the same
  DiceCE loss, for the same wall-clock time as the first pretrained initialisation took on that
  fold (or `--unet-seconds`).

Augmentation: flips (probability 0.5 per axis) for the brain tumour tasks, none for the spleen
(mirroring swaps left and right organs); MONAI crops and intensity jitter for all. `--tta` also
averages the 8 mirror images of each window at inference on the tasks trained with flips.

    python benchmarks/fewshot.py --quick                       # smoke check: one fold, few steps
    python benchmarks/fewshot.py --ar runs/ar --mae runs/mae --markdown fewshot.md --out fewshot.json
    python benchmarks/fewshot.py --ar ar3d-encoder --inits ar,scratch,unet --tasks hippocampus,tcia_followup

Prints a Markdown table (Dice of every left-out case, the mean, and the mean fine-tuning time) for
docs/benchmarks.md. BraTS is non-commercial data: it is only fine-tuned and evaluated on here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared machine

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_core.checkpoint.store import read_config, resolve_model
from model_core.data.finetuning import CropDataset, class_map, prepare_scan
from model_core.data.preprocess import (
    IntensityConfig,
    PreprocessConfig,
    as_label_array,
    guess_modality,
    preprocess_volume,
    voxel_spacing,
)
from model_core.data.pretraining import cases_from_manifest
from model_core.device import resolve_device
from model_core.inference.evaluate import evaluate_labels
from model_core.inference.segment import Segmenter, load_segmenter, segment
from model_core.io.volume import Volume, read_volume
from model_core.models.vit import ViT3DConfig
from model_core.objectives.segmentation import dice_ce_loss
from model_core.training.finetune import FinetuneConfig, finetune


@dataclass
class Split:
    train: list  # model_core.data.pretraining.Case
    test: list
    name: str  # e.g. the left-out case, or "n=5"


@dataclass
class Task:
    name: str
    cases: list  # model_core.data.pretraining.Case
    labels: str | list[int]  # FinetuneConfig.labels
    merge: dict[str, list[int]]
    scored: dict[str, list[int]]  # reported class name -> truth label values it covers
    flip_prob: float  # flips are natural for brain tumours, not for left/right organs
    splits: list[Split] = field(default_factory=list)  # default: leave-one-out over `cases`

    def __post_init__(self) -> None:
        if not self.splits:
            self.splits = [Split([c for c in self.cases if c is not case], [case], case.id) for case in self.cases]


@dataclass
class Run:
    task: str
    init: str
    case: str
    dice: dict[str, float]
    hd95_mm: dict[str, float]
    seconds: float
    extra: dict = field(default_factory=dict)
    n_train: int = 0  # training cases of the model that segmented `case`


def tasks(data: Path, names: list[str], args) -> list[Task]:
    cases = cases_from_manifest(data / "manifest.json", use="finetune")
    brats = [c for c in cases if c.id.startswith("brats2015_")]
    spleen = [c for c in cases if c.id.startswith("totalseg_") and "spleen" in c.labels.values()
              and guess_modality(np.zeros(1), c.modality) == "ct"]
    out = []
    if "brats_whole_tumor" in names and len(brats) >= 2:
        out.append(Task("brats_whole_tumor", brats, "all", {"whole_tumor": [1, 2, 3, 4]}, {"whole_tumor": [1, 2, 3, 4]},
                        flip_prob=0.5))
    if "brats_classes" in names and len(brats) >= 2:
        scored = {brats[0].labels[v]: [v] for v in sorted(brats[0].labels)}
        out.append(Task("brats_classes", brats, [1, 2, 3, 4], {}, scored, flip_prob=0.5))
    if "spleen" in names and len(spleen) >= 2:
        # One class, named spleen, whatever its value in each case's labels.json (the same here: 1).
        value = next(v for v, n in spleen[0].labels.items() if n == "spleen")
        if all(c.labels.get(value) == "spleen" for c in spleen):
            out.append(Task("spleen", spleen, [value], {}, {"spleen": [value]}, flip_prob=0.0))
    hippocampus = [c for c in cases if c.id.startswith("msd_hippocampus_")]
    if "hippocampus" in names and len(hippocampus) > args.test_cases:
        out.append(learning_curve(hippocampus, args))
    if "tcia_followup" in names:
        out += followup_tasks([c for c in cases if c.id.startswith("tcia_") and c.seg])
    return out


def learning_curve(cases: list, args) -> Task:
    """Hippocampus: the same `args.test_cases` held-out cases for every size; the training cases drawn by seed."""
    order = np.random.default_rng(0).permutation(len(cases))
    test = [cases[i] for i in order[: args.test_cases]]
    pool = [cases[i] for i in order[args.test_cases:]]
    pool = [pool[i] for i in np.random.default_rng(args.seed).permutation(len(pool))]
    splits = [Split(pool[:n], test, f"n={n}") for n in args.train_sizes]
    scored = {"anterior hippocampus": [1], "posterior hippocampus": [2]}
    return Task("hippocampus", cases, [1, 2], {}, scored, flip_prob=0.0, splits=splits)


def followup_tasks(cases: list) -> list[Task]:
    """TCIA: per patient with two labelled studies, train on the first, test on the follow-up."""
    by_patient: dict[str, list] = {}
    for case in sorted(cases, key=lambda c: c.id):  # ids are tcia_<patient>_<date>
        by_patient.setdefault(case.id.split("_")[1], []).append(case)
    splits = [Split([first], [later], f"{patient} {first.id[-10:]} -> {later.id[-10:]}")
              for patient, (first, later, *_) in by_patient.items() if len(by_patient[patient]) >= 2]
    if not splits:
        return []
    value = next(iter(cases[0].labels))
    return [Task("tcia_followup", cases, [value], {}, {"tumor": [value]}, flip_prob=0.5, splits=splits)]


def truth_scores(pred: np.ndarray, truth: Volume, scored: dict[str, list[int]], classes: list[str]) -> tuple[dict, dict]:
    """Dice and HD95 of each reported class: the prediction's class (or classes) against the truth's values."""
    truth_labels = as_label_array(truth.array)
    dice, hd = {}, {}
    for name, values in scored.items():
        pred_mask = np.isin(pred, [k for k, c in enumerate(classes, 1) if c == name])
        truth_mask = np.isin(truth_labels, values)
        score = evaluate_labels(pred_mask.astype(np.uint8), truth_mask.astype(np.uint8), voxel_spacing(truth.affine), [1])[0]
        dice[name], hd[name] = score.dice, score.hd95_mm
    return dice, hd


# ----------------------------------------------------------------------------- the UNet baseline


def unet_baseline(task: Task, train_cases: list, test_cases: list, cfg: FinetuneConfig, spacing, seconds: float,
                  device: torch.device, seed: int, tta: bool = False) -> tuple[list[np.ndarray], list[str], dict]:
    """Train MONAI's UNet for `seconds` on the same crops and loss; return labels on each test case's grid."""
    from monai.losses import MaskedDiceLoss
    from monai.networks.nets import UNet

    names = dict(train_cases[0].labels)
    volumes = [(read_volume(c.image), read_volume(c.seg), c) for c in train_cases]
    present = set().union(*(set(np.unique(as_label_array(s.array)).tolist()) for _, s, _ in volumes))
    cmap = class_map(present, names, cfg)
    kind = guess_modality(volumes[0][0].array, train_cases[0].modality)
    pre_cfg = PreprocessConfig(spacing=spacing, intensity=IntensityConfig(kind))
    window = (cfg.window,) * 3
    scans = []
    for image, seg, case in volumes:
        labels = as_label_array(seg.array)
        pre = preprocess_volume(image, pre_cfg, labels=cmap.lut(int(labels.max()))[labels], source=case.image)
        scans.append(prepare_scan(pre.array, pre.labels, window, case.id, case.seg))
    crops = CropDataset(scans, window, cfg, seed)
    torch.manual_seed(seed)
    K = len(cmap.classes)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=K + 1, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True)
    t0, step = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - t0 < seconds:
        batch = [crops[step * cfg.batch_size + j] for j in range(cfg.batch_size)]
        x = torch.stack([b["volumes"] for b in batch]).to(device)
        y = torch.stack([b["labels"] for b in batch]).to(device)
        loss = dice_ce_loss(net(x), y, dice)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    train_s = time.perf_counter() - t0
    segmenter = Segmenter(model=net.eval(), classes=cmap.classes, preprocess=pre_cfg, window=window, modality="any",
                          config={})
    labels = [segment(segmenter, read_volume(c.image), device=device, tta=tta).labels for c in test_cases]
    return labels, cmap.classes, {"steps": step, "loss": loss.item(), "train_s": round(train_s, 1)}


# ----------------------------------------------------------------------------- the benchmark


def run_split(task: Task, split: Split, inits: dict[str, str], args, workdir: Path) -> list[Run]:
    """Train every initialisation on `split.train` and score it on every case of `split.test`."""
    truths = [read_volume(c.seg) for c in split.test]
    scratch = inits.get("ar") or inits.get("mae")
    scratch_cfg = ViT3DConfig.from_dict(read_config(scratch)["encoder"]) if scratch else ViT3DConfig.preset(args.scratch_config)
    runs, budget, n = [], args.unet_seconds, len(split.train)
    for init, model in inits.items():
        if init == "unet":
            continue
        cfg = FinetuneConfig(mode=args.mode, labels=task.labels, merge=task.merge, steps=args.steps,
                             crops_per_scan=args.crops, window=args.window, spacing=args.spacing, scratch_config=scratch_cfg,
                             flip_prob=task.flip_prob if args.flip_prob is None else args.flip_prob,
                             seed=args.seed, device=args.device, **args.augment)
        out = workdir / f"{task.name}_{split.name.replace(' ', '_').replace('>', '')}_{init}"
        t0 = time.perf_counter()
        result = finetune(model, [(c.image, c.seg) for c in split.train], out, cfg,
                          class_names=split.train[0].labels, modality=split.test[0].modality)
        seconds = time.perf_counter() - t0
        budget = budget or seconds
        segmenter = load_segmenter(out)
        for case, truth in zip(split.test, truths):
            pred = segment(segmenter, read_volume(case.image), device=args.device, modality=case.modality,
                           tta=args.tta and cfg.flip_prob > 0)
            dice, hd = truth_scores(pred.labels, truth, task.scored, result.classes)
            runs.append(Run(task.name, init, case.id, dice, hd, seconds,
                            {"cache_s": round(result.cache_s, 1), "train_s": round(result.train_s, 1)}, n))
        print(f"  {task.name} {split.name} {init}: {fmt(mean_scores(runs[-len(split.test):]))} ({seconds:.0f} s)",
              flush=True)
    if "unet" in inits:
        spacing = args.spacing or (tuple(read_config(scratch)["preprocessing"]["spacing"]) if scratch else (1.5,) * 3)
        cfg = FinetuneConfig(labels=task.labels, merge=task.merge, window=args.window or 96, batch_size=2, seed=args.seed,
                             flip_prob=task.flip_prob if args.flip_prob is None else args.flip_prob, **args.augment)
        labels, classes, extra = unet_baseline(task, split.train, split.test, cfg, spacing, budget or 60.0,
                                               resolve_device(args.device), args.seed, args.tta and cfg.flip_prob > 0)
        for case, truth, pred in zip(split.test, truths, labels):
            dice, hd = truth_scores(pred, truth, task.scored, classes)
            runs.append(Run(task.name, "unet", case.id, dice, hd, extra["train_s"], extra, n))
        print(f"  {task.name} {split.name} unet: {fmt(mean_scores(runs[-len(split.test):]))} "
              f"({budget:.0f} s budget, {extra['steps']} steps)", flush=True)
    return runs


def mean_scores(runs: list[Run]) -> dict[str, float]:
    return {name: float(np.nanmean([r.dice[name] for r in runs])) for name in runs[0].dice}


def fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def markdown(runs: list[Run]) -> str:
    lines = []
    for task in dict.fromkeys(r.task for r in runs):
        task_runs = [r for r in runs if r.task == task]
        cases = list(dict.fromkeys(r.case for r in task_runs))
        classes = list(task_runs[0].dice)
        lines += [f"**{task}** (Dice of the left-out case)", "",
                  "| init | class | " + " | ".join(cases) + " | mean | fine-tune s |",
                  "|---|---|" + "---|" * len(cases) + "---|---|"]
        for init in dict.fromkeys(r.init for r in task_runs):
            mine = {r.case: r for r in task_runs if r.init == init}
            for name in classes:
                values = [mine[c].dice[name] if c in mine else math.nan for c in cases]
                finite = [v for v in values if not math.isnan(v)]
                mean = f"{np.mean(finite):.3f}" if finite else "-"
                secs = np.mean([r.seconds for r in mine.values()])
                lines.append(f"| {init} | {name} | " + " | ".join("-" if math.isnan(v) else f"{v:.3f}" for v in values)
                             + f" | {mean} | {secs:.0f} |")
        lines.append("")
    return "\n".join(lines)


def curves(runs: list[Run], against: tuple[str, ...] = ("scratch", "unet", "mae")) -> str:
    """Per task, training-set size and class: mean Dice of each initialisation, and ar minus each other one,
    paired over the test cases, with a 95 % bootstrap interval."""
    from paired_dice import bootstrap_interval

    inits = list(dict.fromkeys(r.init for r in runs))
    others = [o for o in against if o in inits and "ar" in inits]
    lines = ["| task | train cases | class | test cases | " + " | ".join(inits) + " | "
             + " | ".join(f"ar - {o} (95 % interval)" for o in others) + " |",
             "|---|---|---|---|" + "---|" * (len(inits) + len(others))]
    keys = list(dict.fromkeys((r.task, r.n_train) for r in runs))
    for task, n in keys:
        group = [r for r in runs if (r.task, r.n_train) == (task, n)]
        for name in group[0].dice:
            score = {(r.init, r.case): r.dice[name] for r in group}
            cases = sorted({c for _, c in score})
            means = [np.nanmean([score.get((i, c), np.nan) for c in cases]) for i in inits]
            cells = []
            for other in others:
                pairs = [(score[("ar", c)], score[(other, c)]) for c in cases if ("ar", c) in score and (other, c) in score]
                diff = np.array([a - b for a, b in pairs])
                lo, hi = bootstrap_interval(diff) if len(diff) > 1 else (math.nan, math.nan)
                cells.append(f"{diff.mean():+.3f} ({lo:+.3f} to {hi:+.3f})" if len(diff) else "-")
            lines.append(f"| {task} | {n} | {name} | {len(cases)} | " + " | ".join(f"{m:.3f}" for m in means)
                         + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("AR3D_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--ar", help="AR-pretrained encoder checkpoint (folder or name)")
    parser.add_argument("--mae", help="MAE-pretrained encoder checkpoint")
    parser.add_argument("--inits", default="ar,mae,scratch,unet", help="initialisations to run (default all available)")
    parser.add_argument("--tasks", default="brats_whole_tumor,brats_classes,spleen",
                        help="among brats_whole_tumor, brats_classes, spleen, hippocampus, tcia_followup")
    parser.add_argument("--train-sizes", default="1,2,5,10", help="hippocampus: training-set sizes (default 1,2,5,10)")
    parser.add_argument("--test-cases", type=int, default=30, help="hippocampus: held-out test cases (default 30)")
    parser.add_argument("--augment", default="", metavar="K=V,...",
                        help="extra FinetuneConfig augmentation, e.g. contrast_curve=0.5,gamma=0.3,bias_field=0.3")
    parser.add_argument("--blocks", help="head mode: encoder blocks the light decoder reads, e.g. 12 or 9,10,11,12")
    parser.add_argument("--folds", type=int, help="only the first N folds of each task")
    parser.add_argument("--mode", choices=("head", "full"), default="head",
                        help="head: frozen encoder, light decoder (default); full: encoder + UNETR decoder, layer-wise lr decay")
    parser.add_argument("--steps", type=int, default=800, help="fine-tuning steps (default 800)")
    parser.add_argument("--crops", type=int, default=24, help="cached crops per scan (default 24, head mode)")
    parser.add_argument("--flip-prob", type=float,
                        help="flip probability per axis (default: 0.5 for the BraTS tasks, 0 for the spleen)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time flips (`segment(tta=True)`, 8x the window time) for the tasks trained with flips")
    parser.add_argument("--window", type=int, help="window edge in voxels (default 6 patches)")
    parser.add_argument("--spacing", type=float, help="model spacing in mm (default: the encoder's)")
    parser.add_argument("--scratch-config", default="tiny", help="encoder size from scratch when no --ar/--mae")
    parser.add_argument("--unet-seconds", type=float, help="UNet training time (default: the first init's time)")
    parser.add_argument("--quick", action="store_true", help="smoke check: one fold, 30 steps, 4 crops, 3 mm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every run as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    if not (args.data / "manifest.json").is_file():
        sys.exit(f"no manifest.json in {args.data}; pass --data or set AR3D_DATA")
    if args.quick:
        args.folds, args.steps, args.crops = 1, 30, 4
        args.spacing = args.spacing or 3.0
        args.unet_seconds = args.unet_seconds or 20.0
    if args.spacing:
        args.spacing = (args.spacing,) * 3
    args.train_sizes = [int(n) for n in args.train_sizes.split(",")]
    args.augment = {k: (int(v) if k == "thick_slices" else float(v))
                    for k, v in (item.split("=") for item in args.augment.split(",") if item)}
    if args.blocks:
        args.augment["blocks"] = tuple(int(b) for b in args.blocks.split(","))
    wanted = args.inits.split(",")
    inits = {}
    for name in wanted:
        if name in ("ar", "mae"):
            if getattr(args, name):
                inits[name] = str(resolve_model(getattr(args, name)))  # a folder, or a shipped name such as ar3d-encoder
        elif name in ("scratch", "unet"):
            inits[name] = name if name == "scratch" else "unet"
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fewshot-") as tmp:
        for task in tasks(args.data, args.tasks.split(","), args):
            splits = task.splits[: args.folds]
            print(f"{task.name}: {len(task.cases)} cases, {len(splits)} splits, inits {', '.join(inits)}", flush=True)
            for split in splits:
                runs += run_split(task, split, inits, args, Path(tmp))
                if args.out:  # after every split: a long run keeps what it measured
                    args.out.write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=float))
    table = markdown([r for r in runs if r.task not in ("hippocampus", "tcia_followup")]) + "\n" + curves(runs)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.out:
        args.out.write_text(json.dumps([r.__dict__ for r in runs], indent=1, default=float))


if __name__ == "__main__":
    main()
