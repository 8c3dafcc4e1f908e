"""Speed and memory of `ar3d segment` against MONAI UNETR sliding-window inference on the same volumes.

Volumes (written as NIfTI into a temporary folder):
- MRI 240x240x155 at 1 mm: a BraTS FLAIR from the shared data (`--data`), else a brain phantom;
- CT 512x512x300: the TotalSegmentator ct_full case (3 mm) resampled up over its own field of
  view (0.71 x 0.59 x 1.12 mm), else a CT phantom resampled the same way.

Each measurement runs in a fresh subprocess, so its peak resident memory (`ru_maxrss`, imports
included) belongs to it alone. Both start the clock after importing torch and MONAI (and starting
CUDA), and stop it when the label file is written:
- ours: `ar3d segment --model M INPUT -o OUT` (load the model, read, preprocess to the model
  spacing, sliding windows, resample back, write), timed inside the process around the CLI call;
- UNETR: MONAI `UNETR` (default config: 16^3 patches, width 768, 12 blocks, feature size 16; built
  with random weights) on 96^3 windows over the volume at its own spacing after the same
  intensity normalisation, same overlap, Gaussian blending and window batch, argmax and write.

The model is `--model DIR` (a fine-tuned segmentation checkpoint) or, by default, a random-weight
model of `--config` size (base: the size of the seed's encoder) with the light decoder and
`--classes` classes: speed does not depend on the weights.

    python benchmarks/segment_speed.py                      # CPU: MRI and CT, ours and UNETR
    python benchmarks/segment_speed.py --device cuda --skip-unetr-ct
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------- workers (one per subprocess)


def _warm_up(device_name: str) -> None:
    """Import torch and MONAI and start CUDA before the clock starts, the same for both workers."""
    import monai.inferers  # noqa: F401
    import torch

    from model_core.device import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.zeros(1, device=device)


def worker_ours(args) -> dict:
    from model_core.cli import main as ar3d
    from model_core.inference import segment as infer  # noqa: F401  (the CLI imports it lazily)

    _warm_up(args.device)
    t0 = time.perf_counter()
    code = ar3d(["segment", "--model", args.model, args.input, "-o", args.output, "--device", args.device,
                 "--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size)])
    if code != 0:
        raise SystemExit(code)
    return {"seconds": time.perf_counter() - t0}


def worker_unetr(args) -> dict:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNETR

    from model_core.data.preprocess import (
        IntensityConfig,
        guess_modality,
        normalize_intensity,
    )
    from model_core.device import resolve_device
    from model_core.io.volume import read_volume, write_volume

    _warm_up(args.device)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = UNETR(in_channels=1, out_channels=args.classes + 1, img_size=96).to(device).eval()
    volume = read_volume(args.input)
    x = normalize_intensity(volume.array, IntensityConfig(guess_modality(volume.array)))
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = sliding_window_inference(torch.from_numpy(x)[None, None], (96, 96, 96), args.sw_batch_size, net,
                                          overlap=args.overlap, mode="gaussian", sw_device=device, device="cpu")
    labels = torch.as_tensor(logits)[0].argmax(0).numpy().astype(np.uint8)
    write_volume(args.output, labels, volume.affine, kind="labels")
    return {"seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- inputs


def _phantoms():
    """The phantom module, installed (napari_ar3d.sample_data) or from the source tree (sample_data)."""
    try:
        from model_core.data import phantoms
    except ImportError:
        from sample_data import phantoms
    return phantoms


def make_inputs(folder: Path, data: Path | None) -> dict[str, Path]:
    import nibabel as nib
    import numpy as np
    import scipy.ndimage as ndi

    from model_core.io.volume import read_volume

    out = {}
    brats = data / "brats2015" / "pat0003" / "flair.nii.gz" if data else None
    if brats is not None and brats.is_file():
        mri = read_volume(brats)
        array, affine, source = mri.array.astype(np.float32), mri.affine, str(brats)
    else:
        ph = _phantoms().make_brain_mri(0, shape=(240, 240, 155), spacing=(1.0, 1.0, 1.0))
        array, affine, source = ph.images["t2f"], ph.affine, "brain phantom (t2f)"
    out["mri"] = folder / "mri_240x240x155.nii"
    nib.save(nib.Nifti1Image(array, affine), out["mri"])

    ct_path = data / "totalseg" / "ct_full" / "image.nii.gz" if data else None
    if ct_path is not None and ct_path.is_file():
        ct = read_volume(ct_path)
        small, small_affine, ct_source = ct.array.astype(np.float32), ct.affine, str(ct_path)
    else:
        ph = _phantoms().make_ct_abdomen(0, shape=(128, 128, 75))
        small, small_affine, ct_source = ph.images["ct"], ph.affine, "CT phantom"
    shape = np.array([512, 512, 300])
    zoom = shape / np.array(small.shape)
    big = ndi.zoom(small, zoom, order=1, grid_mode=True, mode="nearest").astype(np.int16)  # same field of view
    affine = small_affine.copy()
    affine[:3, :3] = small_affine[:3, :3] / zoom  # voxel size shrinks by the zoom
    affine[:3, 3] = small_affine[:3, :3] @ (0.5 / zoom - 0.5) + small_affine[:3, 3]  # first voxel centre
    out["ct"] = folder / "ct_512x512x300.nii"
    nib.save(nib.Nifti1Image(big, affine), out["ct"])
    print(f"MRI 240x240x155 from {source}; CT 512x512x300 ({np.round(np.linalg.norm(affine[:3, :3], axis=0), 2)} mm) "
          f"from {ct_source}", flush=True)
    return out


def make_model(folder: Path, config: str, classes: int, spacing: float) -> Path:
    import torch

    from model_core.checkpoint.store import make_config, save_checkpoint
    from model_core.data.preprocess import PreprocessConfig
    from model_core.models.segmentation import SegmentationModel, build_decoder
    from model_core.models.vit import ViT3D, ViT3DConfig

    torch.manual_seed(0)
    cfg = ViT3DConfig.preset(config)
    model = SegmentationModel(ViT3D(cfg), build_decoder("light", cfg, classes + 1))
    window = 6 * cfg.patch_size
    conf = make_config(cfg.to_dict(), objective="segmentation",
                       heads={"segmentation": {"decoder": model.decoder.config, "window": [window] * 3}},
                       preprocessing=PreprocessConfig((spacing,) * 3).to_dict(),
                       classes=[f"class_{k}" for k in range(1, classes + 1)])
    return save_checkpoint(folder / f"random_{config}", model.state_dict(), conf)


def measure(kind: str, args, model: Path, image: Path, out: Path) -> dict:
    """Run one worker in a fresh process; its JSON line plus peak RSS."""
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--input", str(image),
           "--output", str(out), "--device", args.device, "--overlap", str(args.overlap),
           "--sw-batch-size", str(args.sw_batch_size), "--classes", str(args.classes)]
    t0 = time.perf_counter()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} on {image.name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("ours", "unetr"), help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="a fine-tuned segmentation checkpoint (default: random weights of --config)")
    parser.add_argument("--config", default="base", help="encoder size of the default model (default base)")
    parser.add_argument("--classes", type=int, default=3, help="classes of the default model and UNETR (default 3)")
    parser.add_argument("--spacing", type=float, default=1.5, help="model spacing of the default model (default 1.5)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("AR3D_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--volumes", default="mri,ct", help="which volumes (default mri,ct)")
    parser.add_argument("--skip-unetr-ct", action="store_true", help="no UNETR on the 512x512x300 CT (slow on a CPU)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    if args.worker:
        result = worker_ours(args) if args.worker == "ours" else worker_unetr(args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        if args.device != "cpu":
            import torch

            if torch.cuda.is_available():
                result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        print(json.dumps(result))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="segment-speed-") as tmp:
        folder = Path(tmp)
        inputs = make_inputs(folder, args.data if args.data.is_dir() else None)
        model = Path(args.model) if args.model else make_model(folder, args.config, args.classes, args.spacing)
        for name in args.volumes.split(","):
            ours = measure("ours", args, model, inputs[name], folder / f"{name}_ours.nii.gz")
            row = {"volume": name, "ours_s": ours["seconds"], "ours_rss_gb": ours["peak_rss_gb"],
                   "ours_process_s": ours["process_s"]}
            print(f"{name}: ar3d segment {ours['seconds']:.1f} s, peak RSS {ours['peak_rss_gb']:.2f} GB", flush=True)
            if not (name == "ct" and args.skip_unetr_ct):
                unetr = measure("unetr", args, model, inputs[name], folder / f"{name}_unetr.nii.gz")
                row.update(unetr_s=unetr["seconds"], unetr_rss_gb=unetr["peak_rss_gb"],
                           ratio=ours["seconds"] / unetr["seconds"])
                print(f"{name}: MONAI UNETR {unetr['seconds']:.1f} s, peak RSS {unetr['peak_rss_gb']:.2f} GB; "
                      f"ours / UNETR = {row['ratio']:.2f}", flush=True)
            rows.append(row)

    print()
    print("| volume | ar3d segment s | peak RSS GB | MONAI UNETR s | UNETR peak RSS GB | time ours / UNETR |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        unetr = (f"{r['unetr_s']:.1f} | {r['unetr_rss_gb']:.2f} | {r['ratio']:.2f}x" if "unetr_s" in r else "- | - | -")
        size = "240x240x155 MRI" if r["volume"] == "mri" else "512x512x300 CT"
        print(f"| {size} | {r['ours_s']:.1f} | {r['ours_rss_gb']:.2f} | {unetr} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
