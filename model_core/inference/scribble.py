"""Live scribble segmentation: a few painted strokes train the light decoder on cached encoder features.

`ScribbleSession(volume, model)` preprocesses the image once (the encoder's spacing and
intensities, RAS axes) and pads it to whole patches; the frozen encoder runs once over windows
that overlap by a third (a volume smaller than a window is padded for the encoder only), and each
token takes the mean of the windows that saw it, weighted by how far inside each it lies, so the
token field of the whole volume has no seams. The padded image and that field (4 levels of tokens,
`light_features`) are all a session keeps; they are cached on disk
(`model_core.inference.feature_cache`), so a second session on the same image and encoder skips
the encoder.

`update(scribbles, background)` reads a label map on the image's grid: 0 unpainted, `background`
the painted background, every other value a class. It trains a `LightDecoder` (warm-started from
the previous update) on painted voxels only: each step decodes the painted voxels of one crop
around a random painted voxel (the token part of the decoder sees the whole volume, its
mid-resolution branch the crop), so a step costs the same on any volume. It then predicts first
`region` (e.g. the slice on screen, as index slices on the image grid), then the whole volume.
Results are on the image's grid: each voxel holds the painted value of its class (0 background)
and an uncertainty in [0, 1] (the normalised entropy of the class probabilities). `save_model`
writes the encoder and the trained decoder as a segmentation checkpoint for `ar3d segment` and the
Segment widget.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model_core.checkpoint.store import build_encoder, load_checkpoint, make_config, resolve_model, save_checkpoint
from model_core.data.preprocess import (
    IntensityConfig,
    PreprocessConfig,
    Preprocessed,
    preprocess_volume,
    resample_to_grid,
)
from model_core.device import resolve_device
from model_core.errors import Ar3dInputError
from model_core.inference import feature_cache
from model_core.inference.segment import to_source_grid
from model_core.io.volume import Volume, check_image, check_labels, read_volume
from model_core.models.segmentation import (
    LIGHT_LEVELS,
    LightDecoder,
    SegmentationModel,
    build_decoder,
    feature_blocks,
    light_features,
)
from model_core.models.vit import ViT3D
from model_core.progress import ProgressFn, StopFn, check_stop, report
from model_core.training.finetune import check_new_model_folder, modality_name
from model_core.vocabulary import DEFAULT_ENCODER, IGNORE, MODEL_SPACING, WINDOW_PATCHES

Region = Sequence[slice | int]  # index slices (or single indices) along the image's three axes
FEATURE_VERSION = 1  # bump when the cached arrays change meaning
CACHED = ("image", "features", "affine", "modality")


@dataclass
class ScribbleSettings:
    """How a session trains the decoder; the defaults are what the CLI and the widget use."""

    steps_first: int = 150  # optimizer steps of the first update (a new decoder)
    steps_warm: int = 50  # steps of every later update (warm start)
    points: int = 4096  # painted voxels decoded per step
    crop: int = 64  # edge in voxels of the crop a step decodes (a multiple of the patch size)
    lr: float = 3e-3  # of the first update
    lr_warm: float = 1e-3  # of later updates
    weight_decay: float = 0.01
    balance: bool = True  # weight each class by the inverse of its share of the painted voxels
    decoder: dict = field(default_factory=lambda: {"hidden": 32, "refine": 16, "mid": 8})  # LightDecoder options
    chunk: int = 2**18  # voxels decoded per batch when predicting


@dataclass
class ScribbleResult:
    """A prediction on the image's grid, or on the part of it `region` names."""

    labels: np.ndarray  # (I, J, K) or the region's shape: the painted value of each voxel's class, 0 background
    uncertainty: np.ndarray  # same shape, float32 in [0, 1]: normalised entropy
    classes: list[int]  # painted values of the classes, in the decoder's order
    region: tuple[slice, slice, slice]  # where `labels` lies on the image's grid
    probabilities: np.ndarray | None = None  # (K+1, ...) float32: background, then `classes`
    timings: dict[str, float] = field(default_factory=dict)  # seconds


@dataclass
class _Training:
    """The decoder a session trains (kept across updates: the warm start)."""

    decoder: LightDecoder
    classes: list[int]
    steps: int = 0
    loss: float = float("nan")


class ScribbleSession:
    """An image, its cached encoder features, and a light decoder trained on the user's strokes."""

    def __init__(
        self,
        volume: Volume | str | os.PathLike,
        model: str | os.PathLike | ViT3D = DEFAULT_ENCODER,
        *,
        preprocessing: PreprocessConfig | None = None,
        modality: str | None = None,
        settings: ScribbleSettings | None = None,
        device: str | torch.device = "auto",
        seed: int = 0,
        cache: bool = True,
        progress: ProgressFn = None,
        should_stop: StopFn = None,
    ):
        """volume: the image (a `Volume` or a file). model: an encoder's folder or shipped name, or a `ViT3D`
        (then `preprocessing` gives its input convention; default 1.5 mm and per-modality intensities).
        modality: a hint ("CT", "MRI") for the intensity normalisation. cache: read and write the disk cache.
        progress / should_stop: for computing the features (polled between batches of windows)."""
        self.volume = volume if isinstance(volume, Volume) else read_volume(volume)
        self.source = self.volume.path or "the image"
        check_image(self.volume.array, self.source)
        self.settings = settings or ScribbleSettings()
        self.device = resolve_device(device)
        self.seed = seed
        self.encoder, self.encoder_config, self.encoder_source = _load_encoder(model)
        self.preprocessing = preprocessing or PreprocessConfig.from_dict(
            self.encoder_config.get("preprocessing") or {"spacing": MODEL_SPACING})
        self.window = WINDOW_PATCHES * self.encoder.cfg.patch_size
        self.modality_hint = modality or self.volume.meta.get("modality")
        self.cache_hit = False
        t = time.perf_counter()
        cached = self._features(cache, progress, should_stop)
        self.features_s = time.perf_counter() - t
        self.image = torch.from_numpy(cached["image"])[None, None].to(self.device)  # (1, 1, X, Y, Z)
        self.features = torch.from_numpy(cached["features"]).float()[None].to(self.device)  # (1, 4C, gx, gy, gz)
        self.affine = cached["affine"]  # (4, 4) of the padded model grid
        self.modality = str(cached["modality"])  # "ct" | "mri"
        self.training: _Training | None = None
        self.inputs: torch.Tensor | None = None  # the decoder's token-resolution input, once a decoder exists

    # ------------------------------------------------------------------ features

    def _features(self, cache: bool, progress: ProgressFn, should_stop: StopFn) -> dict[str, np.ndarray]:
        """The padded model-grid image and its token field: from the disk cache, else computed (and cached)."""
        key = feature_cache.entry_key(
            image=feature_cache.volume_digest(self.volume.array, self.volume.affine),
            encoder=feature_cache.encoder_digest(self.encoder, self.encoder.cfg.to_dict()),
            preprocessing=self.preprocessing.to_dict(), modality=str(self.modality_hint), window=self.window,
            version=FEATURE_VERSION,
        )
        if cache:
            found = feature_cache.load_entry(key, CACHED)
            if found is not None and _consistent(found, self.encoder):
                self.cache_hit = True
                return found
        computed = self._compute_features(progress, should_stop)
        if cache:
            feature_cache.save_entry(key, computed)
        return computed

    def _compute_features(self, progress: ProgressFn, should_stop: StopFn) -> dict[str, np.ndarray]:
        pre = preprocess_volume(self.volume, self.preprocessing, modality=self.modality_hint, source=self.source)
        p = self.encoder.cfg.patch_size
        image = np.pad(pre.array, [(0, -n % p) for n in pre.array.shape])  # whole patches; voxel 0 stays
        features = token_field(self.encoder, image, self.window // p, self.device, progress, should_stop)
        return {"image": image.astype(np.float32), "features": features, "affine": pre.affine,
                "modality": np.array(pre.modality)}

    # ------------------------------------------------------------------ training

    def update(
        self,
        scribbles: Volume | np.ndarray,
        background: int = 1,
        region: Region | None = None,
        progress: ProgressFn = None,
        should_stop: StopFn = None,
        *,
        probabilities: bool = False,
        on_region: Callable[[ScribbleResult], None] | None = None,
    ) -> ScribbleResult:
        """Train on the painted voxels, predict `region` (passed to `on_region`), then the volume.

        progress: "training" (with the loss), then "predicting". should_stop: polled between steps
        and batches; raises `Cancelled` (the decoder keeps the steps it took).
        """
        t = time.perf_counter()
        self.train(scribbles, background, progress, should_stop)
        train_s = time.perf_counter() - t
        if region is not None:
            part = self.predict(region, probabilities=probabilities, progress=progress, should_stop=should_stop)
            if on_region is not None:
                on_region(part)
        result = self.predict(None, probabilities=probabilities, progress=progress, should_stop=should_stop)
        result.timings["train"] = train_s
        return result

    def train(self, scribbles: Volume | np.ndarray, background: int = 1, progress: ProgressFn = None,
              should_stop: StopFn = None) -> float:
        """Train the decoder on the painted voxels (see `update`); returns the last loss."""
        classes, target = self.targets(scribbles, background)
        first = self._prepare_decoder(classes)
        steps = self.settings.steps_first if first else self.settings.steps_warm
        xyz = np.stack(np.nonzero(target != IGNORE), axis=1)  # (n, 3) painted voxels of the padded model grid
        labels = torch.from_numpy(target[tuple(xyz.T)].astype(np.int64))
        weight = None
        if self.settings.balance:  # strokes are as long as the user draws them, not as large as the classes
            counts = torch.bincount(labels, minlength=len(classes) + 1).float()
            weight = (counts.sum() / (len(counts) * counts.clamp_min(1))).to(self.device)
        rng = np.random.default_rng((self.seed, self.training.steps))
        decoder = self.training.decoder.train()
        # A new optimizer each update: Adam's second moments, tiny once the last strokes were fitted, would
        # turn the new strokes' gradients into outsized first steps.
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=self.settings.lr if first else self.settings.lr_warm,
                                      weight_decay=self.settings.weight_decay)
        for step in range(steps):
            check_stop(should_stop)
            box, points, picked = self._crop_points(xyz, rng)
            field_ = decoder.field(self.image, inputs=self.inputs, box=box)
            logits = decoder.forward_points(self.image[(..., *box)], None, points[None].to(self.device), field=field_)
            loss = F.cross_entropy(logits, labels[picked][None].to(self.device), weight=weight)  # logits (1, K+1, N)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.training.steps += 1
            self.training.loss = float(loss.detach())
            report(progress, step + 1, steps, "training", loss=self.training.loss)
        decoder.eval()
        return self.training.loss

    def _crop_points(self, xyz: np.ndarray, rng: np.random.Generator) -> tuple[tuple[slice, ...], torch.Tensor, np.ndarray]:
        """A crop around a random painted voxel, and `points` painted voxels inside it, away from its cut sides
        (where the decoder's field would differ from the whole volume's): (box, flat indices into the crop,
        indices into `xyz`)."""
        grid = np.array(self.image.shape[2:])
        s, margin = self.training.decoder.stride, _margin(self.training.decoder)
        edge = np.minimum(grid, max(self.settings.crop, -(-(4 * margin) // s) * s))
        start = np.clip(xyz[rng.integers(len(xyz))] - edge // 2, 0, grid - edge) // s * s
        low = np.where(start > 0, start + margin, 0)
        high = np.where(start + edge < grid, start + edge - margin, grid)
        inside = np.flatnonzero(np.all((xyz >= low) & (xyz < high), axis=1))
        picked = inside[rng.integers(len(inside), size=self.settings.points)]
        flat = np.ravel_multi_index(tuple((xyz[picked] - start).T), tuple(edge))
        box = tuple(slice(int(a), int(a + e)) for a, e in zip(start, edge))
        return box, torch.from_numpy(flat.astype(np.int64)), picked

    def targets(self, scribbles: Volume | np.ndarray, background: int) -> tuple[list[int], np.ndarray]:
        """The class values and the training target on the padded model grid (X, Y, Z) uint8:
        0 background, k for classes[k-1], IGNORE unpainted. Raises `Ar3dInputError` for bad strokes."""
        labels, classes = check_scribbles(scribbles, self.volume, background)
        lut = np.full(int(labels.max()) + 1, IGNORE, dtype=np.uint8)
        lut[background] = 0
        lut[classes] = np.arange(1, len(classes) + 1)
        on_image = lut[labels]  # (I, J, K)
        shape = tuple(self.image.shape[2:])
        target = resample_to_grid(on_image, self.volume.affine, shape, self.affine, order=0, cval=IGNORE)
        _add_thin_strokes(target, on_image, self.volume.affine, self.affine)
        return classes, target

    def _prepare_decoder(self, classes: list[int]) -> bool:
        """A decoder for these classes: the previous one (warm start), or a new one (first update, or the
        classes changed: then every weight but the output layer's is kept). True when it is new."""
        if self.training is not None and self.training.classes == classes:
            return False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            decoder = build_decoder("light", self.encoder.cfg, len(classes) + 1, **self.settings.decoder)
        if self.training is not None:
            old = self.training.decoder.state_dict()
            new = decoder.state_dict()
            decoder.load_state_dict({k: old[k] if old[k].shape == v.shape else v for k, v in new.items()})
        decoder.to(self.device)
        if self.inputs is None:
            with torch.no_grad():
                self.inputs = decoder.token_inputs(self.image, self.features)  # (1, 4C + 2, gx, gy, gz)
        steps = self.training.steps if self.training is not None else 0
        self.training = _Training(decoder, list(classes), steps)
        return True

    # ------------------------------------------------------------------ prediction

    def predict(self, region: Region | None = None, *, probabilities: bool = False, progress: ProgressFn = None,
                should_stop: StopFn = None) -> ScribbleResult:
        """Labels and uncertainty of `region` of the image (None: all of it) from the decoder trained so far."""
        if self.training is None:
            raise Ar3dInputError("nothing is trained yet: call update() with scribbles first")
        t = time.perf_counter()
        where = _region_slices(region, self.volume.shape)
        box = _model_box(where, self.volume.affine, self.affine, tuple(self.image.shape[2:]))
        probs = self._box_probabilities(box, progress, should_stop)  # (K+1, bx, by, bz)
        decode_s = time.perf_counter() - t
        t = time.perf_counter()
        box_affine = self.affine.copy()
        box_affine[:3, 3] += self.affine[:3, :3] @ [s.start for s in box]
        region_affine = self.volume.affine.copy()
        region_affine[:3, 3] += self.volume.affine[:3, :3] @ [s.start for s in where]
        shape = tuple(s.stop - s.start for s in where)
        grid = Preprocessed(None, box_affine, self.modality, None, shape, region_affine)
        index, uncertainty, full = to_source_grid(probs, grid, probabilities, should_stop)
        classes = self.training.classes
        values = np.array([0, *classes], dtype=np.uint8 if max(classes) < 256 else np.uint16)
        return ScribbleResult(values[index], uncertainty, list(classes), where, full,
                              {"decode": decode_s, "resample": time.perf_counter() - t})

    def _box_probabilities(self, box: tuple[slice, slice, slice], progress: ProgressFn,
                           should_stop: StopFn) -> np.ndarray:
        """Softmax probabilities (K+1, bx, by, bz) float32 of a box of the padded model grid.

        The decoder's field is computed on the box grown by its margin of influence, so the box's
        voxels are decoded as in the whole volume.
        """
        decoder = self.training.decoder
        grid, s = np.array(self.image.shape[2:]), decoder.stride
        low = np.array([b.start for b in box])
        high = np.array([b.stop for b in box])
        margin = _margin(decoder)
        outer_low = np.maximum(0, low - margin) // s * s
        outer_high = np.minimum(grid, -(-(high + margin) // s) * s)
        outer = tuple(slice(int(a), int(b)) for a, b in zip(outer_low, outer_high))
        size = outer_high - outer_low
        bx, by, bz = high - low
        yz = (torch.arange(low[1], high[1]) - outer_low[1])[:, None] * size[2] + torch.arange(low[2], high[2]) - outer_low[2]
        rows = max(1, self.settings.chunk // int(by * bz))
        out = np.empty((decoder.config["num_classes"], bx, by, bz), dtype=np.float32)
        with torch.inference_mode():
            crop = self.image[(..., *outer)]
            field_ = decoder.field(self.image, inputs=self.inputs, box=outer)
            for i0 in range(0, bx, rows):
                check_stop(should_stop)
                x = torch.arange(low[0] + i0, low[0] + min(bx, i0 + rows)) - outer_low[0]
                points = (x[:, None] * int(size[1] * size[2]) + yz.reshape(-1)).reshape(1, -1).to(self.device)
                logits = decoder.forward_points(crop, None, points, field=field_)  # (1, K+1, n)
                out[:, i0 : i0 + len(x)] = torch.softmax(logits[0].float(), 0).reshape(-1, len(x), by, bz).cpu().numpy()
                report(progress, min(bx, i0 + rows), bx, "predicting")
        return out

    # ------------------------------------------------------------------ saving

    def save_model(self, out: str | os.PathLike, class_names: dict[int, str] | None = None,
                   provenance: dict | None = None) -> Path:
        """Write the encoder and the trained decoder as a segmentation checkpoint folder (new or empty).

        class_names: painted value -> name (default "label_<value>"). Label value k of the model's
        output is the k-th class in the order of the painted values.
        """
        if self.training is None:
            raise Ar3dInputError("nothing is trained yet: update the session with scribbles before saving a model")
        out = Path(out)
        check_new_model_folder(out)
        names = {**{v: f"label_{v}" for v in self.training.classes}, **(class_names or {})}
        decoder = self.training.decoder.to("cpu")
        model = SegmentationModel(self.encoder.to("cpu"), decoder)
        intensity = self.preprocessing.intensity or IntensityConfig(self.modality)
        config = make_config(
            self.encoder.cfg.to_dict(), objective="segmentation",
            heads={"segmentation": {"decoder": decoder.config, "window": [self.window] * 3}},
            preprocessing=PreprocessConfig(self.preprocessing.spacing, intensity).to_dict(),
            modality=modality_name({self.modality}), classes=[names[v] for v in self.training.classes],
            provenance={**(provenance or {}), "encoder": self.encoder_source, "annotation": "sparse",
                        "scribble": {"image": str(self.source), "painted_values": self.training.classes,
                                     "steps": self.training.steps, "loss": self.training.loss, "seed": self.seed}},
        )
        try:
            return save_checkpoint(out, model.state_dict(), config)
        finally:
            decoder.to(self.device)


# ---------------------------------------------------------------------- helpers


def _load_encoder(model: str | os.PathLike | ViT3D) -> tuple[ViT3D, dict, str]:
    """(encoder in eval mode, its checkpoint's config ({} for a `ViT3D`), where it came from)."""
    if isinstance(model, ViT3D):
        return model.eval(), {}, "in-memory encoder"
    path = resolve_model(model)
    checkpoint = load_checkpoint(path)
    source = str(model) if str(model) == DEFAULT_ENCODER else str(path)
    return build_encoder(checkpoint).eval(), checkpoint.config, source


def _consistent(found: dict[str, np.ndarray], encoder: ViT3D) -> bool:
    """A cache entry's arrays fit together and fit the encoder (a stale layout is recomputed)."""
    image, features, p = found["image"], found["features"], encoder.cfg.patch_size
    return (image.ndim == 3 and features.ndim == 4 and found["affine"].shape == (4, 4)
            and features.shape[0] == len(feature_blocks(encoder.cfg.depth, LIGHT_LEVELS)) * encoder.cfg.width
            and tuple(s * p for s in features.shape[1:]) == image.shape
            and bool(np.isfinite(image).all() and np.isfinite(features).all()))


def _margin(decoder: LightDecoder) -> int:
    """Voxels from a crop's cut side within which the decoder's output differs from the whole volume's: the
    mid-resolution convolutions reach two field voxels, the image convolution one voxel."""
    return (2 * decoder.stride if decoder.config["mid"] else 0) + 1


def _starts(grid: int, window: int) -> list[int]:
    """Window starts (in patches) along one axis: a stride of two thirds of a window, the last one at the end."""
    stride = max(1, (2 * window) // 3)
    starts = list(range(0, grid - window + 1, stride))
    return starts if starts[-1] == grid - window else starts + [grid - window]


def token_field(encoder: ViT3D, image: np.ndarray, window: int, device: torch.device,
                progress: ProgressFn = None, should_stop: StopFn = None, batch_size: int = 4) -> np.ndarray:
    """`light_features` of an image (X, Y, Z) of whole patches on its whole patch grid: (4C, gx, gy, gz) float16.

    Windows of `window` patches overlap; each token is the mean of the windows that saw it, weighted
    by how far inside each window it lies (1 at a window's face, window/2 at its centre). Along an
    axis shorter than a window, the image is padded with zeros for the encoder.
    """
    p = encoder.cfg.patch_size
    grid = [n // p for n in image.shape]
    x = torch.from_numpy(np.pad(image, [(0, max(0, window - g) * p) for g in grid]))
    big = [max(g, window) for g in grid]
    corners = [(a, b, c) for a in _starts(big[0], window) for b in _starts(big[1], window)
               for c in _starts(big[2], window)]
    ramp = torch.minimum(torch.arange(1, window + 1), torch.arange(window, 0, -1)).float()
    weight = ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]  # (w, w, w)
    total, norm = None, torch.zeros(big)
    encoder = encoder.to(device).eval()
    with torch.inference_mode():
        for first in range(0, len(corners), batch_size):
            check_stop(should_stop)
            batch = corners[first : first + batch_size]
            crops = torch.stack([x[a * p : (a + window) * p, b * p : (b + window) * p, c * p : (c + window) * p]
                                 for a, b, c in batch])[:, None].to(device)  # (b, 1, W, W, W)
            features = light_features(encoder, crops).float().cpu()  # (b, 4C, w, w, w)
            if total is None:
                total = torch.zeros(features.shape[1], *big)
            for (a, b, c), f in zip(batch, features):
                total[:, a : a + window, b : b + window, c : c + window] += f * weight
                norm[a : a + window, b : b + window, c : c + window] += weight
            report(progress, min(len(corners), first + batch_size), len(corners), "computing encoder features")
    encoder.to("cpu")
    return (total / norm)[:, : grid[0], : grid[1], : grid[2]].to(torch.float16).numpy()


def check_scribbles(scribbles: Volume | np.ndarray, image: Volume, background: int) -> tuple[np.ndarray, list[int]]:
    """The scribble label map (I, J, K) and its class values, after checking it against the image."""
    source = getattr(scribbles, "path", None) or "the scribbles"
    array = np.asarray(scribbles.array if isinstance(scribbles, Volume) else scribbles)
    if array.ndim != 3:
        raise Ar3dInputError(f"the scribble map is {array.ndim}D (shape {array.shape}); it must be a 3D label map "
                             f"on the image's grid {image.shape}", source)
    if array.shape != image.shape or (
            isinstance(scribbles, Volume) and not np.allclose(scribbles.affine, image.affine, atol=1e-3)):
        raise Ar3dInputError(f"the scribbles (shape {array.shape}) are not on the image's voxel grid (shape "
                             f"{image.shape}, same affine); paint them on the image's grid", source)
    labels = check_labels(array, source)
    if isinstance(background, bool) or not isinstance(background, (int, np.integer)) or background < 1:
        raise Ar3dInputError(f"the background value must be a painted label value of at least 1, got {background!r}")
    painted = [int(v) for v in np.unique(labels) if v]
    if not painted:
        raise Ar3dInputError("no stroke is painted (every voxel is 0); paint some object and some background", source)
    classes = [v for v in painted if v != background]
    if not classes:
        raise Ar3dInputError(f"no object stroke: the scribbles hold only the background value {background}; "
                             "paint the object with another value", source)
    if len(classes) >= IGNORE:
        raise Ar3dInputError(f"the scribbles hold {len(classes)} classes; at most {IGNORE - 1} are supported", source)
    if background not in painted:
        if len(painted) == 1:
            raise Ar3dInputError(f"no background stroke: the scribbles hold only value {painted[0]}; paint some "
                                 f"background with value {background}", source)
        raise Ar3dInputError(f"the background value {background} is not painted (painted values: "
                             f"{', '.join(map(str, painted))}); choose one of them as background", source)
    return labels, classes


def _add_thin_strokes(target: np.ndarray, on_image: np.ndarray, image_affine: np.ndarray,
                      model_affine: np.ndarray) -> None:
    """Mark the model voxel nearest to every painted image voxel that resampling left unpainted (in place):
    a one-voxel stroke on a finer grid than the model's would otherwise fall between model voxels."""
    ijk = np.stack(np.nonzero(on_image != IGNORE))  # (3, n)
    if not ijk.shape[1]:
        return
    to_model = np.linalg.inv(model_affine) @ image_affine
    xyz = np.rint(to_model[:3, :3] @ ijk + to_model[:3, 3:]).astype(np.int64)  # (3, n)
    inside = np.all((xyz >= 0) & (xyz < np.array(target.shape)[:, None]), axis=0)
    xyz, values = xyz[:, inside], on_image[tuple(ijk[:, inside])]
    free = target[tuple(xyz)] == IGNORE
    target[tuple(xyz[:, free])] = values[free]


def _region_slices(region: Region | None, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """`region` as three non-empty step-1 slices within `shape` (None: the whole grid)."""
    if region is None:
        return tuple(slice(0, n) for n in shape)
    if len(region) != 3:
        raise Ar3dInputError(f"a region has one index or slice per image axis (3), got {len(region)}")
    out = []
    for r, n in zip(region, shape):
        if isinstance(r, (int, np.integer)):
            if not -n <= r < n:
                raise Ar3dInputError(f"region {region}: index {r} is outside an image of shape {shape}")
            r = slice(int(r) % n, int(r) % n + 1)
        start, stop, step = r.indices(n)
        if step != 1 or stop <= start:
            raise Ar3dInputError(f"region {region} is empty or strided on an image of shape {shape}")
        out.append(slice(start, stop))
    return tuple(out)


def _model_box(where: tuple[slice, ...], image_affine: np.ndarray, model_affine: np.ndarray,
               shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The box of the model grid (one voxel of margin) that covers the image voxels `where`."""
    corners = np.array([[s.start - 0.5 if bit == 0 else s.stop - 0.5 for s, bit in zip(where, bits)]
                        for bits in np.ndindex(2, 2, 2)]).T  # (3, 8) image voxel coordinates
    to_model = np.linalg.inv(model_affine) @ image_affine
    xyz = to_model[:3, :3] @ corners + to_model[:3, 3:]  # (3, 8)
    low = np.clip(np.floor(xyz.min(1)).astype(int) - 1, 0, np.array(shape) - 1)
    high = np.clip(np.ceil(xyz.max(1)).astype(int) + 2, low + 1, np.array(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))
