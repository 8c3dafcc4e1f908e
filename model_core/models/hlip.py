"""HLIP's study encoder: `ViT3D` blocks that attend within a slice, a scan or the whole study.

A study is S scans of one shape (X, Y, Z), read by `ViT3D.embed` as a sequence `(B, S, X, Y, Z)`:
the token sequence is [class] + the patches of scan 0 + ... + the patches of scan S-1 (z fastest
inside a scan, see `model_core.models.vit`). Every patch gets its fixed 3D sin-cos position plus
a fixed sin-cos *scan index* (the scan's place in the study, which the data shuffles), so nothing
here is learned beyond the encoder's own weights: the encoder config's `max_subvolumes` is the
most scans a study may have (HLIP: 40).

Each block has a scope (`SCOPES`), and runs on a partition of the tokens made by reshaping the
batch dimension, with no mask and no new parameter:
- "study": one partition per study, all 1 + S*n tokens;
- "scan": one per scan, its n = gx*gy*gz patch tokens;
- "slice": one per slab of a scan, one patch thick along z: its gx*gy tokens.
The class token is copied into every partition of a study and the copies are averaged back after
the block, so it sees the whole study whatever the scope. A token never attends outside its
partition. (Stochastic depth, when on, drops the residual of one partition, not of a whole study.)

Layouts (HLIP, for a 12-block encoder): "two-level" = scan, scan, study repeated (study attention in
blocks 2, 5, 8, 11, 0-based); "three-level" = slice, scan, study repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model_core.errors import Ar3dInputError
from model_core.models.vit import ViT3D
from model_core.vocabulary import MAX_STUDY_SCANS

SCOPES = ("slice", "scan", "study")
LAYOUTS = {"two-level": ("scan", "scan", "study"), "three-level": ("slice", "scan", "study")}
MAX_SCANS = MAX_STUDY_SCANS  # scans per study (the size of HLIP's scan-index table)


def block_scopes(layout: str | Sequence[str], depth: int) -> tuple[str, ...]:
    """One scope per block: a layout name or a pattern of scopes, repeated to `depth` blocks.

    A pattern as long as `depth` is taken as it is; "scan,study" on 4 blocks is scan, study, scan, study.
    """
    if isinstance(layout, str):
        pattern = LAYOUTS.get(layout) or tuple(s.strip() for s in layout.split(",") if s.strip())
    else:
        pattern = tuple(layout)
    bad = [s for s in pattern if s not in SCOPES]
    if not pattern or bad:
        raise Ar3dInputError(
            f"attention scopes {layout!r}: use a layout ({', '.join(LAYOUTS)}) or a comma-separated pattern of "
            f"{', '.join(SCOPES)}"
        )
    return tuple(pattern[i % len(pattern)] for i in range(depth))


def split_tokens(x: Tensor, scope: str, scans: int, grid: tuple[int, int, int]) -> Tensor:
    """(B, 1 + S*n, C) study tokens -> (B*P, 1 + m, C) partitions of `scope`, the class token copied into each."""
    if scope == "study":
        return x
    B, _, C = x.shape
    gx, gy, gz = grid
    cls, patches = x[:, :1], x[:, 1:]
    if scope == "scan":
        parts = patches.reshape(B * scans, gx * gy * gz, C)  # (B*S, n, C)
    else:  # slice: the patches of one z index, (a, b) raster inside
        parts = patches.reshape(B, scans, gx * gy, gz, C).transpose(2, 3).reshape(B * scans * gz, gx * gy, C)
    copies = cls.repeat_interleave(parts.shape[0] // B, dim=0)  # (B*P, 1, C)
    return torch.cat([copies, parts], dim=1)


def merge_tokens(parts: Tensor, scope: str, batch: int, scans: int, grid: tuple[int, int, int]) -> Tensor:
    """Inverse of `split_tokens`: (B*P, 1 + m, C) -> (B, 1 + S*n, C), the class-token copies averaged."""
    if scope == "study":
        return parts
    C = parts.shape[-1]
    gx, gy, gz = grid
    cls = parts[:, 0].reshape(batch, -1, C).mean(dim=1, keepdim=True)  # (B, 1, C)
    patches = parts[:, 1:]
    if scope == "slice":
        patches = patches.reshape(batch, scans, gz, gx * gy, C).transpose(2, 3)
    return torch.cat([cls, patches.reshape(batch, scans * gx * gy * gz, C)], dim=1)


def study_features(
    encoder: ViT3D, volumes: Tensor, scopes: Sequence[str], *, return_blocks: Sequence[int] = ()
) -> tuple[Tensor, list[Tensor]]:
    """Encode studies (B, S, X, Y, Z) with one attention scope per block (`block_scopes`).

    Returns the tokens after the final LayerNorm (B, 1 + S*n, C), class token first, and the outputs
    of the requested blocks (1-based), each (B, 1 + S*n, C).
    """
    if len(scopes) != encoder.cfg.depth:
        raise Ar3dInputError(f"{len(scopes)} attention scopes for an encoder of {encoder.cfg.depth} blocks")
    x = encoder.embed(volumes)  # (B, 1 + S*n, C); checks the shape and the number of scans
    batch, scans = volumes.shape[0], volumes.shape[1]
    grid = encoder.grid(volumes.shape[-3:])
    kept: dict[int, Tensor] = {}
    for number, (block, scope) in enumerate(zip(encoder.blocks, scopes), start=1):
        parts, _ = block(split_tokens(x, scope, scans, grid))
        x = merge_tokens(parts, scope, batch, scans, grid)
        if number in return_blocks:
            kept[number] = x
    return encoder.norm(x), [kept[b] for b in return_blocks]


class HLIPEncoder(nn.Module):
    """A `ViT3D` run with HLIP's per-block attention scopes; no parameter of its own.

    `encoder` is the plain ViT3D (its weights load and save as any encoder's); `layout` a name of
    `LAYOUTS` or a comma-separated pattern of `SCOPES`.
    """

    def __init__(self, encoder: ViT3D, layout: str | Sequence[str] = "two-level"):
        super().__init__()
        self.encoder = encoder
        self.scopes = block_scopes(layout, encoder.cfg.depth)

    @property
    def cfg(self):
        return self.encoder.cfg

    def forward(self, volumes: Tensor, *, return_blocks: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """(B, S, X, Y, Z) -> tokens (B, 1 + S*n, C) and the requested blocks' outputs; see `study_features`."""
        return study_features(self.encoder, volumes, self.scopes, return_blocks=return_blocks)
