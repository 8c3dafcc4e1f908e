"""A 3D ViT encoder with an attention mode per call, and the next-token head.

Input and token order
---------------------
The encoder reads a *sequence* of S sub-volumes of equal shape (X, Y, Z): `volumes` is
(B, S, X, Y, Z) for single-channel images (S = 1 for a plain volume) or (B, S, C, X, Y, Z) when
`in_channels` = C > 1. Each sub-volume is cut into cubic patches of edge p, a grid
(gx, gy, gz) = (X/p, Y/p, Z/p) of n = gx*gy*gz patches. The token sequence is

    [start] + patches of sub-volume 0 + patches of sub-volume 1 + ... + patches of sub-volume S-1

sub-volume after sub-volume, as drawn in the AR-SSL4M paper's figure. Inside a sub-volume the
patches follow a C-order raster over (gx, gy, gz) with z fastest: patch (a, b, c) of sub-volume s
is patch token s*n + (a*gy + b)*gz + c (0-based, not counting the start token), i.e. sequence
position 1 + s*n + (a*gy + b)*gz + c. This is exactly what `patchify` and the Conv3d patch
embedding produce. The official AR-SSL4M code instead rasterises the concatenated volume with z
fastest, which interleaves the sub-volumes column by column; we chose the figure's order, so a
prefix is a run of whole sub-volumes followed by the start of the next one.

Position: every patch token gets a fixed 3D sin-cos embedding of its patch position inside its
sub-volume plus a fixed 1D sin-cos embedding of its sub-volume index s, so any grid size works and
the sub-volumes of a sequence are distinguishable. The start token is learned and has no position.

Attention modes (per call)
--------------------------
- "bidirectional": every position attends to every position (downstream use; no mask, SDPA fast path).
- "prefix" with P per sample (0 <= P <= N): position i may attend to j iff j <= max(i, P), positions
  counted with the start token at 0. So the start token and the first P patch tokens attend to each
  other bidirectionally and every later position attends causally. P = 0 is plain causal.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_core.errors import Ar3dInputError, CheckpointError

AttentionMode = Literal["prefix", "bidirectional"]

_PRESETS: dict[str, dict] = {
    "tiny": dict(width=192, depth=12, heads=3),
    "small": dict(width=384, depth=12, heads=6),
    "base": dict(width=768, depth=12, heads=12),  # MLP 4 * 768 = 3072
}


@dataclass
class ViT3DConfig:
    patch_size: int = 16  # cubic patch edge in voxels (16^3 in the paper)
    in_channels: int = 1  # image channels per sub-volume
    width: int = 192  # token width C
    depth: int = 12  # number of transformer blocks
    heads: int = 3  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    max_subvolumes: int = 8  # most sub-volumes one sequence may hold (size of the sub-volume index table)
    drop_path: float = 0.0  # stochastic depth rate of the last block, rising linearly from 0 on the first

    def __post_init__(self) -> None:
        for name in ("patch_size", "in_channels", "width", "depth", "heads", "max_subvolumes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Ar3dInputError(f"ViT3DConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise Ar3dInputError(f"ViT3DConfig.width {self.width} is not divisible by heads {self.heads}")
        if self.width < 6:
            raise Ar3dInputError(f"ViT3DConfig.width must be at least 6 for the 3D sin-cos position, got {self.width}")
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise Ar3dInputError(f"ViT3DConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not isinstance(self.drop_path, (int, float)) or not 0 <= self.drop_path < 1:
            raise Ar3dInputError(f"ViT3DConfig.drop_path must be in [0, 1), got {self.drop_path!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ViT3DConfig":
        """A named size ("tiny", "small", "base"), with any field overridden, e.g. `preset("base", patch_size=8)`."""
        if name not in _PRESETS:
            raise Ar3dInputError(f"unknown model size {name!r}; choose one of {', '.join(_PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise Ar3dInputError(f"unknown ViT3DConfig field(s) {', '.join(unknown)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_spec(cls, spec: str, **overrides) -> "ViT3DConfig":
        """A size name ("tiny", "small", "base") or a JSON file (a ViT3DConfig dict, or a checkpoint's
        config.json whose "encoder" is used), with any field overridden."""
        if spec in _PRESETS:
            return cls.preset(spec, **overrides)
        path = Path(spec)
        if not path.is_file():
            raise Ar3dInputError(f"--config {spec!r} is neither a size ({', '.join(_PRESETS)}) nor a JSON file")
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Ar3dInputError(f"cannot read the model config ({exc})", path) from None
        if not isinstance(doc, dict):
            raise Ar3dInputError("model config must be a JSON object", path)
        return cls.from_dict({**doc.get("encoder", doc), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViT3DConfig":
        """Inverse of `to_dict`; missing fields take their defaults, unknown or bad ones raise CheckpointError."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"unknown encoder config key(s) {', '.join(map(repr, unknown))}")
        try:
            return cls(**d)
        except Ar3dInputError as err:
            raise CheckpointError(str(err)) from err


# ----------------------------------------------------------------------------- geometry helpers


def _grid(spatial_shape: Sequence[int], p: int) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3 or any(s < p or s % p for s in shape):
        raise Ar3dInputError(f"spatial shape {shape} is not three sizes divisible by the patch size {p}")
    return shape[0] // p, shape[1] // p, shape[2] // p


def _sincos_1d(pos: Tensor, dim: int) -> Tensor:
    """(M,) positions -> (M, dim): sines of dim//2 frequencies, then cosines (a zero column if dim is odd)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))  # (half,)
    angles = pos.to(torch.float64)[:, None] * omega[None]  # (M, half)
    emb = torch.cat([angles.sin(), angles.cos(), angles.new_zeros(len(pos), dim - 2 * half)], dim=1)
    return emb.float()


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int) -> Tensor:
    """Fixed 3D sin-cos position of each patch of a (gx, gy, gz) grid: (gx*gy*gz, dim), rows in token order.

    Each axis gets 2*(dim//6) channels (x, then y, then z); the dim % 6 channels left over are zero.
    """
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise Ar3dInputError(f"patch grid {tuple(grid)} must be three positive sizes")
    if dim < 6:
        raise Ar3dInputError(f"the 3D sin-cos position needs a width of at least 6, got {dim}")
    axis_dim = 2 * (dim // 6)
    coords = torch.meshgrid(*(torch.arange(int(g)) for g in grid), indexing="ij")  # C order, z fastest
    parts = [_sincos_1d(c.reshape(-1), axis_dim) for c in coords]  # 3 x (n, axis_dim)
    n = parts[0].shape[0]
    return torch.cat(parts + [torch.zeros(n, dim - 3 * axis_dim)], dim=1)  # (n, dim)


@functools.lru_cache(maxsize=32)
def sequence_pos_embed(
    grid: tuple[int, int, int], num_subvolumes: int, dim: int, device: torch.device | None = None
) -> Tensor:
    """Position of every patch token of an S-sub-volume sequence: (S*n, dim) = 3D position + sub-volume index.

    Cached per (grid, S, dim, device), since every training step asks for the same one: do not modify it in place.
    """
    within = sincos_pos_embed_3d(grid, dim)  # (n, dim)
    index = _sincos_1d(torch.arange(num_subvolumes), dim)  # (S, dim)
    return (within.repeat(num_subvolumes, 1) + index.repeat_interleave(within.shape[0], dim=0)).to(device)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, X, Y, Z) -> (B, N, p^3*C): patches in C-order raster over (gx, gy, gz), z fastest.

    Inside a patch the voxels are ordered (px, py, pz, c) with the channel fastest.
    """
    if x.ndim != 5:
        raise Ar3dInputError(f"patchify needs a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    gx, gy, gz = _grid(x.shape[2:], p)
    x = x.reshape(B, C, gx, p, gy, p, gz, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gx, gy, gz, p, p, p, C)
    return x.reshape(B, gx * gy * gz, p**3 * C)


def unpatchify(t: Tensor, p: int, grid: tuple[int, int, int], channels: int = 1) -> Tensor:
    """Inverse of `patchify`: (B, N, p^3*C) -> (B, C, gx*p, gy*p, gz*p)."""
    gx, gy, gz = grid
    if t.ndim != 3 or t.shape[1] != gx * gy * gz or t.shape[2] != p**3 * channels:
        raise Ar3dInputError(
            f"tokens of shape {tuple(t.shape)} do not fit a {tuple(grid)} grid "
            f"of {p}^3 patches with {channels} channel(s)"
        )
    B = t.shape[0]
    x = t.reshape(B, gx, gy, gz, p, p, p, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gx, p, gy, p, gz, p)
    return x.reshape(B, channels, gx * p, gy * p, gz * p)


def prefix_attention_mask(prefix_len: Tensor, length: int) -> Tensor:
    """(B,) prefix lengths P -> (B, 1, L, L) bool, True where position i may attend to j: j <= max(i, P)."""
    pos = torch.arange(length, device=prefix_len.device)  # (L,)
    reach = torch.maximum(pos[None, :], prefix_len[:, None])  # (B, L): furthest key each query sees
    return (pos[None, None, :] <= reach[:, :, None]).unsqueeze(1)  # (B, 1, L, L)


# ----------------------------------------------------------------------------- layers


def init_weights(module: nn.Module) -> None:
    """MAE-style initialisation, for `module.apply`: xavier-uniform Linear, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's residual branch with probability `p`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention on `scaled_dot_product_attention`; explicit weights when asked."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, L, C), mask (B, 1, L, L) bool or None -> (B, L, C) and the weights (B, heads, L, L) or None."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        if return_attention:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, L, L)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = scores.softmax(dim=-1)
            out = attn @ v  # (B, h, L, d)
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, C)), attn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        a, attn = self.attn(self.norm1(x), mask, return_attention)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


# ----------------------------------------------------------------------------- encoder and head


class ViT3D(nn.Module):
    """3D ViT encoder: Conv3d patch embedding, learned start token, fixed sin-cos positions, pre-norm blocks."""

    def __init__(self, cfg: ViT3DConfig):
        super().__init__()
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.width
        self.patch_embed = nn.Conv3d(cfg.in_channels, c, kernel_size=p, stride=p)
        self.start_token = nn.Parameter(torch.zeros(1, 1, c))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # stochastic depth, 0 to max
        self.blocks = nn.ModuleList(Block(c, cfg.heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(c, eps=1e-6)

        self.apply(init_weights)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.start_token, std=0.02)

    def grid(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Patch grid (gx, gy, gz) of one (X, Y, Z) sub-volume; sizes not divisible by the patch raise."""
        return _grid(spatial_shape, self.cfg.patch_size)

    def sequence(self, volumes: Tensor) -> Tensor:
        """Check `volumes` and return them as (B, S, C, X, Y, Z)."""
        c, shape = self.cfg.in_channels, tuple(volumes.shape)
        if c == 1 and volumes.ndim == 5:
            volumes = volumes.unsqueeze(2)
        elif volumes.ndim != 6 or volumes.shape[2] != c:
            expected = "(B, S, X, Y, Z)" if c == 1 else f"(B, S, {c}, X, Y, Z)"
            raise Ar3dInputError(f"volumes have shape {shape}; the encoder expects {expected}")
        S = volumes.shape[1]
        if not 1 <= S <= self.cfg.max_subvolumes:
            raise Ar3dInputError(
                f"volumes of shape {shape} hold {S} sub-volumes; the encoder takes 1 to {self.cfg.max_subvolumes}"
            )
        p = self.cfg.patch_size
        if any(s < p or s % p for s in volumes.shape[-3:]):
            raise Ar3dInputError(
                f"volumes of shape {shape}: spatial size {tuple(volumes.shape[-3:])} "
                f"is not a multiple of the patch size {p}"
            )
        return volumes

    def patchify(self, volumes: Tensor) -> Tensor:
        """Voxels of every patch token in sequence order: (B, S*n, p^3*C); see the module docstring."""
        seq = self.sequence(volumes)  # (B, S, C, X, Y, Z)
        B, S = seq.shape[:2]
        tokens = patchify(seq.flatten(0, 1), self.cfg.patch_size)  # (B*S, n, p^3*C)
        return tokens.reshape(B, S * tokens.shape[1], tokens.shape[2])

    def embed(self, volumes: Tensor) -> Tensor:
        """(B, S, X, Y, Z) -> (B, 1 + S*n, C): start token, then patch tokens with their positions."""
        seq = self.sequence(volumes)  # (B, S, C, X, Y, Z)
        B, S = seq.shape[:2]
        grid = self.grid(seq.shape[-3:])
        x = self.patch_embed(seq.flatten(0, 1).to(self.patch_embed.weight.dtype))  # (B*S, C, gx, gy, gz)
        x = x.flatten(2).transpose(1, 2)  # (B*S, n, C), z fastest
        x = x.reshape(B, S * x.shape[1], x.shape[2])  # (B, S*n, C), sub-volume after sub-volume
        x = x + sequence_pos_embed(grid, S, self.cfg.width, x.device).to(x.dtype)
        start = self.start_token.to(x.dtype).expand(B, -1, -1)  # (B, 1, C)
        return torch.cat([start, x], dim=1)

    def attention_mask(
        self, mode: AttentionMode, prefix_len: Tensor | None, batch: int, length: int, device: torch.device
    ) -> Tensor | None:
        """The (B, 1, L, L) boolean mask of a mode, or None for "bidirectional". prefix_len None means P = 0."""
        if mode == "bidirectional":
            if prefix_len is not None:
                raise Ar3dInputError("prefix_len is only used with mode='prefix', not 'bidirectional'")
            return None
        if mode != "prefix":
            raise Ar3dInputError(f"unknown attention mode {mode!r}; choose 'prefix' or 'bidirectional'")
        if prefix_len is None:
            prefix_len = torch.zeros(batch, dtype=torch.long, device=device)
        if prefix_len.shape != (batch,) or prefix_len.dtype.is_floating_point or prefix_len.dtype == torch.bool:
            raise Ar3dInputError(
                f"prefix_len must be an integer tensor of shape ({batch},), "
                f"got {prefix_len.dtype} {tuple(prefix_len.shape)}"
            )
        if batch and (prefix_len.min() < 0 or prefix_len.max() > length - 1):
            raise Ar3dInputError(f"prefix_len must be in [0, {length - 1}], got {prefix_len.tolist()}")
        return prefix_attention_mask(prefix_len.to(device=device, dtype=torch.long), length)

    def forward_tokens(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        return_blocks: Sequence[int] = (),
        return_attention: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run embedded tokens x (B, L, C) through the blocks and the final LayerNorm; see `forward_features`."""
        wanted = set(return_blocks)
        bad = sorted(b for b in wanted if not (isinstance(b, int) and 1 <= b <= self.cfg.depth))
        if bad:
            raise Ar3dInputError(f"return_blocks {bad} are not block numbers 1..{self.cfg.depth}")
        kept: dict[int, Tensor] = {}
        attentions: list[Tensor] = []
        for number, block in enumerate(self.blocks, start=1):
            x, attn = block(x, mask, return_attention)
            if number in wanted:
                kept[number] = x
            if return_attention:
                attentions.append(attn)
        x = self.norm(x)
        blocks = [kept[b] for b in return_blocks]
        return (x, blocks, attentions) if return_attention else (x, blocks)

    def forward_features(
        self,
        volumes: Tensor,
        *,
        mode: AttentionMode = "bidirectional",
        prefix_len: Tensor | None = None,
        return_blocks: Sequence[int] = (),
        return_attention: bool = False,
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], list[Tensor]]:
        """Encode volumes (B, S, X, Y, Z).

        Returns the tokens after the final LayerNorm (B, 1+S*n, C) and the outputs of the requested
        blocks (1-based, e.g. (3, 6, 9, 12) for UNETR), each (B, 1+S*n, C), in the order asked. With
        `return_attention=True` a third item follows: every block's attention weights (B, heads, L, L),
        computed explicitly instead of through SDPA (slower; for the explain feature).
        `mode="prefix"` takes `prefix_len` (B,) long, the number P of prefix patch tokens (None: P = 0).
        """
        x = self.embed(volumes)  # (B, L, C)
        mask = self.attention_mask(mode, prefix_len, x.shape[0], x.shape[1], x.device)
        return self.forward_tokens(x, mask, return_blocks=return_blocks, return_attention=return_attention)

    def forward(
        self, volumes: Tensor, **kwargs
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], list[Tensor]]:
        """Same as `forward_features`."""
        return self.forward_features(volumes, **kwargs)


STATS_MEAN_SCALE = 0.1  # patch means are predicted in units of this (intensities lie in [0, 1])
STATS_STD_FLOOR = 1e-3  # log std of a patch is log(std + this)


def patch_stats(patches: Tensor) -> Tensor:
    """(..., p^3) raw patch voxels -> (..., 2): mean / STATS_MEAN_SCALE and log(std + STATS_STD_FLOOR).

    What the per-patch normalised target hides: how bright and how textured the patch is, on
    scales where one unit is a visible difference.
    """
    mean = patches.mean(-1)
    std = patches.std(-1, unbiased=False)
    return torch.stack([mean / STATS_MEAN_SCALE, torch.log(std + STATS_STD_FLOOR)], dim=-1)


class NextTokenHead(nn.Module):
    """Linear map from a token (C) to the voxels of the next patch (p^3 * in_channels), normalised per patch.

    With `stats`, a second linear map predicts the next patch's `patch_stats` (brightness and texture),
    which the normalised voxels cannot show.
    """

    def __init__(self, cfg: ViT3DConfig, stats: bool = False):
        super().__init__()
        self.proj = nn.Linear(cfg.width, cfg.patch_size**3 * cfg.in_channels)
        self.stats = nn.Linear(cfg.width, 2) if stats else None
        init_weights(self.proj)
        if self.stats is not None:
            init_weights(self.stats)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L, C) -> (B, L, p^3 * in_channels)."""
        return self.proj(tokens)

    def forward_stats(self, tokens: Tensor) -> Tensor:
        """(B, L, C) -> (B, L, 2): predicted `patch_stats` of the next patch."""
        if self.stats is None:
            raise Ar3dInputError("this next-token head predicts no patch brightness (it was pretrained without it)")
        return self.stats(tokens)
