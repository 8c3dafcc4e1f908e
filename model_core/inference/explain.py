"""What an autoregressive encoder attends to and what it expects: attention, next-token prediction,
surprise and PCA features, each as a map on the input's own voxel grid.

Every map starts the same way (`prepare`): the input is preprocessed as in pretraining (intensity
normalised per modality, axes reoriented to RAS, voxels resampled to the checkpoint's spacing) and
padded at the high end of each axis with its minimum to whole patches. The model runs on
*windows* of that grid: by default one pretraining sub-volume (`crop x crop x slab` voxels from the
checkpoint's provenance), a single-sub-volume sequence (S = 1), so every window looks like the first
sub-volume of a pretraining sample. Outputs go back onto the input grid with
`preprocess.resample_to_grid` (order 1): voxel maps directly, token maps by trilinear
interpolation between token centres (smooth, not blocky).

- `attention_map`: the attention of the token holding a query voxel over the tokens of a window
  centred on it (bidirectional mode), for one block (mean over heads or one head) or the attention
  rollout up to that block (Abnar & Zuidema 2020). The start token's share is left out.
- `next_token_prediction`: causal mode (prefix 0) over windows that tile the volume; each window's
  tokens are predicted in the AR token order (see `model_core.models.vit`), each from the tokens before
  it only, the first one from the start token alone. The head predicts a patch normalised to zero
  mean and unit std, so each predicted patch is *de-normalised with the true patch's mean and std*:
  the map shows the predicted structure at the true patch's brightness and contrast. Values are in
  the model's intensity scale ([0, 1] after the per-modality normalisation), not the file's units.
- `surprise_map`: per token, the mean squared error between the predicted and the true normalised
  patch (the pretraining loss of that token): about 1 where the model predicts nothing useful,
  lower where it predicts well, higher where it expected something else.
- `pca_features`: the last block's token features (bidirectional) projected on their first three
  principal components, each scaled to [0, 1] (1st..99th percentile): an RGB volume (I, J, K, 3).

`explain` reads a file, computes the asked maps and writes them (`attention.nii.gz`,
`prediction.nii.gz`, `surprise.nii.gz`, `pca.nii.gz`) with the input's affine; `ar3d explain` is
its command line. This module holds the explain part of the inference package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from model_core.checkpoint.store import (
    build_encoder,
    load_checkpoint,
    load_into,
    resolve_model,
)
from model_core.data.preprocess import (
    PreprocessConfig,
    Preprocessed,
    preprocess_volume,
    resample_to_grid,
)
from model_core.device import resolve_device
from model_core.errors import Ar3dError, Ar3dInputError, CheckpointError
from model_core.io.volume import (
    Volume,
    check_image,
    read_volume,
    voxel_to_world,
    world_to_voxel,
    write_error,
    write_volume,
)
from model_core.models.vit import NextTokenHead, ViT3D, patch_stats, unpatchify
from model_core.objectives.autoregressive import normalize_patches
from model_core.progress import Cancelled, ProgressFn, StopFn, check_stop, report
from model_core.vocabulary import PRETRAIN_WINDOW

__all__ = [
    "MAPS",
    "ExplainModel",
    "ModelGrid",
    "load_explain_model",
    "prepare",
    "attention_matrix",
    "attention_map",
    "next_token_prediction",
    "surprise_map",
    "patch_surprise",
    "stats_surprise",
    "pca_features",
    "explain",
    "Cancelled",
]

MAPS = ("attention", "prediction", "surprise", "pca")
_EPS = 1e-6  # variance floor of the per-patch normalisation, as in pretraining


# ----------------------------------------------------------------------------- the model


@dataclass
class ExplainModel:
    """An encoder, its next-token head (None when not AR-pretrained: no prediction or surprise map) and the input
    convention it was trained with."""

    encoder: ViT3D
    head: NextTokenHead | None
    preprocess: PreprocessConfig
    window: tuple[int, int, int] = PRETRAIN_WINDOW  # voxels of one window on the model grid
    name: str = "model"

    def __post_init__(self) -> None:
        cfg = self.encoder.cfg
        if cfg.in_channels != 1:
            raise Ar3dInputError(
                f"model {self.name} reads {cfg.in_channels} channels; explain needs a single-channel encoder"
            )
        p = cfg.patch_size
        if len(self.window) != 3 or any(int(w) < 1 for w in self.window):
            raise Ar3dInputError(f"window {tuple(self.window)} must be three positive voxel counts")
        self.window = tuple(max(p, int(w) // p * p) for w in self.window)  # whole patches
        self.encoder.eval()
        if self.head is not None:
            self.head.eval()

    @property
    def patch_size(self) -> int:
        return self.encoder.cfg.patch_size

    @property
    def device(self) -> torch.device:
        return self.encoder.start_token.device

    def to(self, device: torch.device | str) -> "ExplainModel":
        self.encoder.to(device)
        if self.head is not None:
            self.head.to(device)
        return self


def load_explain_model(name_or_dir: str | os.PathLike, device: str | torch.device = "auto") -> ExplainModel:
    """The encoder and next-token head of a checkpoint (a folder or a shipped name such as "ar3d-encoder").

    A checkpoint without a next-token head (MAE, Alice) gives `head=None`: its attention and PCA maps only.
    """
    device = resolve_device(device)
    path = resolve_model(name_or_dir)
    checkpoint = load_checkpoint(path)
    encoder = build_encoder(checkpoint)
    head = None
    if "head.proj.weight" in checkpoint.state_dict:
        head = NextTokenHead(encoder.cfg, stats="head.stats.weight" in checkpoint.state_dict)
        load_into(head, checkpoint, prefix="head.")
    config = checkpoint.typed_config
    window = config.provenance.sequence_window(PRETRAIN_WINDOW)
    model = ExplainModel(encoder, head, config.preprocessing, window, name=os.fspath(name_or_dir))
    return model.to(device)


# ----------------------------------------------------------------------------- the model grid


@dataclass
class ModelGrid:
    """An input volume on the model's grid, padded to whole patches, and the way back to the input grid."""

    pre: Preprocessed  # the volume in RAS at the model spacing (intensities in [0, 1]), its affine and the source grid
    array: np.ndarray = field(repr=False)  # (X, Y, Z) pre.array padded at the high end to multiples of the patch size
    patch_size: int
    spacing: tuple[float, float, float]  # model spacing the grid was made for
    source: str | None = None  # the input file, for error messages

    @property
    def tokens(self) -> tuple[int, int, int]:
        """Token grid (gx, gy, gz) of the whole padded volume."""
        return tuple(n // self.patch_size for n in self.array.shape)

    def token_affine(self, start: Sequence[int] = (0, 0, 0)) -> np.ndarray:
        """RAS affine of the token centres of a window whose first voxel is `start` on the model grid."""
        p = self.patch_size
        to_voxels = np.diag([p, p, p, 1.0])
        to_voxels[:3, 3] = np.asarray(start, dtype=np.float64) + (p - 1) / 2
        return self.pre.affine @ to_voxels

    def tokens_to_input(self, token_map: np.ndarray, start: Sequence[int] = (0, 0, 0)) -> np.ndarray:
        """(gx, gy, gz) or (gx, gy, gz, ch) values at token centres -> the input grid, trilinear; 0 far outside."""
        affine = self.token_affine(start)
        if token_map.ndim == 3:
            return self._to_input(token_map, affine)
        return np.stack([self._to_input(token_map[..., c], affine) for c in range(token_map.shape[-1])], axis=-1)

    def voxels_to_input(self, voxel_map: np.ndarray) -> np.ndarray:
        """A (X, Y, Z) map on the padded model grid -> the input grid, trilinear."""
        X, Y, Z = self.pre.array.shape
        return self._to_input(voxel_map[:X, :Y, :Z], self.pre.affine)

    def query_voxel(self, query_ijk: Sequence[int]) -> np.ndarray:
        """Model-grid voxel (3,) int of an input voxel (i, j, k), through world space."""
        world = voxel_to_world(self.pre.source_affine, np.asarray(query_ijk, dtype=np.float64))
        v = np.rint(world_to_voxel(self.pre.affine, world)).astype(int)
        return np.clip(v, 0, np.array(self.pre.array.shape) - 1)

    def _to_input(self, array: np.ndarray, affine: np.ndarray) -> np.ndarray:
        pre = self.pre
        return resample_to_grid(array.astype(np.float32), affine, pre.source_shape, pre.source_affine, order=1)


def prepare(model: ExplainModel, volume: Volume) -> ModelGrid:
    """Preprocess `volume` as in pretraining and pad it to whole patches (with its minimum, at the high end)."""
    check_image(volume.array, volume.path)
    pre = preprocess_volume(volume, model.preprocess)
    p = model.patch_size
    pad = [(0, -n % p) for n in pre.array.shape]
    array = np.pad(pre.array, pad, constant_values=float(pre.array.min()))
    return ModelGrid(pre, array, p, model.preprocess.spacing, volume.path)


def _grid(model: ExplainModel, volume: Volume | ModelGrid) -> ModelGrid:
    if not isinstance(volume, ModelGrid):
        return prepare(model, volume)
    if volume.patch_size != model.patch_size or not np.allclose(volume.spacing, model.preprocess.spacing):
        raise Ar3dInputError(
            f"the prepared grid (patch {volume.patch_size}, spacing {volume.spacing}) was made for another model "
            f"(patch {model.patch_size}, spacing {model.preprocess.spacing}); call prepare() with this model"
        )
    return volume


def _tiles(shape: Sequence[int], window: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """Windows tiling a grid of `shape` in C order (the last ones shorter), every size a multiple of the patch."""
    ranges = [[slice(s, min(s + w, n)) for s in range(0, n, w)] for n, w in zip(shape, window)]
    return [(a, b, c) for a in ranges[0] for b in ranges[1] for c in ranges[2]]


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[start : start + size], padded with the array's minimum where the window reaches outside."""
    out = np.full(tuple(size), float(array.min()), dtype=np.float32)
    src = tuple(slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, array.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = array[src]
    return out


def _as_input(array: np.ndarray, model: ExplainModel) -> torch.Tensor:
    """(X, Y, Z) numpy -> (1, 1, X, Y, Z) tensor on the model's device: one single-sub-volume sequence."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(model.device)


# ----------------------------------------------------------------------------- attention


def _layer_index(layer: int, depth: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -depth <= layer < depth:
        raise Ar3dInputError(
            f"layer {layer!r} does not exist; the encoder has {depth} blocks (0..{depth - 1}, or -1 for the last)"
        )
    return int(layer) % depth


def _check_head(head: int | None, heads: int, rollout: bool) -> None:
    if head is None:
        return
    if rollout:
        raise Ar3dInputError("attention rollout averages the heads; pass head=None with rollout=True")
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 0 <= head < heads:
        raise Ar3dInputError(f"head {head!r} does not exist; the encoder has {heads} heads (0..{heads - 1})")


@torch.inference_mode()
def attention_matrix(
    encoder: ViT3D, volumes: torch.Tensor, layer: int = -1, head: int | None = None, rollout: bool = False
) -> torch.Tensor:
    """(B, L, L) attention weights, bidirectional, start token at position 0; every row sums to one.

    `layer` is a 0-based block index (negative: from the last). One block's weights are averaged over
    the heads, or taken from `head`. With `rollout`, the Abnar & Zuidema rollout through blocks
    0..layer: per block A' = (A + I) / 2 (heads averaged), multiplied as A'_layer @ ... @ A'_0.
    """
    depth = encoder.cfg.depth
    index = _layer_index(layer, depth)
    _check_head(head, encoder.cfg.heads, rollout)
    _, _, attentions = encoder.forward_features(volumes, mode="bidirectional", return_attention=True)
    if not rollout:
        weights = attentions[index]  # (B, heads, L, L)
        return (weights.mean(1) if head is None else weights[:, head]).float()
    L = attentions[0].shape[-1]
    eye = torch.eye(L, device=volumes.device)
    result = eye.expand(volumes.shape[0], L, L)
    for weights in attentions[: index + 1]:
        a = weights.float().mean(1) + eye  # (B, L, L)
        result = (a / a.sum(-1, keepdim=True)) @ result
    return result


def attention_map(
    model: ExplainModel,
    volume: Volume | ModelGrid,
    query_ijk: Sequence[int],
    layer: int = -1,
    head: int | None = None,
    rollout: bool = False,
    *,
    window: Sequence[int] | None = None,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> np.ndarray:
    """How the token holding voxel `query_ijk` attends over the tokens of a window around it.

    `query_ijk` is a voxel index in the input file's own order (i, j, k); it is mapped through the
    affines onto the model grid. The window (about `window` voxels on the model grid, default the
    model's pretraining sub-volume, at most the volume's size; rounded to an odd number of tokens) is
    centred on the query voxel and padded with the volume's minimum where it reaches outside.
    `layer`, `head`, `rollout`: see `attention_matrix`.
    Returns a float32 (I, J, K) map on the input grid: the attention weights interpolated between
    token centres (the start token's share is left out), 0 outside the window.
    """
    cfg = model.encoder.cfg
    _layer_index(layer, cfg.depth)
    _check_head(head, cfg.heads, rollout)
    grid = _grid(model, volume)
    query = _check_query(query_ijk, grid.pre.source_shape, grid.source)
    p = model.patch_size
    wanted = np.asarray(window or model.window, dtype=int) // p  # (3,) tokens
    half = np.minimum(wanted, grid.tokens) // 2  # (3,) tokens on each side of the query's token
    tokens = tuple(int(n) for n in 2 * half + 1)  # the window's token grid, the query's token in the middle
    start = grid.query_voxel(query) - half * p - p // 2  # the query voxel at the centre of its token
    report(progress, 0, 2, "attention")
    check_stop(should_stop)
    x = _as_input(_crop(grid.array, start, np.array(tokens) * p), model)
    weights = attention_matrix(model.encoder, x, layer, head, rollout)[0]  # (L, L)
    row = 1 + int(np.ravel_multi_index(tuple(half), tokens))  # sequence position of the query's token
    token_map = weights[row, 1:].reshape(tokens).cpu().numpy()
    report(progress, 1, 2, "attention")
    out = grid.tokens_to_input(token_map, start)
    report(progress, 2, 2, "attention")
    return out


def _check_query(query_ijk: Sequence[int], shape: tuple[int, int, int], source: str | None) -> tuple[int, int, int]:
    try:
        values = [float(q) for q in query_ijk]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or any(not v.is_integer() for v in values):
        raise Ar3dInputError(f"query {query_ijk!r} must be three whole voxel indices i, j, k", source)
    query = tuple(int(v) for v in values)
    if any(not 0 <= q < n for q, n in zip(query, shape)):
        raise Ar3dInputError(f"query voxel {query} is outside the volume of shape {tuple(shape)}", source)
    return query


# ----------------------------------------------------------------------------- next-token prediction and surprise


def patch_surprise(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B, n, p^3) normalised predictions and TRUE patch voxels -> (B, n) per-token normalised MSE.

    The true patches are normalised as pretraining targets (zero mean, unit std per patch) first.
    """
    return ((pred.float() - normalize_patches(true.float(), eps=_EPS)) ** 2).mean(-1)


def stats_surprise(pred_stats: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B, n, 2) predicted `patch_stats` and (B, n, p^3) TRUE patch voxels -> (B, n) mean squared error.

    One unit is a tenth of the intensity range in mean brightness, or a factor e in contrast.
    """
    return ((pred_stats.float() - patch_stats(true.float())) ** 2).mean(-1)


@torch.inference_mode()
def _causal_pass(
    model: ExplainModel, grid: ModelGrid, progress: ProgressFn, should_stop: StopFn
) -> tuple[np.ndarray, np.ndarray]:
    """Prefix-0 (causal) run over the tiles: de-normalised predicted voxels (padded grid) and per-token surprise."""
    p = model.patch_size
    prediction = np.empty(grid.array.shape, dtype=np.float32)  # (X, Y, Z)
    surprise = np.empty(grid.tokens, dtype=np.float32)  # (gx, gy, gz)
    tiles = _tiles(grid.array.shape, model.window)
    zero = torch.zeros(1, dtype=torch.long, device=model.device)
    for n, tile in enumerate(tiles):
        check_stop(should_stop)
        report(progress, n, len(tiles), "next-token prediction")
        x = _as_input(grid.array[tile], model)  # (1, 1, X, Y, Z)
        tokens, _ = model.encoder.forward_features(x, mode="prefix", prefix_len=zero)  # (1, 1+n, C)
        pred = model.head(tokens[:, :-1]).float()  # (1, n, p^3): position t predicts patch token t+1
        true = model.encoder.patchify(x).float()  # (1, n, p^3)
        mean = true.mean(-1, keepdim=True)
        std = (true.var(-1, unbiased=False, keepdim=True) + _EPS).sqrt()
        t_grid = tuple((s.stop - s.start) // p for s in tile)
        prediction[tile] = unpatchify(pred * std + mean, p, t_grid)[0, 0].cpu().numpy()
        token_tile = tuple(slice(s.start // p, s.stop // p) for s in tile)
        per_token = patch_surprise(pred, true)  # (1, n)
        if model.head.stats is not None:  # brightness and texture, which the normalised voxels cannot show
            per_token = per_token + stats_surprise(model.head.forward_stats(tokens[:, :-1]), true)
        surprise[token_tile] = per_token.reshape(t_grid).cpu().numpy()
    report(progress, len(tiles), len(tiles), "next-token prediction")
    return prediction, surprise


def next_token_prediction(
    model: ExplainModel, volume: Volume | ModelGrid, *, progress: ProgressFn = None, should_stop: StopFn = None
) -> np.ndarray:
    """What the model expected at every voxel: (I, J, K) float32 on the input grid.

    Causal mode (prefix 0) over windows tiling the model grid, each a single-sub-volume sequence:
    every patch is predicted from the tokens before it in the AR order (z fastest), the first
    patch of each window from the start token alone. Each predicted (normalised) patch is
    de-normalised with the TRUE patch's mean and std, so brightness and contrast come from the
    real patch and only the structure is the model's. Values are in the model's [0, 1] intensity scale.
    """
    grid = _grid(model, volume)
    prediction, _ = _causal_pass(model, grid, progress, should_stop)
    return grid.voxels_to_input(prediction)


def surprise_map(
    model: ExplainModel, volume: Volume | ModelGrid, *, progress: ProgressFn = None, should_stop: StopFn = None
) -> np.ndarray:
    """Per-token prediction error, (I, J, K) float32 on the input grid, trilinear between token centres.

    Per token: mean over its voxels of (predicted - true)^2, both patches normalised to zero mean and
    unit std (the pretraining loss of that token); see `next_token_prediction` for the windows. A
    model whose head predicts patch brightness (`NextTokenHead.stats`) adds `stats_surprise`: the
    normalised pattern alone cannot see a patch that is unexpectedly bright or dark.
    """
    grid = _grid(model, volume)
    _, surprise = _causal_pass(model, grid, progress, should_stop)
    return grid.tokens_to_input(surprise)


# ----------------------------------------------------------------------------- token features


@torch.inference_mode()
def _features(model: ExplainModel, grid: ModelGrid, progress: ProgressFn, should_stop: StopFn) -> np.ndarray:
    """Last-block token features after the final norm, bidirectional, per tile: (gx, gy, gz, C)."""
    p = model.patch_size
    features = np.empty((*grid.tokens, model.encoder.cfg.width), dtype=np.float32)
    tiles = _tiles(grid.array.shape, model.window)
    for n, tile in enumerate(tiles):
        check_stop(should_stop)
        report(progress, n, len(tiles), "token features")
        tokens, _ = model.encoder.forward_features(_as_input(grid.array[tile], model), mode="bidirectional")
        t_grid = tuple((s.stop - s.start) // p for s in tile)
        token_tile = tuple(slice(s.start // p, s.stop // p) for s in tile)
        features[token_tile] = tokens[0, 1:].float().reshape(*t_grid, -1).cpu().numpy()
    report(progress, len(tiles), len(tiles), "token features")
    return features


def _pca_rgb(features: np.ndarray) -> np.ndarray:
    """(..., C) features -> (..., 3) in [0, 1]: the first three principal components, 1st..99th percentile scaled.

    Each component's sign is fixed so that its largest loading is positive (the same colours run to run).
    Components that do not exist (fewer than 3 tokens or channels) are 0.
    """
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)  # (N, C)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # (k, C)
    vt = vt[:3]
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])[:, None]
    proj = x @ vt.T  # (N, k)
    low, high = np.percentile(proj, [1.0, 99.0], axis=0)
    span = np.where(high > low, high - low, 1.0)
    rgb = np.zeros((len(x), 3), dtype=np.float32)
    rgb[:, : len(vt)] = np.clip((proj - low) / span, 0.0, 1.0)
    return rgb.reshape(*features.shape[:-1], 3)


def pca_features(
    model: ExplainModel, volume: Volume | ModelGrid, *, progress: ProgressFn = None, should_stop: StopFn = None
) -> np.ndarray:
    """Last-block token features -> PCA to 3 components -> RGB in [0, 1]: (I, J, K, 3) float32 on the input grid."""
    grid = _grid(model, volume)
    rgb = _pca_rgb(_features(model, grid, progress, should_stop))  # (gx, gy, gz, 3)
    return np.clip(grid.tokens_to_input(rgb), 0.0, 1.0)


# ----------------------------------------------------------------------------- the whole job


def explain(
    model_name_or_dir: str | os.PathLike | ExplainModel,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    query_ijk: Sequence[int] | None = None,
    query_mm: Sequence[float] | None = None,
    maps: Sequence[str] = MAPS,
    layer: int = -1,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> dict[str, Path]:
    """Compute `maps` for the image `input_path` and write `<map>.nii.gz` files into `out_dir`.

    Every file has the input's grid (shape and affine: size, spacing, origin, direction); `pca` has a
    4th axis of 3 (RGB). The attention query is `query_ijk` (voxel index in the file's own order) or
    `query_mm` (RAS+ world millimetres, rounded to the nearest voxel), by default the volume centre;
    `layer` (0-based, -1 the last) picks the attention block. Every argument is checked before
    anything is computed, and the files are written only when every map is ready, all at once:
    nothing is half-written on error or cancel. Returns {map name: written path}.
    """
    maps = _check_maps(maps)
    if query_ijk is not None and query_mm is not None:
        raise Ar3dInputError("give the query as voxel indices (query_ijk) or as millimetres (query_mm), not both")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise Ar3dInputError("the output must be a folder, and this is a file", out_dir)
    torch.manual_seed(seed)
    if isinstance(model_name_or_dir, ExplainModel):
        model = model_name_or_dir.to(resolve_device(device))
    else:
        model = load_explain_model(model_name_or_dir, device)
    if model.head is None and {"prediction", "surprise"} & set(maps):
        raise CheckpointError(f"model {model.name} has no next-token head; the prediction and surprise maps need "
                              "an AR-pretrained encoder (attention and pca work with any encoder)")
    _layer_index(layer, model.encoder.cfg.depth)
    volume = read_volume(input_path)
    if query_mm is not None:
        query = _query_from_mm(query_mm, volume)
    elif query_ijk is not None:
        query = _check_query(query_ijk, volume.shape, volume.path)
    else:
        query = tuple(n // 2 for n in volume.shape)

    steps = len(maps) + 2
    report(progress, 0, steps, "preprocessing")
    grid = prepare(model, volume)
    results: dict[str, np.ndarray] = {}
    for n, name in enumerate(maps, start=1):
        check_stop(should_stop)
        report(progress, n, steps, name)
        if name == "attention":
            results[name] = attention_map(model, grid, query, layer, should_stop=should_stop)
        elif name in ("prediction", "surprise") and name not in results:
            prediction, surprise = _causal_pass(model, grid, None, should_stop)
            results["prediction"] = grid.voxels_to_input(prediction)
            results["surprise"] = grid.tokens_to_input(surprise)
        elif name == "pca":
            results[name] = pca_features(model, grid, should_stop=should_stop)
    check_stop(should_stop)
    report(progress, steps - 1, steps, "writing")
    written = _write_all({name: results[name] for name in maps}, volume, out_dir)
    report(progress, steps, steps, "done")
    return written


def _check_maps(maps: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(str(m).strip() for m in ([maps] if isinstance(maps, str) else maps)))
    bad = [m for m in names if m not in MAPS]
    if bad or not names:
        raise Ar3dInputError(f"unknown map(s) {', '.join(bad) or '(none given)'}; choose among {', '.join(MAPS)}")
    return names


def _query_from_mm(query_mm: Sequence[float], volume: Volume) -> tuple[int, int, int]:
    try:
        xyz = np.array([float(q) for q in query_mm])
    except (TypeError, ValueError):
        xyz = np.array([])
    if xyz.shape != (3,) or not np.isfinite(xyz).all():
        raise Ar3dInputError(f"query {query_mm!r} must be three RAS millimetre coordinates x, y, z", volume.path)
    ijk = np.rint(world_to_voxel(volume.affine, xyz)).astype(int)
    if any(not 0 <= q < n for q, n in zip(ijk, volume.shape)):
        raise Ar3dInputError(
            f"query point {tuple(float(v) for v in xyz)} mm (voxel {tuple(int(v) for v in ijk)}) "
            f"is outside the volume of shape {volume.shape}",
            volume.path,
        )
    return tuple(int(v) for v in ijk)


def _write_all(results: dict[str, np.ndarray], like: Volume, out_dir: Path) -> dict[str, Path]:
    """Write every map into a staging folder inside `out_dir`, then move them in: all files or none."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".explain-", dir=out_dir))
    like_nifti = like if like.meta.get("format") == "nifti" else None
    try:
        for name, array in results.items():
            try:
                if array.ndim == 4:
                    _write_rgb(staging / f"{name}.nii.gz", array, like.affine, like_nifti)
                else:
                    write_volume(staging / f"{name}.nii.gz", array, like.affine, kind="float", like=like_nifti)
            except OSError as exc:  # named by the file the user asked for, not the staging copy
                raise write_error("could not write the file", exc, out_dir / f"{name}.nii.gz", out_dir,
                                  array.nbytes) from exc
            except Ar3dError as exc:  # named by the file the user asked for, not the staging copy
                raise type(exc)(exc.problem, out_dir / f"{name}.nii.gz") from exc
        written = {}
        for name in results:
            written[name] = out_dir / f"{name}.nii.gz"
            os.replace(staging / f"{name}.nii.gz", written[name])
        return written
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)  # only the folder this call made: nothing half-written
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_rgb(path: Path, rgb: np.ndarray, affine: np.ndarray, like: Volume | None) -> None:
    """An (I, J, K, 3) float32 NIfTI with the same affine and header codes as `write_volume` writes."""
    codes = (like.meta.get("nifti") if like is not None else None) or {}
    image = nib.Nifti1Image(rgb.astype(np.float32), affine)
    image.set_sform(affine, code=codes.get("sform_code") or 1)
    image.set_qform(affine, code=codes.get("qform_code") or 1)
    image.header.set_xyzt_units(xyz=codes.get("xyz_units") or "mm")
    nib.save(image, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
