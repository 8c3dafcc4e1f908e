"""Pretraining objectives on the `ViT3D` encoder: autoregressive next-token prediction and an MAE baseline.

Both regress raw patch voxels normalised per patch (subtract the patch mean, divide by its std),
with a mean-squared error. Tokens follow the encoder's order (see `model_core.models.vit`): sub-volume
after sub-volume, a z-fastest raster inside each. Below, N = S*n patch tokens per sample and the
start token sits at sequence position 0, so patch token k (1-based) sits at position k.

Autoregressive objective (AR-SSL4M, "random startup"): per sample a prefix length P is drawn
uniformly from [0, N); positions 0..P attend to each other bidirectionally, later ones causally.
The output at position t predicts patch token t+1. Predictions of tokens 1..P could copy their
target from the prefix, so the loss counts only tokens P+1..N.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model_core.errors import Ar3dInputError
from model_core.models.vit import (
    Block,
    NextTokenHead,
    ViT3D,
    init_weights,
    patch_stats,
    sequence_pos_embed,
)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per patch (last dim): (x - mean) / sqrt(var + eps), var the population variance. Shape unchanged."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def sample_prefix_len(batch: int, n_tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) long prefix lengths drawn uniformly from [0, n_tokens) (on the generator's device, CPU by default)."""
    if batch < 1 or n_tokens < 1:
        raise Ar3dInputError(f"cannot draw prefix lengths for batch {batch} and {n_tokens} tokens; both must be >= 1")
    device = generator.device if generator is not None else None
    return torch.randint(0, n_tokens, (batch,), generator=generator, device=device)


class AutoregressiveObjective(nn.Module):
    """Next-token prediction with a random prefix (AR-SSL4M). Owns a `NextTokenHead` on top of `encoder`.

    stats_weight > 0 adds the next patch's brightness and texture (`patch_stats`, which the normalised
    target removes) as a second regression, weighted so; the surprise map needs it to see brightness.
    0 is the paper's objective.
    """

    def __init__(self, encoder: ViT3D, stats_weight: float = 0.0):
        super().__init__()
        if not 0 <= stats_weight:
            raise Ar3dInputError(f"stats_weight must be >= 0, got {stats_weight!r}")
        self.encoder = encoder
        self.stats_weight = float(stats_weight)
        self.head = NextTokenHead(encoder.cfg, stats=stats_weight > 0)

    def patchify(self, volumes: Tensor) -> Tensor:
        """(B, S, X, Y, Z) -> (B, N, p^3*C) voxels of every patch token, in sequence order."""
        return self.encoder.patchify(volumes)

    def forward_encoder(self, volumes: Tensor, prefix_len: Tensor) -> Tensor:
        """(B, S, X, Y, Z), (B,) -> (B, 1+N, C) tokens under the prefix-causal mask."""
        tokens, _ = self.encoder.forward_features(volumes, mode="prefix", prefix_len=prefix_len)
        return tokens

    def forward_head(self, tokens: Tensor) -> Tensor:
        """(B, 1+N, C) -> (B, N, p^3*C): the output at positions 0..N-1 predicts patch tokens 1..N."""
        return self.head(tokens[:, :-1])

    def forward_loss(self, pred: Tensor, target: Tensor, prefix_len: Tensor) -> Tensor:
        """MSE over the tokens after each sample's prefix.

        pred, target: (B, N, D) with D = p^3*C (voxels) or 2 (stats); prefix_len: (B,). Per token, the
        squared error is averaged over its D values; the loss is the mean of that over all counted
        tokens in the batch (tokens P_b+1..N of every sample b, 1-based), so a sample counts in
        proportion to its N - P_b tokens.
        """
        per_token = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, N)
        index = torch.arange(pred.shape[1], device=pred.device)  # 0-based index t is patch token t+1
        counted = index[None, :] >= prefix_len[:, None]  # (B, N): t+1 > P
        return (per_token * counted).sum() / counted.sum()

    def forward(self, volumes: Tensor, prefix_len: Tensor | None = None) -> dict[str, Tensor]:
        """volumes (B, S, X, Y, Z); prefix_len (B,) long in [0, N), drawn by `sample_prefix_len` when None.

        Returns {"loss": scalar, "pred": (B, N, p^3*C), "target": (B, N, p^3*C) normalised, "prefix_len": (B,)}.
        """
        patches = self.patchify(volumes)  # (B, N, p^3*C)
        target = normalize_patches(patches)
        B, N = target.shape[:2]
        if prefix_len is None:
            prefix_len = sample_prefix_len(B, N)
        elif prefix_len.shape != (B,) or prefix_len.dtype.is_floating_point or prefix_len.dtype == torch.bool:
            raise Ar3dInputError(
                f"prefix_len must be an integer tensor of shape ({B},), "
                f"got {prefix_len.dtype} {tuple(prefix_len.shape)}"
            )
        elif prefix_len.min() < 0 or prefix_len.max() >= N:
            raise Ar3dInputError(f"prefix_len must be in [0, {N}) for {N} patch tokens, got {prefix_len.tolist()}")
        prefix_len = prefix_len.to(device=target.device, dtype=torch.long)
        tokens = self.forward_encoder(volumes, prefix_len)
        pred = self.forward_head(tokens)
        loss = self.forward_loss(pred, target, prefix_len)
        out = {"loss": loss, "pred": pred, "target": target, "prefix_len": prefix_len}
        if self.stats_weight:
            stats_loss = self.forward_loss(self.head.forward_stats(tokens[:, :-1]), patch_stats(patches), prefix_len)
            out.update(loss=loss + self.stats_weight * stats_loss, loss_pattern=loss, loss_stats=stats_loss)
        return out


class MaskedAutoencoderObjective(nn.Module):
    """MAE baseline on the same encoder (bidirectional): the encoder sees the start token and the
    visible patch tokens; a light decoder fills in the masked ones; loss on masked tokens only."""

    def __init__(
        self,
        encoder: ViT3D,
        mask_ratio: float = 0.75,
        decoder_width: int | None = None,
        decoder_depth: int = 4,
        decoder_heads: int | None = None,
    ):
        """`decoder_width` defaults to half the encoder width, `decoder_heads` to the encoder's heads."""
        super().__init__()
        cfg = encoder.cfg
        width = decoder_width if decoder_width is not None else cfg.width // 2
        heads = decoder_heads if decoder_heads is not None else cfg.heads
        if not 0 < mask_ratio < 1:
            raise Ar3dInputError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if width < 6 or width % heads or decoder_depth < 1:
            raise Ar3dInputError(
                f"MAE decoder width {width} must be >= 6 and divisible by its {heads} heads, depth {decoder_depth} >= 1"
            )
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.decoder_embed = nn.Linear(cfg.width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_blocks = nn.ModuleList(Block(width, heads, cfg.mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_pred = nn.Linear(width, cfg.patch_size**3 * cfg.in_channels)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, volumes: Tensor) -> Tensor:
        """(B, S, X, Y, Z) -> (B, N, p^3*C) voxels of every patch token, in sequence order."""
        return self.encoder.patchify(volumes)

    def random_masking(self, batch: int, n_tokens: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample, keep a random int(N * (1 - mask_ratio)) tokens (at least 1).

        Returns ids_keep (B, K), mask (B, N) bool with True = masked, ids_restore (B, N).
        """
        keep = max(1, int(n_tokens * (1 - self.mask_ratio)))
        if keep >= n_tokens:
            raise Ar3dInputError(f"{n_tokens} patch token(s) leave nothing to mask at mask_ratio {self.mask_ratio}")
        ids_shuffle = torch.rand(batch, n_tokens, device=device).argsort(dim=1)  # (B, N)
        ids_restore = ids_shuffle.argsort(dim=1)
        mask = torch.ones(batch, n_tokens, dtype=torch.bool, device=device)
        mask[:, :keep] = False
        return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, volumes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, S, X, Y, Z) -> latent (B, 1+K, C) of the start + visible tokens, mask (B, N), ids_restore (B, N)."""
        x = self.encoder.embed(volumes)  # (B, 1+N, C), positions already added
        B, L, C = x.shape
        ids_keep, mask, ids_restore = self.random_masking(B, L - 1, x.device)
        visible = torch.gather(x[:, 1:], 1, ids_keep[..., None].expand(-1, -1, C))  # (B, K, C)
        latent, _ = self.encoder.forward_tokens(torch.cat([x[:, :1], visible], dim=1))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, volumes: Tensor) -> Tensor:
        """latent (B, 1+K, C), ids_restore (B, N) -> pred (B, N, p^3*C) for every patch token."""
        x = self.decoder_embed(latent)  # (B, 1+K, D)
        B, N = ids_restore.shape
        D = x.shape[-1]
        fill = self.mask_token.to(x.dtype).expand(B, N - (x.shape[1] - 1), -1)  # (B, N-K, D)
        patches = torch.cat([x[:, 1:], fill], dim=1)  # (B, N, D) in shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, D))  # sequence order
        seq = self.encoder.sequence(volumes)
        pos = sequence_pos_embed(self.encoder.grid(seq.shape[-3:]), seq.shape[1], D, x.device)  # (N, D)
        x = torch.cat([x[:, :1], patches + pos.to(x.dtype)], dim=1)  # (B, 1+N, D)
        for block in self.decoder_blocks:
            x, _ = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """pred, target (B, N, p^3*C), mask (B, N) True = masked -> MSE averaged over all masked tokens."""
        per_token = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, N)
        return (per_token * mask).sum() / mask.sum()

    def forward(self, volumes: Tensor) -> dict[str, Tensor]:
        """volumes (B, S, X, Y, Z) -> {"loss", "pred" (B, N, p^3*C), "target" normalised, "mask" (B, N)}."""
        target = normalize_patches(self.patchify(volumes))
        latent, mask, ids_restore = self.forward_encoder(volumes)
        pred = self.forward_decoder(latent, ids_restore, volumes)
        return {"loss": self.forward_loss(pred, target, mask), "pred": pred, "target": target, "mask": mask}
