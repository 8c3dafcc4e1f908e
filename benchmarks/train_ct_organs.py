"""Data preparation and packaging for the shipped segmenter `ar3d-ct-organs`.

`benchmarks/train_ct_organs.sh` runs the whole recipe; this script holds its two Python steps:

    python benchmarks/train_ct_organs.py prepare --data ../shared/data --out runs/ct_organs_data
    python benchmarks/train_ct_organs.py ship --run runs/ct_organs --eval runs/ct_organs_eval \
        --prep runs/ct_organs_data --out model_core/shipped/ar3d-ct-organs [--command "..."]
    python benchmarks/train_ct_organs.py plot --model model_core/shipped/ar3d-ct-organs \
        --out docs/images/ct_organs_training.png

`prepare` writes one folder per case (image.nii.gz or a link to it, seg.nii.gz, labels.json) with
every segmentation relabelled to the same six classes, because `ar3d finetune` reads label *values*
(one numbering for all training pairs) and TotalSegmentator and the phantoms number their organs
differently; vertebrae_* levels are merged into one class:

    1 liver, 2 spleen, 3 kidney_right, 4 kidney_left, 5 aorta, 6 vertebrae  (0 background)

Cases (TotalSegmentator labels are silver: model outputs, not manual):
- train/phantom_<seed>: CT phantoms (seeds TRAIN_SEEDS), fully labelled; lung and bowel -> background.
- train/totalseg_ct_dicom: a real CT, fully labelled by TotalSegmentator (Apache-2.0).
- heldout/totalseg_ct_sm: a real CT of another patient, held back for evaluation (never trained on).
- heldout/totalseg_ct_full: the same patient as ct_sm (same affine; vertebrae only), held back too.
- heldout/phantom_<seed>: fresh phantoms (EVAL_SEEDS) not used in training.

Left out of training: totalseg_aorta (only the aortic lumen and T12 are labelled: full annotation
would teach "liver = background") and every MRI or non-commercial (BraTS 2015) case.

`ship` converts the fine-tuned checkpoint to float16 and writes it with the held-out scores
(the `ar3d evaluate --json` files of `--eval`) in its config.json provenance. `plot` draws the
training loss (loss_log.csv) beside the held-out Dice per class (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import load_file, save_file

CLASSES = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left", 5: "aorta", 6: "vertebrae"}
TRAIN_SEEDS = (100, 101, 102, 103, 104, 105)
EVAL_SEEDS = (1000,)
TRAIN_CASES = ("totalseg_ct_dicom",)
HELDOUT_CASES = ("totalseg_ct_sm", "totalseg_ct_full")


def class_of(name: str) -> int:
    """Our class value for a source label name (TotalSegmentator or phantom), 0 for the others."""
    if name.startswith("vertebrae"):
        return 6
    by_name = {v: k for k, v in CLASSES.items()}
    return by_name.get(name, 0)


def relabel(labels: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """Map source label values to our six classes through their names."""
    lut = np.zeros(int(labels.max()) + 1, np.uint8)
    for value, name in names.items():
        if value <= labels.max():
            lut[value] = class_of(name)
    return lut[labels]


def _write_case(folder: Path, image: Path | None, image_array, affine, seg: np.ndarray) -> None:
    """A case folder: image.nii.gz (a symlink to `image` when given), seg.nii.gz, labels.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if image is not None:
        link = folder / "image.nii.gz"
        link.unlink(missing_ok=True)
        link.symlink_to(image.resolve())
    else:
        nib.save(nib.Nifti1Image(image_array.astype(np.float32), affine), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), folder / "seg.nii.gz")
    (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in CLASSES.items()}, indent=1) + "\n")


def prepare(data: Path, out: Path) -> None:
    """Write the training and held-out cases (see the module docstring) under `out`."""
    from model_core.data.phantoms import make_ct_abdomen

    manifest = json.loads((data / "manifest.json").read_text())
    cases = {c["id"]: c for c in manifest["cases"]}
    sources: dict[str, dict] = {}
    for case_id in TRAIN_CASES + HELDOUT_CASES:
        case = cases[case_id]
        if "finetune" not in case["use"] or "NC" in case["license"]:
            raise SystemExit(f"{case_id}: manifest does not allow fine-tuning on it ({case['use']}, {case['license']})")
        seg = nib.load(data / case["seg"])
        names = {int(k): v for k, v in json.loads((data / case["labels"]).read_text()).items()}
        labels = relabel(np.asarray(seg.dataobj).astype(np.int64), names)
        split = "train" if case_id in TRAIN_CASES else "heldout"
        image = data / case["image"]
        if image.is_dir():  # a DICOM series: its NIfTI conversion lies beside it
            image = image.parent / "image.nii.gz"
        _write_case(out / split / case_id, image, None, seg.affine, labels)
        sources[case_id] = {k: case[k] for k in ("source", "license", "label_type")} | {"split": split}
        print(f"{split}/{case_id}: " + ", ".join(f"{CLASSES[k]} {int((labels == k).sum())}" for k in CLASSES))
    for split, seeds in (("train", TRAIN_SEEDS), ("heldout", EVAL_SEEDS)):
        for seed in seeds:
            ph = make_ct_abdomen(seed=seed)
            labels = relabel(ph.labels.astype(np.int64), {int(k): v for k, v in ph.class_names.items()})
            _write_case(out / split / f"phantom_{seed}", None, ph.images["ct"], ph.affine, labels)
            print(f"{split}/phantom_{seed}: shape {ph.shape}, spacing {tuple(round(s, 2) for s in ph.spacing)}")
        sources[f"phantom_{'/'.join(map(str, seeds))}"] = {
            "source": f"model_core.data.phantoms.make_ct_abdomen(seed) for seeds {list(seeds)}",
            "license": "generated by napari-ar3d (Apache-2.0)", "label_type": "exact (procedural)", "split": split}
    (out / "cases.json").write_text(json.dumps(sources, indent=1) + "\n")


def ship(run: Path, eval_dir: Path, prep: Path, out: Path, command: str | None) -> None:
    """Copy the checkpoint `run` to `out` with float16 weights, the cases of `prep` and the held-out scores."""
    config = json.loads((run / "config.json").read_text())
    weights = {k: v.to(torch.float16) if v.is_floating_point() else v
               for k, v in load_file(run / "model.safetensors").items()}
    prov = config["provenance"]
    prov["cases"] = json.loads((prep / "cases.json").read_text())
    prov["heldout"] = {}
    for path in sorted(eval_dir.glob("*.json")):  # `ar3d evaluate --json` of each held-out case
        scores = json.loads(path.read_text())
        prov["heldout"][path.stem] = {
            "labels": prov["cases"].get(path.stem, {}).get("label_type", "exact (procedural phantom)"),
            "dice": {c["name"]: c["dice"] for c in scores["classes"]},
            "hd95_mm": {c["name"]: c["hd95_mm"] for c in scores["classes"]},
            "mean_dice": scores["mean_dice"],
        }
    prov["heldout_note"] = (
        "held back from fine-tuning: the patient of totalseg_ct_sm and totalseg_ct_full (labels never seen); its "
        "images were among the unlabelled volumes the ar3d-encoder was pretrained on. Scores were measured with "
        "the float32 run; the float16 weights give the same Dice to 3 decimals."
    )
    prov["steps"] = config["provenance"]["finetune"]["steps"]
    prov["wall_time_s"] = round(sum(prov["timing_s"].values()), 1)
    prov["hardware"] = f"{os.cpu_count()}-core CPU, float32 (no GPU), shared with other jobs"
    if command:
        prov["recipe"] = command
    prov["weights_dtype"] = "float16 (trained in float32 on a CPU; converted by benchmarks/train_ct_organs.py ship)"
    tmp = out.parent / f".{out.name}.shipping"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if (run / "loss_log.csv").is_file():
        shutil.copy2(run / "loss_log.csv", tmp / "loss_log.csv")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {size / 1e6:.1f} MB")


def plot(model: Path, out: Path) -> None:
    """Training loss (raw and a 10-row moving average) and held-out Dice per class, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = np.genfromtxt(model / "loss_log.csv", delimiter=",", names=True)
    heldout = json.loads((model / "config.json").read_text())["provenance"]["heldout"]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    ax_loss.plot(log["step"], log["loss"], color="0.75", lw=1, label="loss (every 10 steps)")
    window = min(10, len(log))
    smooth = np.convolve(log["loss"], np.ones(window) / window, mode="valid")
    ax_loss.plot(log["step"][window - 1:], smooth, color="C0", lw=2, label=f"moving average of {window}")
    ax_loss.set(xlabel="step", ylabel="Dice + cross-entropy loss (training batch)",
                title="ar3d-ct-organs: training loss")
    ax_loss.legend()
    names = list(CLASSES.values())
    cases = list(heldout)
    width = 0.8 / len(cases)
    for n, case in enumerate(cases):
        scores = heldout[case]["dice"]
        values = [scores.get(name) for name in names]
        xs = [i + (n - (len(cases) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        bars = ax_dice.bar(xs, [v for v in values if v is not None], width, label=case)
        ax_dice.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax_dice.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_dice.set(ylim=(0, 1.05), ylabel="Dice", title="held-out Dice (totalseg_*: silver labels)")
    ax_dice.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="write the relabelled training and held-out cases")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("AR3D_DATA", "../shared/data")))
    p.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("ship", help="convert a fine-tuned checkpoint to float16 with its held-out scores")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--eval", type=Path, required=True, help="folder of `ar3d evaluate --json` outputs")
    s.add_argument("--prep", type=Path, required=True, help="the `prepare` folder (its cases.json)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--command", help="the recipe that produced the run, recorded in the provenance")
    g = sub.add_parser("plot", help="draw the training loss and the held-out Dice of a shipped model")
    g.add_argument("--model", type=Path, required=True)
    g.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.data, args.out)
    elif args.step == "ship":
        ship(args.run, args.eval, args.prep, args.out, args.command)
    else:
        plot(args.model, args.out)


if __name__ == "__main__":
    main()
