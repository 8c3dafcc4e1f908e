"""The segmentation objective: Dice + cross-entropy on annotated voxels, and layer-wise lr decay.

`SegmentationObjective` is what the training loop trains when fine-tuning; `layer_decay_groups`
gives full-mode fine-tuning its optimizer groups (0.75 per block from the top, as in AR-SSL4M / BEiT).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import Tensor, nn

from model_core.models.segmentation import SegmentationModel, segmentation_logits
from model_core.vocabulary import IGNORE


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
