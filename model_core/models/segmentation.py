"""Segmentation on the `ViT3D` encoder: a UNETR-style decoder, a light decoder, and the model that joins them.

The encoder runs in bidirectional mode on one window (B, 1, X, Y, Z) with X, Y, Z multiples of the
patch size p; its patch tokens become a (B, C, gx, gy, gz) grid (the start token is dropped).

- `UNETRDecoder` (AR-SSL4M downstream, MONAI `UNETR`): reads the outputs of intermediate blocks.
  With L = log2(p) levels (4 for p = 16) it reads L blocks, `feature_blocks(depth, L)` = blocks
  round(depth*k/L) for k = 1..L (3/6/9/12 of 12 for p = 16), the last one being the final,
  normalised tokens. Skip k (1-based, k < L) is projected up to 1/2^k of the input resolution with
  feature_size*2^k channels; the decoder climbs from the tokens (1/2^L) back to full resolution,
  concatenating one skip per level and, at full resolution, a convolution of the image itself.
- `LightDecoder`: for few-shot training on frozen, cached encoder features. Its input is the
  concatenation of 4 levels of token features (`feature_blocks(depth, 4)`, each layer-normalised
  without parameters): (B, 4C, gx, gy, gz), plus each patch's intensity mean and standard
  deviation. A few convolutions at token resolution; then (with `mid` > 0 channels) a dense
  branch at a quarter of the patch size that joins the upsampled token field with a strided
  convolution of the image (local edges and texture the 32 mm token field cannot place); trilinear
  upsampling to full resolution, then a per-voxel refinement that also sees the image (its
  intensity and one 3x3x3 convolution of it) sharpens boundaries. Trained on sampled voxels
  (`forward_points`), it is cheap enough to train on a CPU.

`SegmentationModel(encoder, decoder)(x)` maps (B, 1, X, Y, Z) to logits (B, K+1, X, Y, Z): channel 0
is background, channels 1..K the classes in the order of the checkpoint's "classes".
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import (
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrPrUpBlock,
    UnetrUpBlock,
)
from torch import Tensor, nn

from model_core.errors import Ar3dInputError, CheckpointError
from model_core.models.vit import ViT3D, ViT3DConfig

DecoderKind = Literal["light", "unetr"]
DECODER_KINDS = ("light", "unetr")
LIGHT_LEVELS = 4  # token feature levels the light decoder concatenates


def feature_blocks(depth: int, levels: int) -> tuple[int, ...]:
    """Block numbers (1-based) round(depth*k/levels) for k = 1..levels, at least 1 and distinct.

    (12, 4) -> (3, 6, 9, 12), the seed's choice; (4, 4) -> (1, 2, 3, 4); (4, 3) -> (1, 3, 4).
    """
    if depth < 1 or levels < 1:
        raise Ar3dInputError(f"depth ({depth}) and levels ({levels}) must be positive")
    blocks = [max(1, math.floor(depth * k / levels + 0.5)) for k in range(1, levels + 1)]
    return tuple(dict.fromkeys(blocks))


def token_grid(tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Patch tokens (B, 1+n, C) with the start token first -> (B, C, gx, gy, gz) (token order z fastest)."""
    B, L, C = tokens.shape
    if L != 1 + grid[0] * grid[1] * grid[2]:
        raise Ar3dInputError(f"{L} tokens do not fit a start token plus a {grid} grid")
    return tokens[:, 1:].transpose(1, 2).reshape(B, C, *grid)


def _levels(patch_size: int) -> int:
    levels = round(math.log2(patch_size))
    if patch_size < 2 or 2**levels != patch_size:
        raise Ar3dInputError(f"the UNETR decoder needs a power-of-two patch size, got {patch_size}")
    return levels


# ----------------------------------------------------------------------------- decoders


class UNETRDecoder(nn.Module):
    """UNETR decoder (MONAI building blocks) on the encoder's intermediate blocks; see the module docstring."""

    def __init__(self, cfg: ViT3DConfig, num_classes: int, feature_size: int = 16, norm_name: str = "instance"):
        super().__init__()
        if num_classes < 2:
            raise Ar3dInputError(f"num_classes counts the background and must be at least 2, got {num_classes}")
        levels = _levels(cfg.patch_size)
        self.blocks = feature_blocks(cfg.depth, levels)
        if len(self.blocks) != levels:
            raise Ar3dInputError(
                f"the UNETR decoder needs {levels} distinct blocks but the encoder has depth {cfg.depth}"
            )
        self.config = {"kind": "unetr", "num_classes": num_classes, "feature_size": feature_size, "norm_name": norm_name}
        c, fs = cfg.width, feature_size
        conv = {"spatial_dims": 3, "kernel_size": 3, "norm_name": norm_name, "res_block": True}
        self.image = UnetrBasicBlock(in_channels=cfg.in_channels, out_channels=fs, stride=1, **conv)
        # skips[k-1]: block self.blocks[k-1] projected up 2^(levels-k) times: 1/2^k resolution, fs*2^k channels
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(in_channels=c, out_channels=fs * 2**k, num_layer=levels - 1 - k, stride=1,
                           upsample_kernel_size=2, conv_block=True, **conv)
            for k in range(1, levels)
        )
        # ups[k]: from 1/2^(k+1) resolution up to 1/2^k, joined with skips[k-1] (or the image conv for k = 0)
        self.ups = nn.ModuleList(
            UnetrUpBlock(in_channels=c if k == levels - 1 else fs * 2 ** (k + 1), out_channels=fs * 2**k,
                         upsample_kernel_size=2, **conv)
            for k in range(levels)
        )
        self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=num_classes)

    def forward(self, image: Tensor, tokens: Tensor, hidden: list[Tensor], grid: tuple[int, int, int]) -> Tensor:
        """image (B, 1, X, Y, Z), final tokens (B, 1+n, C), block outputs [(B, 1+n, C)] -> logits (B, K+1, X, Y, Z)."""
        skips = [self.image(image)] + [proj(token_grid(h, grid)) for proj, h in zip(self.skips, hidden)]
        x = token_grid(tokens, grid)  # (B, C, gx, gy, gz)
        for k in reversed(range(len(self.ups))):
            x = self.ups[k](x, skips[k])  # (B, fs*2^k, X/2^k, Y/2^k, Z/2^k)
        return self.out(x)


class LightDecoder(nn.Module):
    """Few convolutions on cached token features, trilinear upsampling, per-voxel refinement with the image.

    `forward` decodes every voxel of a window; `forward_points` decodes only chosen voxels (the same
    function there, for training at a fraction of the cost: full-resolution tensors are what makes
    a 3D decoder slow on a CPU).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        patch_size: int,
        in_channels: int = 1,
        hidden: int = 64,
        refine: int = 16,
        mid: int = 16,
        blocks: Sequence[int] | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise Ar3dInputError(f"num_classes counts the background and must be at least 2, got {num_classes}")
        if mid < 0:
            raise Ar3dInputError(f"mid is a number of channels (0: no mid-resolution branch), got {mid}")
        self.patch_size = patch_size
        self.config = {"kind": "light", "num_classes": num_classes, "hidden": hidden, "refine": refine, "mid": mid}
        self.blocks = None if blocks is None else tuple(int(b) for b in blocks)  # encoder blocks it reads; None: default
        if self.blocks is not None:
            self.config["blocks"] = list(self.blocks)
        self.coarse = nn.Sequential(
            nn.Conv3d(in_features + 2 * in_channels, hidden, 1), nn.GELU(),
            nn.Conv3d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv3d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv3d(hidden, refine, 1),
        )
        if mid:
            s = max(1, patch_size // 4)  # the branch's stride: a quarter of the patch
            self.mid_image = nn.Conv3d(in_channels, mid, s, stride=s) if s > 1 else nn.Conv3d(in_channels, mid, 3, padding=1)
            self.mid = nn.Sequential(
                nn.Conv3d(refine + mid, mid, 3, padding=1), nn.GELU(),
                nn.Conv3d(mid, mid, 3, padding=1), nn.GELU(),
            )
        else:
            self.mid_image, self.mid = nn.Identity(), nn.Identity()
        field = mid or refine  # channels of the field the refinement upsamples
        self.image = nn.Conv3d(in_channels, refine // 2, 3, padding=1)
        self.refine = nn.Sequential(
            nn.Conv3d(field + refine // 2 + in_channels, refine, 1), nn.GELU(), nn.Conv3d(refine, num_classes, 1)
        )

    def token_inputs(self, image: Tensor, features: Tensor) -> Tensor:
        """The token-resolution input (B, 4C + 2C', gx, gy, gz): the features, then the image's mean and standard
        deviation in every patch (intensity the encoder's layer norms may hide). It does not depend on the weights."""
        expected = tuple(s * self.patch_size for s in features.shape[2:])
        if tuple(image.shape[2:]) != expected:
            raise Ar3dInputError(
                f"image of spatial size {tuple(image.shape[2:])} does not match a {tuple(features.shape[2:])} "
                f"token grid of patch size {self.patch_size}"
            )
        mean = F.avg_pool3d(image, self.patch_size)  # (B, C', gx, gy, gz)
        std = (F.avg_pool3d(image * image, self.patch_size) - mean * mean).clamp_min(0).sqrt()
        return torch.cat([features.to(image.dtype), mean, std], dim=1)

    @property
    def stride(self) -> int:
        """Image voxels per field voxel: a quarter of the patch with the mid-resolution branch, the patch without."""
        return max(1, self.patch_size // 4) if self.config["mid"] else self.patch_size

    def field(
        self, image: Tensor, features: Tensor | None = None, *, inputs: Tensor | None = None,
        box: tuple[slice, slice, slice] | None = None,
    ) -> Tensor:
        """The field the per-voxel refinement upsamples: (B, mid, X/s, Y/s, Z/s), or the token field when mid = 0.

        inputs: `token_inputs(image, features)`, when already computed (then `features` is unused).
        box: voxel slices of `image` whose starts and stops are multiples of `stride`: the field of
        `image[box]` only (to decode points of that crop), equal to the whole field there except within
        two field voxels of a side that cuts the image (the token part is always computed whole).
        """
        coarse = self.coarse(self.token_inputs(image, features) if inputs is None else inputs)  # (B, refine, g...)
        s = self.stride
        cut = (...,) if box is None else (..., *(slice(b.start // s, b.stop // s) for b in box))
        if not self.config["mid"]:
            return coarse[cut]
        whole = [n // s for n in image.shape[2:]]
        up = F.interpolate(coarse, size=whole, mode="trilinear", align_corners=False)[cut]  # (B, refine, box/s)
        local = self.mid_image(image if box is None else image[(..., *box)])  # (B, mid, box/s)
        return self.mid(torch.cat([up, F.gelu(local)], dim=1))

    def forward(self, image: Tensor, features: Tensor) -> Tensor:
        """image (B, 1, X, Y, Z), features (B, 4C, gx, gy, gz) -> logits (B, K+1, X, Y, Z)."""
        field = self.field(image, features)
        up = F.interpolate(field, size=image.shape[2:], mode="trilinear", align_corners=False)  # (B, field, X, Y, Z)
        return self.refine(torch.cat([up, F.gelu(self.image(image)), image], dim=1))

    def forward_points(self, image: Tensor, features: Tensor, points: Tensor, field: Tensor | None = None) -> Tensor:
        """Logits at voxels `points` (B, N), flat indices into (X, Y, Z): (B, K+1, N), equal to `forward` there.

        field: `self.field(image, features)` when it is already computed (features are then unused); for a crop
        `image[box]`, `self.field(whole image, features, box=box)` with `image` the crop.
        """
        field = self.field(image, features) if field is None else field
        B, C = image.shape[:2]
        size = torch.tensor(image.shape[2:], device=image.device)
        ijk = torch.stack(torch.unravel_index(points, tuple(image.shape[2:])), dim=-1)  # (B, N, 3)
        # grid_sample with align_corners=False puts voxel i of X at ((i + 0.5) / X) * 2 - 1, as F.interpolate does.
        grid = ((ijk + 0.5) / size * 2 - 1).flip(-1).to(field.dtype)  # (B, N, 3) as (z, y, x)
        up = F.grid_sample(field, grid[:, :, None, None], mode="bilinear", padding_mode="border", align_corners=False)
        # 3x3x3 neighbourhood of every point (zero outside the window, as the convolution's padding)
        padded = F.pad(image, (1, 1, 1, 1, 1, 1)).flatten(2)  # (B, C, (X+2)(Y+2)(Z+2))
        _X, Y, Z = (int(s) + 2 for s in image.shape[2:])
        d = torch.arange(-1, 2, device=image.device)
        offsets = (d[:, None, None] * Y * Z + d[None, :, None] * Z + d[None, None, :]).reshape(-1)  # (27,)
        centre = ((ijk + 1) * torch.tensor([Y * Z, Z, 1], device=image.device)).sum(-1)  # (B, N) in the padded grid
        index = (centre[:, None, :] + offsets[None, :, None]).reshape(B, 1, -1).expand(B, C, -1)  # (B, C, 27N)
        patches = padded.gather(2, index).reshape(B, C * 27, -1)  # (B, C*27, N), channel-major like the conv weight
        img = F.linear(patches.transpose(1, 2), self.image.weight.flatten(1), self.image.bias).transpose(1, 2)
        value = padded.gather(2, centre[:, None, :].expand(B, C, -1))  # (B, C, N)
        x = torch.cat([up[..., 0, 0], F.gelu(img), value], dim=1).transpose(1, 2)  # (B, N, field + refine//2 + C)
        mix, out = self.refine[0], self.refine[2]  # the 1x1 convolutions, applied as matrices (faster on points)
        x = F.gelu(F.linear(x, mix.weight.flatten(1), mix.bias))
        return F.linear(x, out.weight.flatten(1), out.bias).transpose(1, 2)  # (B, K+1, N)


# ----------------------------------------------------------------------------- the model


def _volumes(encoder: ViT3D, x: Tensor) -> Tensor:
    """(B, C, X, Y, Z) image batch -> the encoder's one-sub-volume sequence (B, 1, [C,] X, Y, Z)."""
    if x.ndim != 5 or x.shape[1] != encoder.cfg.in_channels:
        raise Ar3dInputError(f"input of shape {tuple(x.shape)} is not (B, {encoder.cfg.in_channels}, X, Y, Z)")
    return x if encoder.cfg.in_channels == 1 else x.unsqueeze(1)


def light_features(encoder: ViT3D, x: Tensor, blocks: Sequence[int] | None = None) -> Tensor:
    """The light decoder's input: layer-normalised token features of x (B, 1, X, Y, Z) after each of `blocks`
    (1-based; default `feature_blocks(depth, LIGHT_LEVELS)`, e.g. 3, 6, 9, 12), (B, len(blocks) * C, gx, gy, gz)."""
    grid = encoder.grid(x.shape[2:])
    blocks = check_blocks(blocks, encoder.cfg.depth)
    last = blocks[-1] == encoder.cfg.depth
    tokens, hidden = encoder.forward_features(_volumes(encoder, x), return_blocks=blocks[:-1] if last else blocks)
    levels = [F.layer_norm(h, h.shape[-1:]) for h in hidden] + ([tokens] if last else [])  # final tokens: normed
    return torch.cat([token_grid(t, grid) for t in levels], dim=1)


def check_blocks(blocks: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """`blocks` as increasing distinct block numbers in 1..depth; None: `feature_blocks(depth, LIGHT_LEVELS)`."""
    if blocks is None:
        return feature_blocks(depth, LIGHT_LEVELS)
    out = tuple(int(b) for b in blocks)
    if not out or list(out) != sorted(set(out)) or out[0] < 1 or out[-1] > depth:
        raise Ar3dInputError(f"feature blocks {list(blocks)} must be increasing block numbers in 1..{depth}")
    return out


def segmentation_logits(
    encoder: ViT3D, decoder: UNETRDecoder | LightDecoder, x: Tensor, features: Tensor | None = None
) -> Tensor:
    """x (B, 1, X, Y, Z) -> logits (B, K+1, X, Y, Z). `features`: precomputed `light_features` (light decoder only)."""
    if isinstance(decoder, LightDecoder):
        return decoder(x, light_features(encoder, x, decoder.blocks) if features is None else features)
    if features is not None:
        raise Ar3dInputError("cached features are only used by the light decoder")
    grid = encoder.grid(x.shape[2:])
    tokens, hidden = encoder.forward_features(_volumes(encoder, x), return_blocks=decoder.blocks[:-1])
    return decoder(x, tokens, hidden, grid)


class SegmentationModel(nn.Module):
    """Encoder (bidirectional) + decoder. `forward(x)`: (B, 1, X, Y, Z) in [0, 1] -> logits (B, K+1, X, Y, Z)."""

    def __init__(self, encoder: ViT3D, decoder: UNETRDecoder | LightDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def num_classes(self) -> int:
        """K+1: the classes and the background."""
        return int(self.decoder.config["num_classes"])

    def forward(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        return segmentation_logits(self.encoder, self.decoder, x, features)


def build_decoder(kind: DecoderKind, cfg: ViT3DConfig, num_classes: int, **options) -> UNETRDecoder | LightDecoder:
    """A decoder for an encoder of config `cfg`. options: light: hidden, refine, mid; unetr: feature_size, norm_name.

    A decoder's `config` attribute holds these arguments (as `kind`, `num_classes`, options) for config.json.
    """
    if kind == "light":
        width = len(check_blocks(options.get("blocks"), cfg.depth)) * cfg.width
        return LightDecoder(width, num_classes, cfg.patch_size, cfg.in_channels, **options)
    if kind == "unetr":
        return UNETRDecoder(cfg, num_classes, **options)
    raise Ar3dInputError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODER_KINDS)}")


def decoder_from_config(cfg: ViT3DConfig, decoder_cfg: dict) -> UNETRDecoder | LightDecoder:
    """Rebuild a decoder (random weights) from its `config` as saved in config.json.

    A light decoder saved before the mid-resolution branch existed has no "mid": it is rebuilt without one.
    """
    options = {k: v for k, v in decoder_cfg.items() if k not in ("kind", "num_classes")}
    if decoder_cfg.get("kind") == "light":
        options.setdefault("mid", 0)
    return build_decoder(decoder_cfg.get("kind"), cfg, decoder_cfg.get("num_classes"), **options)


def model_from_config(encoder_cfg: dict, decoder_cfg: dict) -> SegmentationModel:
    """Rebuild a `SegmentationModel` (random weights) from config.json's encoder config and a decoder's `config`."""
    cfg = ViT3DConfig.from_dict(encoder_cfg)
    try:
        decoder = decoder_from_config(cfg, decoder_cfg)
    except (KeyError, TypeError, ValueError, Ar3dInputError) as exc:
        raise CheckpointError(f"segmentation decoder config {decoder_cfg} is incomplete or wrong ({exc})") from None
    return SegmentationModel(ViT3D(cfg), decoder)
