"""Few-shot fine-tuning of a segmentation model, on the one training loop (`model_core.train`).

`finetune(model, pairs, out, cfg)` starts from a pretrained encoder (a checkpoint folder or a
shipped model's name) or from scratch, and writes a segmentation checkpoint folder (config.json +
model.safetensors; config.json "classes" lists the K class names, label value k = classes[k-1]).

Modes
- "head": the encoder is frozen. Each training scan gets `crops_per_scan` augmented crops
  (MONAI transforms: random crops near the foreground, zoom and rotation, optional flips, intensity
  scale and shift)
  whose encoder features are computed once; the light decoder then trains for many steps on this
  cache, each step on `points` sampled voxels of every crop (full-resolution tensors are what
  makes a 3D decoder slow on a CPU). Fast on a CPU.
- "full": the UNETR decoder and the encoder train together on fresh augmented crops every step,
  with layer-wise learning-rate decay (0.75 per block from the top, as in AR-SSL4M / BEiT).

Input: the encoder's spacing and intensity convention. A new (scratch) encoder on CT reads the
soft-tissue window, -160..240 HU (`ct_window`), where organs differ by tens of HU rather than the
0.01 they span in the full window.

Annotation
- "full": 0 is background, every other voxel is annotated.
- "sparse" (scribbles): 0 is unannotated and ignored by the loss; one label is the background
  (`background_label`, a value or a class name; default: the class named "background").

Classes: `labels` keeps label values as classes of their own ("all": every value found),
`merge` joins several values into one class ({"tumor": [1, 2, 3, 4]}). Values neither kept nor
merged become background. With `merge` and no explicit `labels`, only the merged classes are kept.

The loss is Dice + cross-entropy (MONAI's DiceLoss on the foreground classes, masked to the
annotated voxels); "dice" reported during training is the hard Dice of the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.transforms import (
    Compose,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor
from torch import Tensor, nn
from torch.utils.data import Dataset

from .checkpoint import (
    CONFIG_FILE,
    DEFAULT_ENCODER,
    build_encoder,
    has_checkpoint,
    load_checkpoint,
    load_into,
    load_train_state,
    make_config,
    read_config,
    resolve_model,
    save_checkpoint,
)
from .device import resolve_device
from .errors import Ar3dInputError
from .io import Volume, check_image, read_volume
from .models import ViT3D, ViT3DConfig
from .preprocess import (
    CT_SOFT_TISSUE_HU,
    IntensityConfig,
    PreprocessConfig,
    as_label_array,
    guess_modality,
    preprocess_volume,
)
from .progress import Progress, ProgressFn, StopFn, check_stop, report
from .segmentation import (
    SegmentationModel,
    build_decoder,
    light_features,
    segmentation_logits,
)
from .train import TrainConfig, default_param_groups, train

IGNORE = 255  # target value of unannotated voxels (sparse annotation, padding)
MODES = ("head", "full")
ANNOTATIONS = ("full", "sparse")
SCRATCH = "scratch"
DEFAULT_SPACING = (1.5, 1.5, 1.5)

ImageLike = str | os.PathLike | Volume
TrainPair = tuple[ImageLike, ImageLike]  # (image, segmentation on the image's grid)


@dataclass
class FinetuneConfig:
    mode: str = "head"  # "head" (frozen encoder, light decoder on cached features) or "full" (UNETR, all weights)
    annotation: str = "full"  # "full" (0 = background) or "sparse" (0 = unannotated)
    labels: str | Sequence[int] = "all"  # label values kept as classes, or "all"
    merge: dict[str, Sequence[int]] = field(default_factory=dict)  # class name -> label values joined into it
    background_label: str | int | None = None  # sparse: the label (value or name) that is background
    steps: int | None = None  # optimizer steps; default 400 (head) or 300 (full)
    ckpt_every: int = 50  # steps between resumable checkpoints in the work folder (see `finetune(resume=...)`)
    batch_size: int = 2
    lr: float | None = None  # peak learning rate; default 1e-3 (head) or 1e-4 (full, top layer)
    layer_decay: float = 0.75  # full mode: lr factor per encoder block going down
    weight_decay: float = 0.01
    roi: int | None = None  # training and inference window edge in voxels; default 6 patches (96 for 16^3 patches)
    crops_per_scan: int = 16  # head mode: augmented crops cached per scan
    points: int = 16384  # head mode: voxels per crop the light decoder is trained on at each step
    pos_fraction: float = 0.67  # share of crops centred near a class voxel (the rest: on annotated background)
    flip_prob: float = 0.0  # probability of a flip along each axis (off: mirroring swaps left and right anatomy)
    intensity_jitter: float = 0.02  # scale by 1 +- this and shift by +- this (intensities in [0, 1]; 0.02 = 40 HU in CT)
    zoom: float = 0.15  # random scaling of each crop by 1 +- this along each axis (0: off)
    rotate: float = 0.1  # random rotation of each crop by up to this many radians about each axis (0: off)
    ct_window: tuple[float, float] | None = None  # HU window of a new (scratch) encoder's CT input; None: soft tissue
    spacing: tuple[float, float, float] | None = None  # model voxel spacing; default the encoder's (else 1.5 mm)
    scratch_config: str | ViT3DConfig = "tiny"  # encoder size when starting from scratch
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise Ar3dInputError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.annotation not in ANNOTATIONS:
            raise Ar3dInputError(f"annotation {self.annotation!r} is not one of {', '.join(ANNOTATIONS)}")
        for name in ("steps", "roi"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise Ar3dInputError(f"FinetuneConfig.{name} must be a positive integer, got {value!r}")
        for name in ("batch_size", "crops_per_scan", "points", "ckpt_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise Ar3dInputError(f"FinetuneConfig.{name} must be a positive integer, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise Ar3dInputError(f"FinetuneConfig.lr must be positive, got {self.lr!r}")
        if not 0 < self.layer_decay <= 1:
            raise Ar3dInputError(f"FinetuneConfig.layer_decay must be in (0, 1], got {self.layer_decay!r}")
        for name in ("pos_fraction", "flip_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise Ar3dInputError(f"FinetuneConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("zoom", "rotate"):
            if not 0 <= getattr(self, name) < 1:
                raise Ar3dInputError(f"FinetuneConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.ct_window is not None:
            self.ct_window = IntensityConfig("ct", window=self.ct_window).window  # checked: (low, high), low < high
        if isinstance(self.labels, str) and self.labels != "all":
            raise Ar3dInputError(f"labels must be 'all' or a list of label values, got {self.labels!r}")

    @property
    def total_steps(self) -> int:
        return self.steps or (400 if self.mode == "head" else 300)

    @property
    def peak_lr(self) -> float:
        return self.lr or (1e-3 if self.mode == "head" else 1e-4)


@dataclass
class FinetuneResult:
    checkpoint: Path  # the segmentation checkpoint folder
    classes: list[str]  # class names, label values 1..K
    steps: int
    loss: float  # last training loss
    dice: float  # hard Dice of the last training batch
    cancelled: bool  # should_stop() ended training early (the model so far is written)
    prepare_s: float  # reading and preprocessing the scans
    cache_s: float  # head mode: computing the cached encoder features
    train_s: float  # the training loop
    wall_s: float  # everything


# ----------------------------------------------------------------------------- classes


@dataclass
class ClassMap:
    """How segmentation values become training targets: 0 background, 1..K the classes, IGNORE unannotated."""

    classes: list[str]  # K names
    sources: list[list[int]]  # label values of each class
    background: list[int]  # values that become background
    ignored: list[int]  # values ignored by the loss (0 in sparse annotation)

    def lut(self, max_value: int) -> np.ndarray:
        """(max_value + 1,) uint8 lookup table from label value to target."""
        table = np.zeros(max_value + 1, dtype=np.uint8)
        for value in self.ignored:
            if value <= max_value:
                table[value] = IGNORE
        for k, values in enumerate(self.sources, start=1):
            for value in values:
                if value <= max_value:
                    table[value] = k
        return table

    def to_dict(self) -> dict:
        return {"classes": dict(zip(self.classes, self.sources)), "background": self.background, "ignored": self.ignored}


def class_map(
    present: set[int],
    names: dict[int, str],
    cfg: FinetuneConfig,
    source: str = "the training segmentations",
) -> ClassMap:
    """The classes to train from the label values `present` in the segmentations and their `names`.

    Raises `Ar3dInputError` for asked-for values that do not occur, an empty selection and, in
    sparse annotation, a missing background label.
    """
    present = set(present) - {0}
    found = ", ".join(map(str, sorted(present))) or "none"
    background: list[int] = []
    ignored: list[int] = []
    if cfg.annotation == "sparse":
        ignored = [0]
        bg = cfg.background_label if cfg.background_label is not None else "background"
        by_name = {n: v for v, n in names.items()}
        value = by_name.get(str(bg), int(bg) if str(bg).isdigit() else None)
        if value is None or value not in present:
            raise Ar3dInputError(
                f"sparse annotation needs a background label, but {bg!r} is not one of the label values or names "
                f"in {source} (found {found}); pass --background-label NAME_OR_VALUE"
            )
        background = [value]
        present = present - {value}
    merged = {name: sorted({int(v) for v in values}) for name, values in cfg.merge.items()}
    if cfg.labels == "all":
        kept = [] if merged else sorted(present - {v for vs in merged.values() for v in vs})
    else:
        kept = sorted({int(v) for v in cfg.labels})
    wanted = sorted(set(kept) | {v for vs in merged.values() for v in vs})
    missing = [v for v in wanted if v not in present]
    if missing:
        raise Ar3dInputError(
            f"label value(s) {', '.join(map(str, missing))} do not occur in {source} (found {found})"
        )
    overlap = set(kept) & {v for vs in merged.values() for v in vs}
    if overlap:
        raise Ar3dInputError(f"label value(s) {sorted(overlap)} are both kept and merged; choose one")
    classes = [names.get(v, f"label_{v}") for v in kept] + list(merged)
    sources = [[v] for v in kept] + list(merged.values())
    if not classes:
        raise Ar3dInputError(f"no class to train: {source} hold no label value besides background")
    if len(set(classes)) != len(classes):
        raise Ar3dInputError(f"class names {classes} are not unique")
    background += sorted(present - set(wanted))
    return ClassMap(classes, sources, background, ignored)


# ----------------------------------------------------------------------------- scans


@dataclass
class PreparedScan:
    """A training scan on the model grid, padded to at least one window."""

    name: str
    image: np.ndarray  # (1, X, Y, Z) float32 in [0, 1]
    target: np.ndarray  # (1, X, Y, Z) uint8: 0 background, 1..K classes, IGNORE unannotated
    fg: np.ndarray  # flat indices of crop centres around the foreground
    bg: np.ndarray  # flat indices of annotated background voxels


def _load(item: ImageLike, what: str) -> Volume:
    if isinstance(item, Volume):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise Ar3dInputError(f"{what} must be a file path or a Volume, got {type(item).__name__}")
    return read_volume(item)


def _name(volume: Volume, fallback: str) -> str:
    return str(volume.path) if volume.path else fallback


def check_pair(image: Volume, seg: Volume, image_name: str, seg_name: str) -> np.ndarray:
    """The integer label array of `seg` after checking it lies on `image`'s grid and is not empty."""
    if image.shape != seg.shape or not np.allclose(image.affine, seg.affine, atol=1e-3):
        raise Ar3dInputError(
            f"image {image_name} (shape {image.shape}, affine {np.round(image.affine, 3).tolist()}) and "
            f"segmentation {seg_name} (shape {seg.shape}, affine {np.round(seg.affine, 3).tolist()}) "
            "are not on the same voxel grid"
        )
    labels = as_label_array(seg.array, seg_name)
    if not labels.any():
        raise Ar3dInputError("segmentation is empty (every voxel is 0)", seg_name)
    return labels


def _pad_to(array: np.ndarray, size: Sequence[int], value: float) -> np.ndarray:
    """Pad (C, X, Y, Z) symmetrically to at least `size` spatially."""
    pads = [(0, 0)] + [((max(0, s - n) + 1) // 2, max(0, s - n) // 2) for n, s in zip(array.shape[1:], size)]
    return np.pad(array, pads, constant_values=value) if any(sum(p) for p in pads) else array


def prepare_scan(
    image: np.ndarray, target: np.ndarray, roi: Sequence[int], name: str, source: str
) -> PreparedScan:
    """Pad a preprocessed image and its target to a window and find the crop centres.

    Crops "around the foreground" are centred anywhere within 3/8 of a window of a class voxel,
    not on it: the encoder has absolute positions inside a window, and a decoder trained on crops
    with the class always in the middle learns the middle, not the class.
    """
    img = _pad_to(image[None].astype(np.float32, copy=False), roi, 0.0)
    tgt = _pad_to(target[None], roi, IGNORE)
    classes = (tgt[0] > 0) & (tgt[0] != IGNORE)
    if not classes.any():
        raise Ar3dInputError("has no voxel of the selected classes at the model's spacing", source)
    near = ndi.maximum_filter(classes, size=[max(1, 3 * r // 4) for r in roi], mode="constant")
    background = tgt[0] == 0
    if (background & (img[0] > 0)).any():
        background &= img[0] > 0  # inside the body / head, not the air around it
    fg = np.flatnonzero(near)
    bg = np.flatnonzero(background) if background.any() else fg
    return PreparedScan(name, img, tgt, fg, bg)


# ----------------------------------------------------------------------------- data


def augmentation(roi: Sequence[int], cfg: FinetuneConfig) -> Compose:
    """MONAI transforms on {"image", "label", "fg", "bg"}: a crop around a class voxel (or background), zoom and
    rotation, flips, intensity."""
    keys = ("image", "label")
    return Compose([
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=tuple(roi), pos=cfg.pos_fraction,
                               neg=1 - cfg.pos_fraction, num_samples=1, fg_indices_key="fg", bg_indices_key="bg"),
        *([RandAffined(keys, prob=1.0, scale_range=(cfg.zoom,) * 3, rotate_range=(cfg.rotate,) * 3,
                       mode=("bilinear", "nearest"), padding_mode="border")] if cfg.zoom or cfg.rotate else []),
        *[RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)],
        RandScaleIntensityd("image", factors=cfg.intensity_jitter, prob=1.0),
        RandShiftIntensityd("image", offsets=cfg.intensity_jitter, prob=1.0),
    ])


class CropDataset(Dataset):
    """Augmented crops of the scans: item i is a pure function of (seed, i). Items: {"volumes", "labels"}."""

    def __init__(self, scans: list[PreparedScan], roi: Sequence[int], cfg: FinetuneConfig, seed: int):
        self.scans, self.seed = scans, seed
        self.transform = augmentation(roi, cfg)

    def __len__(self) -> int:
        return 1 << 30  # endless: the train loop asks for step * batch_size + j

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        scan = self.scans[i % len(self.scans)]
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + i) % 2**32)
        out = self.transform({"image": scan.image, "label": scan.target, "fg": scan.fg, "bg": scan.bg})[0]
        return {"volumes": convert_to_tensor(out["image"], track_meta=False).float(),  # (1, X, Y, Z)
                "labels": convert_to_tensor(out["label"], track_meta=False).to(torch.uint8)}


def _class_edges(target: np.ndarray) -> np.ndarray:
    """Voxels of (X, Y, Z) `target` with a 6-neighbour of another value."""
    edge = np.zeros(target.shape, dtype=bool)
    for axis in range(3):
        step = np.diff(target, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= step
        edge[tuple(hi)] |= step
    return edge


class CachedFeatureDataset(Dataset):
    """Cached crops with their encoder features, reshuffled every pass, and the voxels to train on.

    Items: {"volumes", "labels", "features", "points"}; "points" (N,) are flat voxel indices of the
    crop, three quarters drawn from every annotated voxel and a quarter from voxels on a class
    boundary (a pure function of (seed, i)). Uniform draws keep the class frequencies of the
    scans, so the decoder is not biased towards the foreground.
    """

    def __init__(self, items: list[dict[str, Tensor]], seed: int, points: int):
        self.items, self.seed, self.points = items, seed, points
        self.pools = []  # per item: (annotated voxels, or None for all; voxels on a class boundary)
        for item in items:
            target = item["labels"][0].numpy()
            annotated = target != IGNORE
            edge = _class_edges(target) & annotated
            self.pools.append((
                None if annotated.all() else np.flatnonzero(annotated).astype(np.int32),
                np.flatnonzero(edge).astype(np.int32),
            ))

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = len(self.items)
        k = int(np.random.default_rng((self.seed, i // n)).permutation(n)[i % n])
        item, (annotated, edge) = self.items[k], self.pools[k]
        rng = np.random.default_rng((self.seed, n, i))
        n_edge = self.points // 4 if len(edge) else 0
        rest = self.points - n_edge
        if annotated is None or not len(annotated):
            points = rng.integers(0, item["labels"][0].numel(), rest)
        else:
            points = annotated[rng.integers(0, len(annotated), rest)]
        points = np.concatenate([points, edge[rng.integers(0, max(1, len(edge)), n_edge)]])
        return dict(item, points=torch.from_numpy(points.astype(np.int64)))


def cache_features(
    encoder: ViT3D,
    crops: CropDataset,
    n: int,
    device: torch.device,
    *,
    batch_size: int = 4,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> list[dict[str, Tensor]]:
    """Crops 0..n-1 of `crops` with their `light_features` (float16, on the CPU), computed once."""
    encoder = encoder.to(device).eval()
    items: list[dict[str, Tensor]] = []
    with torch.inference_mode():
        for first in range(0, n, batch_size):
            check_stop(should_stop)
            batch = [crops[i] for i in range(first, min(n, first + batch_size))]
            x = torch.stack([b["volumes"] for b in batch]).to(device)  # (b, 1, X, Y, Z)
            features = light_features(encoder, x).to("cpu", torch.float16)  # (b, 4C, gx, gy, gz)
            items += [dict(b, features=f.clone()) for b, f in zip(batch, features)]
            report(progress, len(items), n, "caching encoder features")
    return items


# ----------------------------------------------------------------------------- objective


def dice_ce_loss(logits: Tensor, target: Tensor, dice: nn.Module) -> Tensor:
    """Dice (foreground classes, over the batch) + cross-entropy, on annotated voxels only.

    logits (B, K+1, *S); target (B, 1, *S) integer with IGNORE for unannotated voxels; S the
    spatial size (X, Y, Z) or a number of sampled points (N,).
    """
    valid = target != IGNORE  # (B, 1, *S)
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(t[:, 0], logits.shape[1]).movedim(-1, 1).to(logits.dtype)  # (B, K+1, *S)
    dice_loss = dice(logits, onehot, mask=valid.to(logits.dtype))
    if not valid.any():
        return dice_loss + 0.0 * logits.sum()
    ce = F.cross_entropy(logits.float(), torch.where(valid, target, IGNORE).long()[:, 0], ignore_index=IGNORE)
    return dice_loss + ce


def hard_dice(logits: Tensor, target: Tensor) -> float:
    """Mean Dice of argmax(logits) over the classes 1..K present in the prediction or the target (annotated voxels)."""
    pred = logits.argmax(1, keepdim=True)
    valid = target != IGNORE
    scores = []
    for k in range(1, logits.shape[1]):
        p, t = (pred == k) & valid, (target == k) & valid
        total = int(p.sum() + t.sum())
        if total:
            scores.append(2.0 * int((p & t).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


class SegmentationObjective(nn.Module):
    """The train loop's objective: batch {"volumes", "labels"[, "features"]} -> {"loss", "dice"}.

    Holds the model's `encoder` and `decoder` under those names, so its state dict is a
    `SegmentationModel`'s. `frozen_encoder=True` (head mode) turns off the encoder's gradients.
    """

    def __init__(self, model: SegmentationModel, frozen_encoder: bool):
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.encoder.requires_grad_(not frozen_encoder)
        self.dice_loss = MaskedDiceLoss(include_background=False, softmax=True, batch=True)
        self.last_dice = float("nan")

    def forward(
        self, volumes: Tensor, labels: Tensor, features: Tensor | None = None, points: Tensor | None = None
    ) -> dict[str, Tensor]:
        """volumes (B, 1, X, Y, Z), labels (B, 1, X, Y, Z); features: cached `light_features`; points (B, N):
        voxels to decode (light decoder only; default every voxel)."""
        if points is not None:
            logits = self.decoder.forward_points(volumes, features, points)  # (B, K+1, N)
            labels = labels.flatten(2).gather(2, points[:, None, :])  # (B, 1, N)
        else:
            logits = segmentation_logits(self.encoder, self.decoder, volumes, features)  # (B, K+1, X, Y, Z)
        loss = dice_ce_loss(logits, labels, self.dice_loss)
        with torch.no_grad():
            self.last_dice = hard_dice(logits, labels)
        return {"loss": loss, "dice": torch.tensor(self.last_dice)}


def layer_decay_groups(objective: nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay: block b of d gets lr * decay^(d + 1 - b).

    The patch embedding and start token count as layer 0, the final norm and the decoder as layer
    d + 1 (full lr). Weight decay on >= 2-dim weights except the start token.
    """
    depth = objective.encoder.cfg.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in objective.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder.") and not name.startswith("encoder.norm."):
            layer = 0
        else:
            layer = depth + 1
        decayed = p.ndim >= 2 and not name.endswith("start_token")
        group = groups.setdefault((layer, decayed), {
            "params": [], "lr": lr * decay ** (depth + 1 - layer), "weight_decay": weight_decay if decayed else 0.0,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ----------------------------------------------------------------------------- the entry point


def _encoder_source(model: str | os.PathLike | None, cfg: FinetuneConfig) -> tuple[ViT3D, dict, str]:
    """(encoder, its config.json or {} from scratch, a description for the provenance)."""
    if model is None or str(model) == SCRATCH:
        enc_cfg = cfg.scratch_config
        if isinstance(enc_cfg, str):
            enc_cfg = ViT3DConfig.preset(enc_cfg)
        torch.manual_seed(cfg.seed)
        return ViT3D(enc_cfg), {}, SCRATCH
    path = resolve_model(model)
    checkpoint = load_checkpoint(path)
    return build_encoder(checkpoint), checkpoint.config, str(model) if str(model) == DEFAULT_ENCODER else str(path)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise Ar3dInputError("the output must be a folder, and this is a file", out)
    if has_checkpoint(out):
        raise Ar3dInputError("already holds a checkpoint; choose another output folder", out)
    if out.is_dir() and any(out.iterdir()):
        raise Ar3dInputError("the output folder is not empty; choose a new or empty folder", out)


def _modality_name(kinds: set[str]) -> str:
    return {frozenset({"ct"}): "CT", frozenset({"mri"}): "MRI"}.get(frozenset(kinds), "any")


# ----------------------------------------------------------------------------- resume


RESUME_FREE = ("device", "ckpt_every")  # FinetuneConfig fields a resumed run may change


def work_folder(out: str | os.PathLike) -> Path:
    """The hidden folder beside `out` where `finetune` trains and checkpoints until the model is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.finetuning"


def _check_work(work: Path, resume: bool) -> None:
    if has_checkpoint(work) and not resume:
        steps = read_config(work).get("provenance", {}).get("steps", "?")
        raise Ar3dInputError(
            f"holds a fine-tuning run interrupted at step {steps}; continue it with --resume (resume=True) "
            "and the same options, or delete that folder", work)


def _fingerprint(digest, array: np.ndarray) -> None:
    """Add an array's shape, type and bytes to a hashlib digest."""
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).data)


def _resume_settings(config: dict) -> dict:
    """What a resumed run must share with the interrupted one, by name: model, classes, data, options."""
    prov = config.get("provenance", {})
    settings = {
        "encoder": config.get("encoder"),
        "decoder": config.get("heads"),
        "preprocessing": config.get("preprocessing"),
        "classes": config.get("classes"),
        "starting model": prov.get("encoder"),
        "training data": prov.get("data"),
        "training data contents": prov.get("data_fingerprint"),
        **{k: v for k, v in prov.get("finetune", {}).items() if k not in RESUME_FREE},
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as read back from config.json


def _check_resume(work: Path, config: dict) -> None:
    """Refuse to resume the run in `work` with other settings than it started with."""
    saved, ours = _resume_settings(read_config(work)), _resume_settings(config)
    changed = [name for name in ours if saved.get(name) != ours[name]]
    if changed:
        raise Ar3dInputError(
            f"the {', '.join(changed)} of this run differ from the interrupted run's; resume with the same options "
            "and data, or delete that folder to start again", work / CONFIG_FILE)


def _finished_result(out: Path, t_start: float) -> FinetuneResult:
    """The result of a run whose final model was complete when it was killed (before its last rename)."""
    config = read_config(out)
    prov = config["provenance"]
    metrics, timing = prov.get("metrics", {}), prov.get("timing_s", {})
    return FinetuneResult(
        checkpoint=out, classes=list(config["classes"]), steps=int(prov["steps"]),
        loss=float(metrics.get("loss", "nan")), dice=float(metrics.get("dice", "nan")),
        cancelled=bool(prov.get("cancelled")), prepare_s=float(timing.get("prepare", 0.0)),
        cache_s=float(timing.get("cache", 0.0)), train_s=float(timing.get("train", 0.0)),
        wall_s=time.perf_counter() - t_start,
    )


def finetune(
    model: str | os.PathLike | None,
    pairs: Sequence[TrainPair],
    out: str | os.PathLike,
    cfg: FinetuneConfig | None = None,
    *,
    class_names: dict[int, str] | None = None,
    modality: str | None = None,
    provenance: dict | None = None,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune a segmentation model on (image, segmentation) pairs and write it to the folder `out`.

    model: a checkpoint folder, a shipped model's name (e.g. "ar3d-encoder"), or None / "scratch".
    pairs: (image, segmentation) as file paths or `Volume`s; each segmentation on its image's grid.
    class_names: label value -> name (default "label_<value>"); names the classes in config.json.
    modality: a hint for the images' modality ("CT", "MRI"; default: guessed from the voxels).
    provenance: extra entries for config.json's provenance (e.g. the command line).
    progress: `Progress` reports for reading, caching ("caching encoder features") and training
        ("training", metrics loss, dice, lr).
    should_stop: polled throughout; before training it cancels without writing anything
        (raises `Cancelled`), during training it stops and writes the model trained so far.
    resume: continue the run a kill interrupted, from the last checkpoint in its work folder (the
        same arguments are needed, except `cfg.device` and `cfg.ckpt_every`); without a checkpoint
        there it starts afresh. Without `resume`, a work folder with a checkpoint is an error.

    Nothing is written to `out` until the model is complete: training runs in the hidden sibling
    folder `work_folder(out)`, with a checkpoint every `cfg.ckpt_every` steps, that is renamed to
    `out` at the end. An error removes it; a kill (or KeyboardInterrupt) leaves it for `resume`.
    """
    t_start = time.perf_counter()
    cfg = cfg or FinetuneConfig()
    out = Path(out)
    work = work_folder(out)
    _check_out(out)
    _check_work(work, resume)
    resuming = resume and has_checkpoint(work)
    if resuming and load_train_state(work) is None:  # killed after the final save, before the rename
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.rename(work, out)
        return _finished_result(out, t_start)
    if not pairs:
        raise Ar3dInputError("fine-tuning needs at least one (image, segmentation) pair")
    names = dict(class_names or {})

    encoder, encoder_config, encoder_source = _encoder_source(model, cfg)
    if cfg.ct_window is not None and encoder_source != SCRATCH:
        raise Ar3dInputError(f"ct_window {cfg.ct_window} is for a new encoder; {encoder_source} keeps the input "
                             "window it was pretrained with")
    p = encoder.cfg.patch_size
    roi = cfg.roi or 6 * p
    if roi % p:
        raise Ar3dInputError(f"the window size {roi} is not a multiple of the encoder's patch size {p}")
    roi3 = (roi, roi, roi)
    pre_saved = encoder_config.get("preprocessing") or {}
    spacing = cfg.spacing or tuple(pre_saved.get("spacing") or DEFAULT_SPACING)
    intensity = pre_saved.get("intensity")
    pre_cfg = PreprocessConfig(spacing=spacing, intensity=intensity)

    # Read every pair and check it before preprocessing anything.
    volumes: list[tuple[Volume, np.ndarray, str, str]] = []
    contents = hashlib.blake2b(digest_size=16)  # of every voxel: a resumed run must train on the same data
    for n, (image_item, seg_item) in enumerate(pairs):
        check_stop(should_stop)
        image = _load(image_item, "image")
        seg = _load(seg_item, "segmentation")
        image_name, seg_name = _name(image, f"image {n}"), _name(seg, f"segmentation {n}")
        check_image(image.array, image_name)
        volumes.append((image, check_pair(image, seg, image_name, seg_name), image_name, seg_name))
        _fingerprint(contents, image.array)
        _fingerprint(contents, volumes[-1][1])
        report(progress, n + 1, len(pairs), "reading scans")
    data_names = [f"{image_name} + {seg_name}" for _, _, image_name, seg_name in volumes]
    present = set().union(*(set(np.unique(labels).tolist()) for _, labels, _, _ in volumes))
    cmap = class_map(present, names, cfg)

    kinds = {guess_modality(image.array, modality or image.meta.get("modality")) for image, _, _, _ in volumes}
    trained_on = encoder_config.get("modality", "any")
    if trained_on != "any" and _modality_name(kinds) not in (trained_on, "any"):
        warnings.warn(
            f"the encoder was pretrained on {trained_on} but the training images look like {_modality_name(kinds)}",
            stacklevel=2,
        )
    if pre_cfg.intensity is None and len(kinds) == 1:
        (modality_kind,) = kinds
        intensity = IntensityConfig(modality_kind)
        if modality_kind == "ct" and encoder_source == SCRATCH:  # a new encoder: the window where organs differ
            intensity = IntensityConfig("ct", window=cfg.ct_window or CT_SOFT_TISSUE_HU)
        pre_cfg = PreprocessConfig(spacing=spacing, intensity=intensity)

    scans = []
    for n, (image, labels, image_name, seg_name) in enumerate(volumes):
        check_stop(should_stop)
        target = cmap.lut(int(labels.max()))[labels]
        pre = preprocess_volume(image, pre_cfg, modality=modality, labels=target, source=image_name)
        scans.append(prepare_scan(pre.array, pre.labels, roi3, Path(image_name).name, seg_name))
        report(progress, n + 1, len(volumes), "preprocessing scans")
    del volumes
    prepare_s = time.perf_counter() - t_start

    K = len(cmap.classes)
    torch.manual_seed(cfg.seed)
    kind = "light" if cfg.mode == "head" else "unetr"
    seg_model = SegmentationModel(encoder, build_decoder(kind, encoder.cfg, K + 1))
    objective = SegmentationObjective(seg_model, frozen_encoder=cfg.mode == "head")
    crops = CropDataset(scans, roi3, cfg, cfg.seed)
    config = make_config(
        encoder.cfg.to_dict(),
        objective="segmentation",
        heads={"segmentation": {"decoder": seg_model.decoder.config, "roi": list(roi3)}},
        preprocessing=pre_cfg.to_dict(),
        modality=_modality_name(kinds),
        classes=cmap.classes,
        provenance={
            **(provenance or {}),
            "encoder": encoder_source,
            "encoder_provenance": {k: v for k, v in encoder_config.get("provenance", {}).items() if k != "train"},
            "data": data_names,
            "data_fingerprint": contents.hexdigest(),
            "mode": cfg.mode,
            "annotation": cfg.annotation,
            "label_map": cmap.to_dict(),
            "finetune": {k: v for k, v in asdict(cfg).items() if k not in ("scratch_config",)},
        },
    )
    if resuming:
        _check_resume(work, config)
        # The interrupted run's encoder (the same unless its source changed): head mode caches the same features.
        load_into(encoder, load_checkpoint(work), prefix="encoder.")
    elif work.exists():
        shutil.rmtree(work)  # a run killed before its first checkpoint

    t_cache = time.perf_counter()
    if cfg.mode == "head":
        device = resolve_device(cfg.device)
        items = cache_features(encoder, crops, cfg.crops_per_scan * len(scans), device,
                               progress=progress, should_stop=should_stop)
        dataset: Dataset = CachedFeatureDataset(items, cfg.seed, cfg.points)
        groups = default_param_groups(objective, cfg.weight_decay)
    else:
        dataset = crops
        groups = layer_decay_groups(objective, cfg.peak_lr, cfg.weight_decay, cfg.layer_decay)
    cache_s = time.perf_counter() - t_cache

    steps = cfg.total_steps
    train_cfg = TrainConfig(
        steps=steps, batch_size=cfg.batch_size, lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
        warmup_steps=max(1, steps // 20), ckpt_every=cfg.ckpt_every, log_every=10, seed=cfg.seed, amp=cfg.amp,
        device=cfg.device,
    )

    def on_progress(p: Progress) -> None:
        report(progress, p.step, p.total, "training", **p.metrics, dice=objective.last_dice)

    try:
        result = train(objective, dataset, train_cfg, work, checkpoint_config=config, param_groups=groups,
                       resume=resuming, progress=on_progress, should_stop=should_stop)
        final = read_config(work)
        final["provenance"]["metrics"] = {"loss": result.loss, "dice": objective.last_dice}
        final["provenance"]["cancelled"] = result.cancelled
        final["provenance"]["timing_s"] = {"prepare": round(prepare_s, 2), "cache": round(cache_s, 2),
                                           "train": round(result.wall_time_s, 2)}
        save_checkpoint(work, seg_model.state_dict(), final)  # drops the train state
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.rename(work, out)
    except KeyboardInterrupt:
        raise  # a kill (a second Ctrl-C): the work folder keeps its last checkpoint for `resume`
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FinetuneResult(
        checkpoint=out, classes=cmap.classes, steps=result.step, loss=result.loss, dice=objective.last_dice,
        cancelled=result.cancelled, prepare_s=prepare_s, cache_s=cache_s, train_s=result.wall_time_s,
        wall_s=time.perf_counter() - t_start,
    )
