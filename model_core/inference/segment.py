"""Whole-volume segmentation with a fine-tuned model: `load_segmenter`, then `segment`.

`segment(segmenter, volume)`:
1. preprocess as in training (`model_core.data.preprocess.preprocess_volume`): intensities to [0, 1]
   with the model's normalisation, axes to RAS, voxels to the model spacing;
2. MONAI `sliding_window_inference` over the model grid: windows of the model's ROI, `overlap`,
   Gaussian blending of the softmax probabilities, `sw_batch_size` windows per forward pass
   (with test-time flips, `tta`, each window's probabilities are the mean over its mirror images). The
   windows run on `device` (the GPU when there is one), the stitched volume stays on the CPU. A
   volume smaller than a window is padded (and cropped back). Out of memory, the windows run
   again with half as many per batch, down to one, then on the CPU, each time with a warning;
3. the probabilities go back onto the input's voxel grid (trilinear, in slabs to bound memory)
   and the label map is their argmax there: value k is the model's k-th class
   (`segmenter.classes[k-1]`), 0 background. The uncertainty is the entropy of the probabilities
   there divided by log(K+1), so 0 is certain and 1 is uniform.

Outputs have the input's shape and belong to its affine, so they can be written with it or shown
with the same napari layer transform.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import Tensor

from model_core.checkpoint.config import CheckpointConfig
from model_core.checkpoint.store import (
    Checkpoint,
    check_model_size,
    load_checkpoint,
    load_into,
    resolve_model,
)
from model_core.data.preprocess import (
    PreprocessConfig,
    guess_modality,
    preprocess_volume,
)
from model_core.device import autocast_dtype, resolve_device
from model_core.errors import Ar3dEnvironmentError, Ar3dInputError, CheckpointError
from model_core.io.volume import Volume, check_image, read_volume
from model_core.models.segmentation import SegmentationModel, model_from_config
from model_core.progress import ProgressFn, StopFn, check_stop, report


@dataclass
class Segmenter:
    """A fine-tuned segmentation model with what inference needs from its config.json."""

    model: SegmentationModel  # in eval mode, on the CPU
    classes: list[str]  # K names; label value k is classes[k-1]
    preprocess: PreprocessConfig
    window: tuple[int, int, int]  # window size in voxels of the model grid
    modality: str  # "CT", "MRI" or "any": what it was trained on
    config: CheckpointConfig = field(repr=False)
    path: Path | None = None


@dataclass
class SegmentationResult:
    """Outputs on the input's voxel grid (I, J, K); `affine` is the input's."""

    labels: np.ndarray  # (I, J, K) uint8 (uint16 beyond 255 classes): 0 background, k = classes[k-1]
    uncertainty: np.ndarray  # (I, J, K) float32 in [0, 1]: normalised entropy
    affine: np.ndarray  # (4, 4) the input's RAS+ affine
    classes: list[str]
    probabilities: np.ndarray | None = None  # (K+1, I, J, K) float32, summing to 1 over axis 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds: preprocess, windows, resample


def segmenter_from_checkpoint(checkpoint: Checkpoint) -> Segmenter:
    """Build the model a segmentation checkpoint describes and load its weights."""
    config = checkpoint.typed_config
    head = config.heads.segmentation
    if head is None:
        raise CheckpointError(
            "has no segmentation decoder (it is an encoder); fine-tune it first with `ar3d finetune`", checkpoint.path
        )
    check_model_size(checkpoint)
    model = model_from_config(config.encoder.to_dict(), head.decoder)
    load_into(model, checkpoint)
    classes = list(config.classes)
    if len(classes) + 1 != model.num_classes:
        raise CheckpointError(
            f"lists {len(classes)} classes but its decoder predicts {model.num_classes - 1}", checkpoint.path
        )
    return Segmenter(
        model=model.eval(),
        classes=classes,
        preprocess=config.preprocessing,
        window=head.window,
        modality=config.modality,
        config=config,
        path=checkpoint.path,
    )


def load_segmenter(name_or_dir: str | os.PathLike) -> Segmenter:
    """A segmentation model from a checkpoint folder or a shipped model's name."""
    return segmenter_from_checkpoint(load_checkpoint(resolve_model(name_or_dir)))


FLIPS = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))  # the 8 mirror images of a window


def count_windows(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> int:
    """Windows `sliding_window_inference` visits on a grid of `shape` (as MONAI's `dense_patch_slices`)."""
    n = 1
    for size, r in zip(shape, window):
        interval = max(1, int(r * (1 - overlap)))
        n *= 1 if size <= r else math.ceil((size - r) / interval) + 1
    return n


def _as_volume(volume: Volume | str | os.PathLike) -> Volume:
    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, (str, os.PathLike)):
        return read_volume(volume)
    raise Ar3dInputError(f"segment needs a Volume or a file path, got {type(volume).__name__}")


def segment(
    segmenter: Segmenter,
    volume: Volume | str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    probabilities: bool = False,
    modality: str | None = None,
    tta: bool = False,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> SegmentationResult:
    """Segment a whole volume (a `Volume` or a file) and return the outputs on its own voxel grid.

    device: where the windows run ("auto": cuda, then mps, then cpu); stitching stays on the CPU.
    sw_batch_size: windows per forward pass. overlap: fraction of a window shared with its neighbour.
    probabilities: also return the per-class probabilities (K+1 float32 maps of the input's size).
    modality: a hint ("CT", "MRI") for the intensity normalisation of models that guess it.
    tta: test-time flips: average each window's probabilities over its 8 mirror images (8 times the
        window time). Only for models fine-tuned with random flips (`FinetuneConfig.flip_prob`): a
        model of left/right anatomy is trained without them, and a mirror would swap its classes.
    progress: `Progress(step, total, "segmenting")` per batch of windows; should_stop: polled per
        batch, raises `model_core.progress.Cancelled`.
    A model trained on another modality than the volume's gets a warning, not an error; so does
    each retry after the device ran out of memory ("CUDA out of memory with 4 windows per batch;
    retrying with 2", ..., "falling back to CPU"), which is also reported through `progress`.
    """
    if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise Ar3dInputError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
    if not 0 <= overlap < 1:
        raise Ar3dInputError(f"overlap must be in [0, 1), got {overlap!r}")
    volume = _as_volume(volume)
    source = volume.path or "the volume"
    check_image(volume.array, source)
    hint = modality or volume.meta.get("modality")
    if volume.array.ndim == 3 and segmenter.modality in ("CT", "MRI"):
        kind = {"ct": "CT", "mri": "MRI"}[guess_modality(volume.array, hint)]
        if kind != segmenter.modality:
            warnings.warn(f"{source}: looks like {kind} but the model was trained on {segmenter.modality}",
                          stacklevel=2)
    device = resolve_device(device)
    flips = FLIPS if tta else FLIPS[:1]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    pre = preprocess_volume(volume, segmenter.preprocess, modality=hint, source=volume.path)
    timings["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    probs = _windows_within_memory(segmenter, pre.array, device, sw_batch_size, overlap, progress, should_stop,
                                   f"{volume.path}: " if volume.path else "", flips)
    pre.array = None  # the image is no longer needed: free it before resampling back
    timings["windows"] = time.perf_counter() - t

    t = time.perf_counter()
    labels, uncertainty, full = to_source_grid(probs, pre, probabilities, should_stop)
    timings["resample"] = time.perf_counter() - t
    return SegmentationResult(labels, uncertainty, np.asarray(volume.affine, dtype=np.float64).copy(),
                              list(segmenter.classes), full, timings)


def _windows_within_memory(
    segmenter: Segmenter,
    image: np.ndarray,
    device: torch.device,
    sw_batch_size: int,
    overlap: float,
    progress: ProgressFn,
    should_stop: StopFn,
    prefix: str = "",
    flips: tuple[tuple[int, ...], ...] = ((),),
) -> np.ndarray:
    """`_sliding_window`, run again after an out-of-memory error with half the windows per batch, down to
    one, then on the CPU; each retry is a warning and a `Progress` report whose message says so.

    Out of memory on the CPU with one window per batch raises `Ar3dInputError`. Tests inject an
    allocation failure by replacing `_sliding_window` (or the model's forward) with one that raises
    `torch.OutOfMemoryError`.
    """
    batch = sw_batch_size
    while True:
        try:
            return _sliding_window(segmenter, image, device, batch, overlap, progress, should_stop, flips)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not _out_of_memory(exc):
                raise
        # Retried outside the handler: its traceback holds the failed attempt's tensors.
        segmenter.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        what = f"{prefix}{device.type.upper()} out of memory with {batch} window{'s' if batch > 1 else ''} per batch"
        if batch > 1:
            batch //= 2
            message = f"{what}; retrying with {batch}"
        elif device.type != "cpu":
            device = torch.device("cpu")
            message = f"{what}; falling back to CPU (slower)"
        else:
            raise Ar3dEnvironmentError(f"{what}; close other programs or segment a cropped volume")
        warnings.warn(message, stacklevel=3)
        report(progress, 0, math.ceil(count_windows(image.shape, segmenter.window, overlap) / batch), message)


def _out_of_memory(exc: RuntimeError) -> bool:
    """torch's out-of-memory error, or an allocator's (MPS, CPU) RuntimeError that says so."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _sliding_window(
    segmenter: Segmenter,
    image: np.ndarray,
    device: torch.device,
    sw_batch_size: int,
    overlap: float,
    progress: ProgressFn,
    should_stop: StopFn,
    flips: tuple[tuple[int, ...], ...] = ((),),
) -> np.ndarray:
    """Gaussian-blended softmax probabilities (K+1, X, Y, Z) float32 of a preprocessed (X, Y, Z) image.

    flips: the spatial axes (0..2) mirrored in each pass over a window; its probabilities are the mean
    of the passes, each mirrored back. ((),): one plain pass.
    """
    model = segmenter.model.to(device).eval()
    amp = autocast_dtype(device)
    total = math.ceil(count_windows(image.shape, segmenter.window, overlap) / sw_batch_size)
    done = 0

    def predictor(windows: torch.Tensor) -> torch.Tensor:  # (b, 1, *window) on `device`
        nonlocal done
        check_stop(should_stop)
        probs = 0.0
        for axes in flips:
            dims = [2 + a for a in axes]
            with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                logits = model(windows.flip(dims) if dims else windows)
            p = torch.softmax(logits.float(), dim=1)  # (b, K+1, *window)
            probs = probs + (p.flip(dims) if dims else p)
        done += 1
        report(progress, done, total, "segmenting")
        return probs / len(flips)  # (b, K+1, *window)

    x = torch.from_numpy(np.ascontiguousarray(image))[None, None]  # (1, 1, X, Y, Z)
    with torch.inference_mode():
        out = sliding_window_inference(
            x, segmenter.window, sw_batch_size, predictor, overlap=overlap, mode="gaussian",
            sw_device=device, device="cpu",
        )
    model.to("cpu")
    return torch.as_tensor(out)[0].numpy()  # (K+1, X, Y, Z)


def to_source_grid(
    probs: np.ndarray, pre, keep: bool, should_stop: StopFn, chunk: int = 2**24
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels (argmax), uncertainty and optionally probabilities (K+1, I, J, K) on the input grid.

    Every input voxel centre is mapped through world space onto the model grid and the K+1
    probabilities are interpolated there (trilinear, `grid_sample`; the model grid covers the
    input's field of view up to half a model voxel, clamped to its border), in slabs of about
    `chunk` values so memory stays bounded on large CT.
    """
    n = probs.shape[0]
    src = torch.from_numpy(probs)[None]  # (1, K+1, X, Y, Z)
    size = np.array(probs.shape[1:], dtype=np.float64)
    to_src = np.linalg.inv(pre.affine) @ pre.source_affine  # input voxel (i, j, k) -> model voxel
    # grid_sample with align_corners=True: -1 and 1 are the centres of the first and last voxel.
    scale = np.where(size > 1, 2.0 / np.maximum(size - 1, 1), 0.0)
    matrix = to_src[:3, :3] * scale[:, None]
    offset = to_src[:3, 3] * scale - (size > 1)
    shape = pre.source_shape
    j, k = np.arange(shape[1]), np.arange(shape[2])
    jk = matrix[:, 1, None, None] * j[None, :, None] + matrix[:, 2, None, None] * k[None, None, :]  # (3, J, K)
    jk = torch.from_numpy((jk + offset[:, None, None]).astype(np.float32))

    labels = np.empty(shape, dtype=np.uint8 if n <= 256 else np.uint16)
    uncertainty = np.empty(shape, dtype=np.float32)
    full = np.empty((n, *shape), dtype=np.float32) if keep else None
    rows = max(1, chunk // (n * shape[1] * shape[2]))
    for i0 in range(0, shape[0], rows):
        check_stop(should_stop)
        i = torch.arange(i0, min(shape[0], i0 + rows), dtype=torch.float32)
        coords = torch.from_numpy(matrix[:, 0].astype(np.float32))[:, None, None, None] * i[None, :, None, None]
        coords = coords + jk[:, None]  # (3, r, J, K): model voxel (x, y, z), normalised
        grid = coords.permute(1, 2, 3, 0).flip(-1)[None]  # (1, r, J, K, 3) as (z, y, x) for grid_sample
        p = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]  # (K+1, r, J, K)
        labels[i0 : i0 + len(i)] = _argmax_channels(p).numpy()
        entropy = -(p * p.clamp_min(1e-12).log()).sum(0) / math.log(n)
        uncertainty[i0 : i0 + len(i)] = entropy.clamp(0.0, 1.0).numpy()
        if full is not None:
            full[:, i0 : i0 + len(i)] = p.numpy()
    return labels, uncertainty, full


def _argmax_channels(p: Tensor) -> Tensor:
    """argmax over dim 0 of (C, ...), the first maximum winning (faster than `argmax(0)` on a CPU)."""
    best = p[0].clone()
    index = torch.zeros(p.shape[1:], dtype=torch.uint8 if p.shape[0] <= 256 else torch.int32)
    for c in range(1, p.shape[0]):
        better = p[c] > best
        index[better] = c
        torch.maximum(best, p[c], out=best)
    return index
