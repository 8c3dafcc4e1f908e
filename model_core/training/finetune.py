"""Few-shot fine-tuning of a segmentation model, on the one training loop (`model_core.training.loop`).

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
- "dense": every voxel is annotated, 0 is background ("full" is accepted for older configs).
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
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from model_core.checkpoint.config import CheckpointConfig, HeadsConfig, Provenance, SegmentationHeadConfig
from model_core.checkpoint.provenance import describe_file, file_name
from model_core.checkpoint.store import (
    build_encoder,
    has_checkpoint,
    load_checkpoint,
    load_config,
    load_into,
    load_train_state,
    model_record,
    resolve_model,
    save_checkpoint,
)
from model_core.data.finetuning import (
    CachedFeatureDataset,
    ClassMap,
    CropDataset,
    ImageLike,
    PreparedScan,
    TrainPair,
    cache_features,
    check_pair,
    class_map,
    item_name,
    load_item,
    prepare_scan,
)
from model_core.data.preprocess import (
    IntensityConfig,
    PreprocessConfig,
    guess_modality,
    preprocess_volume,
)
from model_core.device import resolve_device
from model_core.errors import Ar3dInputError
from model_core.io.volume import Volume, check_image, read_label_names
from model_core.models.segmentation import SegmentationModel, build_decoder
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.segmentation import SegmentationObjective, layer_decay_groups
from model_core.progress import Progress, ProgressFn, StopFn, check_stop, report
from model_core.training.loop import (
    TrainConfig,
    TrainResult,
    default_param_groups,
    train,
)
from model_core.training.resume import (
    check_finetune_resume,
    check_work_folder,
    work_folder,
)
from model_core.vocabulary import (
    ANNOTATIONS,
    CT_SOFT_TISSUE_HU,
    DEFAULT_LR,
    DEFAULT_STEPS,
    MODALITY_ANY,
    MODEL_SPACING,
    SCRATCH,
    TRAINING_MODES,
    WINDOW_PATCHES,
)


@dataclass
class FinetuneConfig:
    mode: str = "head"  # "head" (frozen encoder, light decoder on cached features) or "full" (UNETR, all weights)
    annotation: str = "dense"  # "dense" (0 = background) or "sparse" (0 = unannotated)
    labels: str | Sequence[int] = "all"  # label values kept as classes, or "all"
    merge: dict[str, Sequence[int]] = field(default_factory=dict)  # class name -> label values joined into it
    background_label: str | int | None = None  # sparse: the label (value or name) that is background
    steps: int | None = None  # optimizer steps; default DEFAULT_STEPS[mode]
    ckpt_every: int = 50  # steps between resumable checkpoints in the work folder (see `finetune(resume=...)`)
    batch_size: int = 2
    lr: float | None = None  # peak learning rate; default DEFAULT_LR[mode] (full: of the top layer)
    layer_decay: float = 0.75  # full mode: lr factor per encoder block going down
    weight_decay: float = 0.01
    window: int | None = None  # the window's edge in voxels (training and inference); default WINDOW_PATCHES patches
    crops_per_scan: int = 16  # head mode: augmented crops cached per scan
    points: int = 16384  # head mode: voxels per crop the light decoder is trained on at each step
    pos_fraction: float = 0.67  # share of crops centred near a class voxel (the rest: on annotated background)
    flip_prob: float = 0.0  # probability of a flip along each axis (off: mirroring swaps left and right anatomy)
    intensity_jitter: float = 0.02  # scale by 1 +- this and shift by +- this (intensities in [0, 1]; 0.02 = 40 HU in CT)
    zoom: float = 0.15  # random scaling of each crop by 1 +- this along each axis (0: off)
    rotate: float = 0.1  # random rotation of each crop by up to this many radians about each axis (0: off)
    contrast_curve: float = 0.0  # probability of a random smooth intensity curve (CT contrast phases; 0: off)
    gamma: float = 0.0  # gamma drawn from [1 / (1 + this), 1 + this] for half the crops (0: off)
    bias_field: float = 0.0  # MRI bias field: polynomial coefficients up to this, for half the crops (0: off)
    thick_slices: int = 1  # half the crops get slices up to this many voxels thick along S (1: off)
    blocks: tuple[int, ...] | None = None  # head mode: encoder blocks the light decoder reads (default 4 evenly spaced)
    ct_window: tuple[float, float] | None = None  # HU window of a new (scratch) encoder's CT input; None: soft tissue
    spacing: tuple[float, float, float] | None = None  # model voxel spacing; default the encoder's (else 1.5 mm)
    scratch_config: str | ViT3DConfig = "tiny"  # encoder size when starting from scratch
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in TRAINING_MODES:
            raise Ar3dInputError(f"mode {self.mode!r} is not one of {', '.join(TRAINING_MODES)}")
        if self.annotation == "full":  # the name "dense" had before "full" meant only a training mode
            self.annotation = "dense"
        if self.annotation not in ANNOTATIONS:
            raise Ar3dInputError(f"annotation {self.annotation!r} is not one of {', '.join(ANNOTATIONS)}")
        for name in ("steps", "window"):
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
        if not 0 <= self.contrast_curve <= 1:
            raise Ar3dInputError(f"FinetuneConfig.contrast_curve must be in [0, 1], got {self.contrast_curve!r}")
        for name in ("gamma", "bias_field"):
            if not 0 <= getattr(self, name) <= 4:
                raise Ar3dInputError(f"FinetuneConfig.{name} must be in [0, 4], got {getattr(self, name)!r}")
        if not isinstance(self.thick_slices, int) or not 1 <= self.thick_slices <= 16:
            raise Ar3dInputError(f"FinetuneConfig.thick_slices must be an integer in 1..16, got {self.thick_slices!r}")
        for name in ("zoom", "rotate"):
            if not 0 <= getattr(self, name) < 1:
                raise Ar3dInputError(f"FinetuneConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)
        if self.ct_window is not None:
            self.ct_window = IntensityConfig("ct", window=self.ct_window).window  # checked: (low, high), low < high
        if isinstance(self.labels, str) and self.labels != "all":
            raise Ar3dInputError(f"labels must be 'all' or a list of label values, got {self.labels!r}")

    @property
    def total_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.mode]

    @property
    def peak_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.mode]


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


# ----------------------------------------------------------------------------- the steps of a fine-tune


@dataclass
class StartEncoder:
    """The encoder a fine-tune starts from."""

    encoder: ViT3D
    config: CheckpointConfig | None  # its checkpoint's config (None for a new encoder)
    source: str | dict[str, str]  # for the provenance: a shipped name, SCRATCH, or a folder's name and weights' sha256


@dataclass
class TrainingScans:
    """The checked training pairs, before preprocessing."""

    volumes: list[tuple[Volume, np.ndarray, str, str]]  # (image, label array, image name, segmentation name)
    fingerprint: str  # of every voxel: a resumed run must train on the same data
    class_names: dict[int, str]  # found beside the segmentation files (<name>.labels.json); the first file's win
    records: list[dict[str, dict]] = field(default_factory=list)  # per pair {"image", "segmentation"}: `describe_item`

    @property
    def label_values(self) -> set[int]:
        return set().union(*(set(np.unique(labels).tolist()) for _, labels, _, _ in self.volumes))


def start_encoder(model: str | os.PathLike | None, cfg: FinetuneConfig) -> StartEncoder:
    """The pretrained encoder named by `model` (a folder or a shipped name), or a new one for None / SCRATCH."""
    if model is None or str(model) == SCRATCH:
        enc_cfg = cfg.scratch_config
        if isinstance(enc_cfg, str):
            enc_cfg = ViT3DConfig.preset(enc_cfg)
        torch.manual_seed(cfg.seed)
        return StartEncoder(ViT3D(enc_cfg), None, SCRATCH)
    if cfg.ct_window is not None:
        raise Ar3dInputError(f"ct_window {cfg.ct_window} is for a new encoder; {model} keeps the input "
                             "window it was pretrained with")
    path = resolve_model(model)
    checkpoint = load_checkpoint(path)
    return StartEncoder(build_encoder(checkpoint), checkpoint.typed_config, model_record(model, checkpoint.path))


def window_size(encoder: ViT3D, cfg: FinetuneConfig) -> tuple[int, int, int]:
    """The training (and inference) window: `cfg.window` or WINDOW_PATCHES patches along each axis."""
    p = encoder.cfg.patch_size
    window = cfg.window or WINDOW_PATCHES * p
    if window % p:
        raise Ar3dInputError(f"the window size {window} is not a multiple of the encoder's patch size {p}")
    return (window, window, window)


def read_pairs(pairs: Sequence[TrainPair], progress: ProgressFn = None, should_stop: StopFn = None) -> TrainingScans:
    """Read every (image, segmentation) pair and check it, before anything is preprocessed."""
    if not pairs:
        raise Ar3dInputError("fine-tuning needs at least one (image, segmentation) pair")
    volumes, records = [], []
    names: dict[int, str] = {}
    contents = hashlib.blake2b(digest_size=16)
    for n, (image_item, seg_item) in enumerate(pairs):
        check_stop(should_stop)
        image, seg = load_item(image_item, "image"), load_item(seg_item, "segmentation")
        image_name, seg_name = item_name(image, f"image {n}"), item_name(seg, f"segmentation {n}")
        check_image(image.array, image_name)
        labels = check_pair(image, seg, image_name, seg_name)
        volumes.append((image, labels, image_name, seg_name))
        records.append({"image": describe_item(image_item, image_name),
                        "segmentation": describe_item(seg_item, seg_name)})
        if not isinstance(seg_item, Volume):
            names = {**read_label_names(seg_item), **names}
        _fingerprint(contents, image.array)
        _fingerprint(contents, labels)
        report(progress, n + 1, len(pairs), "reading scans")
    return TrainingScans(volumes, contents.hexdigest(), names, records)


def describe_item(item: ImageLike, name: str) -> dict[str, str]:
    """A training file by its name and sha256; a volume given in memory (a napari layer) by its name only
    (`TrainingScans.fingerprint` covers its voxels)."""
    return {"name": file_name(name)} if isinstance(item, Volume) else describe_file(item)


def _fingerprint(digest, array: np.ndarray) -> None:
    """Add an array's shape, type and bytes to a hashlib digest."""
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).data)


def choose_preprocessing(
    start: StartEncoder, scans: TrainingScans, cfg: FinetuneConfig, modality: str | None
) -> tuple[PreprocessConfig, str]:
    """The model's preprocessing and the modality name of the training images ("CT", "MRI" or "any").

    A pretrained encoder keeps its spacing and intensity normalisation. Otherwise the images'
    modality decides: a new encoder on CT reads the soft-tissue window (or `cfg.ct_window`).
    """
    saved = start.config.preprocessing if start.config is not None else PreprocessConfig(MODEL_SPACING)
    spacing = cfg.spacing or saved.spacing
    kinds = {guess_modality(image.array, modality or image.meta.get("modality")) for image, _, _, _ in scans.volumes}
    found = modality_name(kinds)
    trained_on = start.config.modality if start.config is not None else MODALITY_ANY
    if trained_on != MODALITY_ANY and found not in (trained_on, MODALITY_ANY):
        warnings.warn(f"the encoder was pretrained on {trained_on} but the training images look like {found}",
                      stacklevel=3)
    intensity = saved.intensity
    if intensity is None and len(kinds) == 1:
        (kind,) = kinds
        intensity = IntensityConfig(kind)
        if kind == "ct" and start.source == SCRATCH:  # a new encoder: the window where organs differ
            intensity = IntensityConfig("ct", window=cfg.ct_window or CT_SOFT_TISSUE_HU)
    return PreprocessConfig(spacing=spacing, intensity=intensity), found


def modality_name(kinds: set[str]) -> str:
    """"CT" or "MRI" for images of one intensity kind, else "any"."""
    return {frozenset({"ct"}): "CT", frozenset({"mri"}): "MRI"}.get(frozenset(kinds), MODALITY_ANY)


def preprocess_scans(
    scans: TrainingScans, cmap: ClassMap, pre_cfg: PreprocessConfig, window: Sequence[int], modality: str | None,
    progress: ProgressFn = None, should_stop: StopFn = None,
) -> list[PreparedScan]:
    """Every training scan on the model grid, its target in class numbers, padded to a window."""
    prepared = []
    for n, (image, labels, image_name, seg_name) in enumerate(scans.volumes):
        check_stop(should_stop)
        target = cmap.lut(int(labels.max()))[labels]
        pre = preprocess_volume(image, pre_cfg, modality=modality, labels=target, source=image_name)
        prepared.append(prepare_scan(pre.array, pre.labels, window, Path(image_name).name, seg_name))
        report(progress, n + 1, len(scans.volumes), "preprocessing scans")
    return prepared


def checkpoint_config(
    model: SegmentationModel, window: Sequence[int], pre_cfg: PreprocessConfig, modality: str, cmap: ClassMap,
    start: StartEncoder, scans: TrainingScans, cfg: FinetuneConfig, provenance: dict | None,
) -> CheckpointConfig:
    """config.json of the segmentation model: architecture, decoder, preprocessing, classes, provenance."""
    encoder_provenance = start.config.provenance.to_json() if start.config is not None else {}
    encoder_provenance.pop("train", None)
    return CheckpointConfig(
        encoder=model.encoder.cfg,
        heads=HeadsConfig(segmentation=SegmentationHeadConfig(dict(model.decoder.config), tuple(window))),
        objective="segmentation",
        preprocessing=pre_cfg,
        modality=modality,
        classes=list(cmap.classes),
        provenance=Provenance.from_json({
            **(provenance or {}),
            "encoder": start.source,
            "encoder_provenance": encoder_provenance,
            "data": scans.records,
            "data_fingerprint": scans.fingerprint,
            "mode": cfg.mode,
            "annotation": cfg.annotation,
            "label_map": cmap.to_dict(),
            "finetune": {k: v for k, v in asdict(cfg).items() if k not in ("scratch_config",)},
        }, "provenance"),
    )


def training_data(
    objective: SegmentationObjective, crops: CropDataset, n_scans: int, cfg: FinetuneConfig,
    progress: ProgressFn = None, should_stop: StopFn = None,
) -> tuple[Dataset, list[dict]]:
    """What each step trains on, and the optimizer groups.

    Head mode: the frozen encoder's features of `crops_per_scan` crops per scan, computed once.
    Full mode: fresh crops every step, and layer-wise lr decay.
    """
    if cfg.mode == "head":
        items = cache_features(objective.encoder, crops, cfg.crops_per_scan * n_scans, resolve_device(cfg.device),
                               blocks=cfg.blocks, progress=progress, should_stop=should_stop)
        return CachedFeatureDataset(items, cfg.seed, cfg.points), default_param_groups(objective, cfg.weight_decay)
    return crops, layer_decay_groups(objective, cfg.peak_lr, cfg.weight_decay, cfg.layer_decay)


def train_config(cfg: FinetuneConfig) -> TrainConfig:
    """The training loop's settings for a fine-tune."""
    steps = cfg.total_steps
    return TrainConfig(
        steps=steps, batch_size=cfg.batch_size, lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
        warmup_steps=max(1, steps // 20), ckpt_every=cfg.ckpt_every, log_every=10, seed=cfg.seed, amp=cfg.amp,
        device=cfg.device,
    )


def publish(work: Path, out: Path, model: SegmentationModel, result: TrainResult, dice: float,
            timing_s: dict[str, float]) -> None:
    """Write the final model (metrics, timing, no train state) in `work` and rename it to `out`."""
    final = load_config(work)
    final.provenance.metrics = {"loss": result.loss, "dice": dice}
    final.provenance.cancelled = result.cancelled
    final.provenance.timing_s = {k: round(v, 2) for k, v in timing_s.items()}
    save_checkpoint(work, model.state_dict(), final)  # drops the train state
    if out.is_dir():
        out.rmdir()  # empty (checked before training)
    os.rename(work, out)


def check_new_model_folder(out: Path) -> None:
    """Refuse an output folder that is a file, holds a checkpoint or is not empty: a model goes into a new folder."""
    if out.exists() and not out.is_dir():
        raise Ar3dInputError("the output must be a folder, and this is a file", out)
    if has_checkpoint(out):
        raise Ar3dInputError("already holds a checkpoint; choose another output folder", out)
    if out.is_dir() and any(out.iterdir()):
        raise Ar3dInputError("the output folder is not empty; choose a new or empty folder", out)


def _finished_result(out: Path, work: Path, t_start: float) -> FinetuneResult:
    """Publish a run whose final model was complete when it was killed (before its last rename)."""
    if out.is_dir():
        out.rmdir()  # empty (checked above)
    os.rename(work, out)
    config = load_config(out)
    prov = config.provenance
    metrics, timing = prov.metrics or {}, prov.timing_s or {}
    return FinetuneResult(
        checkpoint=out, classes=list(config.classes), steps=int(prov.steps or 0),
        loss=float(metrics.get("loss", "nan")), dice=float(metrics.get("dice", "nan")),
        cancelled=bool(prov.cancelled), prepare_s=float(timing.get("prepare", 0.0)),
        cache_s=float(timing.get("cache", 0.0)), train_s=float(timing.get("train", 0.0)),
        wall_s=time.perf_counter() - t_start,
    )


# ----------------------------------------------------------------------------- the entry point


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
    class_names: label value -> name; names the classes in config.json. Default: the names beside the
        segmentation files (`<name>.labels.json`), else "label_<value>".
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
    check_new_model_folder(out)
    check_work_folder(work, resume)
    resuming = resume and has_checkpoint(work)
    if resuming and load_train_state(work) is None:  # killed after the final save, before the rename
        return _finished_result(out, work, t_start)

    start = start_encoder(model, cfg)
    window = window_size(start.encoder, cfg)
    scans = read_pairs(pairs, progress, should_stop)
    cmap = class_map(scans.label_values, {**scans.class_names, **(class_names or {})}, cfg)
    pre_cfg, found_modality = choose_preprocessing(start, scans, cfg, modality)
    prepared = preprocess_scans(scans, cmap, pre_cfg, window, modality, progress, should_stop)
    prepare_s = time.perf_counter() - t_start

    torch.manual_seed(cfg.seed)
    kind = "light" if cfg.mode == "head" else "unetr"
    options = {"blocks": cfg.blocks} if cfg.blocks and kind == "light" else {}
    seg_model = SegmentationModel(start.encoder, build_decoder(kind, start.encoder.cfg, len(cmap.classes) + 1, **options))
    objective = SegmentationObjective(seg_model, frozen_encoder=cfg.mode == "head")
    config = checkpoint_config(seg_model, window, pre_cfg, found_modality, cmap, start, scans, cfg, provenance)
    if resuming:
        check_finetune_resume(work, config)
        # The interrupted run's encoder (the same unless its source changed): head mode caches the same features.
        load_into(start.encoder, load_checkpoint(work), prefix="encoder.")
    elif work.exists():
        shutil.rmtree(work)  # a run killed before its first checkpoint
    del scans

    t_cache = time.perf_counter()
    crops = CropDataset(prepared, window, cfg, cfg.seed)
    dataset, groups = training_data(objective, crops, len(prepared), cfg, progress, should_stop)
    cache_s = time.perf_counter() - t_cache

    def on_progress(p: Progress) -> None:
        report(progress, p.step, p.total, "training", **p.metrics, dice=objective.last_dice)

    try:
        result = train(objective, dataset, train_config(cfg), work, checkpoint_config=config.to_json(),
                       param_groups=groups, resume=resuming, progress=on_progress, should_stop=should_stop)
        publish(work, out, seg_model, result, objective.last_dice,
                {"prepare": prepare_s, "cache": cache_s, "train": result.wall_time_s})
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
