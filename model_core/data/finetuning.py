"""Fine-tuning data: which label values are classes, scans on the model grid, augmented crops, cached features.

`class_map` turns label values into training targets (0 background, 1..K classes, `IGNORE`
unannotated); `prepare_scan` pads a preprocessed scan and finds its crop centres; `CropDataset`
draws augmented crops (MONAI transforms); `cache_features` runs the frozen encoder once over the
crops and `CachedFeatureDataset` serves them with the voxels a step trains on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor
from torch import Tensor
from torch.utils.data import Dataset

from model_core.data.preprocess import as_label_array
from model_core.errors import Ar3dInputError
from model_core.io.volume import Volume, read_volume
from model_core.models.segmentation import light_features
from model_core.models.vit import ViT3D
from model_core.progress import ProgressFn, StopFn, check_stop, report
from model_core.vocabulary import IGNORE

if TYPE_CHECKING:
    from model_core.training.finetune import FinetuneConfig

ImageLike = str | os.PathLike | Volume
TrainPair = tuple[ImageLike, ImageLike]  # (image, segmentation on the image's grid)


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


@dataclass
class PreparedScan:
    """A training scan on the model grid, padded to at least one window."""

    name: str
    image: np.ndarray  # (1, X, Y, Z) float32 in [0, 1]
    target: np.ndarray  # (1, X, Y, Z) uint8: 0 background, 1..K classes, IGNORE unannotated
    fg: np.ndarray  # flat indices of crop centres around the foreground
    bg: np.ndarray  # flat indices of annotated background voxels


def load_item(item: ImageLike, what: str) -> Volume:
    if isinstance(item, Volume):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise Ar3dInputError(f"{what} must be a file path or a Volume, got {type(item).__name__}")
    return read_volume(item)


def item_name(volume: Volume, fallback: str) -> str:
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
    image: np.ndarray, target: np.ndarray, window: Sequence[int], name: str, source: str
) -> PreparedScan:
    """Pad a preprocessed image and its target to a window and find the crop centres.

    Crops "around the foreground" are centred anywhere within 3/8 of a window of a class voxel,
    not on it: the encoder has absolute positions inside a window, and a decoder trained on crops
    with the class always in the middle learns the middle, not the class.
    """
    img = _pad_to(image[None].astype(np.float32, copy=False), window, 0.0)
    tgt = _pad_to(target[None], window, IGNORE)
    classes = (tgt[0] > 0) & (tgt[0] != IGNORE)
    if not classes.any():
        raise Ar3dInputError("has no voxel of the selected classes at the model's spacing", source)
    near = ndi.maximum_filter(classes, size=[max(1, 3 * r // 4) for r in window], mode="constant")
    background = tgt[0] == 0
    if (background & (img[0] > 0)).any():
        background &= img[0] > 0  # inside the body / head, not the air around it
    fg = np.flatnonzero(near)
    bg = np.flatnonzero(background) if background.any() else fg
    return PreparedScan(name, img, tgt, fg, bg)


class RandThickSlices(RandomizableTransform, MapTransform):
    """Simulate thick slices along the last (superior) axis: blocks of k slices replaced by their mean.

    k is drawn from 1..`max_thickness` (1: unchanged). A 6.5 mm post-contrast MRI seen by a 1.5 mm model
    grid is such a volume, with k about 4. Labels are left as they are: the anatomy did not move.
    """

    def __init__(self, keys: KeysCollection, max_thickness: int, prob: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.max_thickness = max_thickness
        self.thickness = 1

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.thickness = int(self.R.randint(1, self.max_thickness + 1)) if self._do_transform else 1

    def __call__(self, data: dict) -> dict:
        self.randomize()
        if self.thickness == 1:
            return data
        out = dict(data)
        for key in self.key_iterator(out):
            x = torch.as_tensor(out[key])  # (C, X, Y, Z)
            z, k = x.shape[-1], self.thickness
            pad = -z % k
            blocks = F.pad(x, (0, pad), mode="replicate") if pad else x
            means = blocks.unflatten(-1, (-1, k)).mean(-1, keepdim=True)  # (C, X, Y, Z/k, 1)
            out[key] = means.expand(*means.shape[:-1], k).flatten(-2)[..., :z].to(x.dtype)
        return out


def augmentation(window: Sequence[int], cfg: FinetuneConfig) -> Compose:
    """MONAI transforms on {"image", "label", "fg", "bg"}: a crop around a class voxel (or background), zoom and
    rotation, flips, then the image's intensities: scale and shift, a random smooth intensity curve (contrast
    phases, other scanners), gamma, an MRI bias field, thick slices."""
    keys = ("image", "label")
    return Compose([
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=tuple(window), pos=cfg.pos_fraction,
                               neg=1 - cfg.pos_fraction, num_samples=1, fg_indices_key="fg", bg_indices_key="bg"),
        *([RandAffined(keys, prob=1.0, scale_range=(cfg.zoom,) * 3, rotate_range=(cfg.rotate,) * 3,
                       mode=("bilinear", "nearest"), padding_mode="border")] if cfg.zoom or cfg.rotate else []),
        *[RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)],
        RandScaleIntensityd("image", factors=cfg.intensity_jitter, prob=1.0),
        RandShiftIntensityd("image", offsets=cfg.intensity_jitter, prob=1.0),
        *intensity_augmentation(cfg),
    ])


def intensity_augmentation(cfg: FinetuneConfig) -> list:
    """The optional intensity transforms of `cfg` (each off at 0), on intensities in [0, 1]."""
    transforms = []
    if cfg.contrast_curve:
        transforms.append(RandHistogramShiftd("image", num_control_points=(5, 10), prob=cfg.contrast_curve))
    if cfg.gamma:
        transforms.append(RandAdjustContrastd("image", gamma=(1 / (1 + cfg.gamma), 1 + cfg.gamma), prob=0.5))
    if cfg.bias_field:
        transforms.append(RandBiasFieldd("image", coeff_range=(0.0, cfg.bias_field), prob=0.5))
    if cfg.thick_slices > 1:
        transforms.append(RandThickSlices("image", cfg.thick_slices, prob=0.5))
    return transforms


class CropDataset(Dataset):
    """Augmented crops of the scans: item i is a pure function of (seed, i). Items: {"volumes", "labels"}."""

    def __init__(self, scans: list[PreparedScan], window: Sequence[int], cfg: FinetuneConfig, seed: int):
        self.scans, self.seed = scans, seed
        self.transform = augmentation(window, cfg)

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
    blocks: Sequence[int] | None = None,
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
            features = light_features(encoder, x, blocks).to("cpu", torch.float16)  # (b, 4C, gx, gy, gz)
            items += [dict(b, features=f.clone()) for b, f in zip(batch, features)]
            report(progress, len(items), n, "caching encoder features")
    return items
