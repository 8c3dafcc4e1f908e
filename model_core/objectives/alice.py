"""Alice on the `ViT3D` encoder: cross-patient views, an EMA teacher and CASA alignment (ICCV 2023).

A sample holds two views of the same anatomy from two patients (`model_core.data.anatomy`):
the query crop and the anchor crop, `volumes` (B, 2, X, Y, Z). Both views go through

- the student: encoder (the weights a checkpoint's "encoder." tensors hold), a light decoder and
  a projection head, on the *tube-masked* view: 75 % of a 16-voxel in-plane grid (X, Y) is masked
  and the mask repeats through depth (Z);
- the teacher: an EMA copy of the student's encoder, decoder and head on the unmasked view,
  without gradients. Its momentum rises from 0.996 to 1 on a cosine over the run (`after_step`,
  which the training loop calls after every optimizer step).

Heads (DINO style): a 3-layer MLP (2048 hidden, GELU) to a 256-wide bottleneck, L2-normalised,
then weight-normalised linear maps (norm fixed at 1) to 512 outputs: one for the start token
("cls"), one for patch tokens. CASA, one cross-attention + FFN layer (post-norm, as in the
official code), aligns patch features: its queries are the student's *encoder* patch features,
its keys / values the *decoder* patch features of the student or of the teacher, so both sides
are expressed on the same queries; each side's patch last layer then gives its outputs.

Losses, L = L_cls + L_patch + 10 * L_rec (the log holds the three terms unweighted):
- L_cls: cross-view DINO cross-entropy between the teacher's centred, sharpened softmax of one
  view's cls output and the student's log-softmax (temperature 0.1) of the other view's;
- L_patch: the same per token between the outputs of CASA(student queries, teacher decoder) and
  of CASA(student queries, student decoder), of the same view;
- L_rec: mean squared error between the student's reconstruction of each view and the unmasked
  view (every voxel of both views).
The teacher temperature warms up linearly from 0.04 to 0.07 over the first 30 % of the run; the
centres (one for cls, one for patch outputs) move with momentum 0.9 towards the teacher's batch
mean, averaged over all processes under DDP.

Where ViT3D forces a change from the official nnFormer code:
- nnFormer is a U-shaped Swin network whose decoder stage gives the "decoder tokens" and whose
  bottleneck pooling gives the cls feature. ViT3D is a plain ViT: the start token is the cls
  token, the encoder's patch tokens are the encoder tokens, and a light transformer decoder (2
  blocks at half the width, a linear map to voxels) gives the decoder tokens and the
  reconstruction, at patch resolution.
- nnFormer masks input voxels; here a masked patch's embedding is replaced by a learned mask
  token (plus its position), so the mask grid must be a multiple of the patch size.
- The official head's fixed input adapters (384 and 192 channels) become one linear map from the
  decoder width to the encoder width.
- CASA works on the L2-normalised bottleneck features (256) and the patch last layer follows it.
  The official code runs CASA on the 512 outputs and divides its LayerNorm output (values of
  several units) by the temperature 0.1; the softmax then saturates, and in our runs the patch
  loss fell to 0 with every token on one output within 4 steps. After the last layer the outputs
  keep DINO's bounded scale (cosines).
Not copied from the official code: its wrong `super()` call in the head, its unused
augmentation, and the halving of L_rec. Not done here: weight-decay and learning-rate scaling
schedules and freezing the last layer in the first epoch (the shared training loop owns the
optimiser).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model_core.errors import Ar3dInputError
from model_core.models.vit import Block, ViT3D, init_weights, sequence_pos_embed, unpatchify

TEACHER_PARTS = ("encoder", "decoder", "head")  # the student's modules the EMA teacher copies


@dataclass
class AliceOptions:
    """What an Alice run is beside its encoder (its checkpoint's "alice" head); sizes configurable for tests."""

    head_hidden: int = 2048  # projection MLP hidden width
    head_bottleneck: int = 256
    out_dim: int = 512  # outputs of the cls and patch heads
    decoder_width: int | None = None  # default: half the encoder width
    decoder_depth: int = 2
    decoder_heads: int | None = None  # default: the encoder's heads
    casa_heads: int = 8
    casa_hidden: int | None = None  # CASA FFN width; default 4 * head_bottleneck
    mask_ratio: float = 0.75  # of the in-plane mask grid cells
    mask_grid: int = 16  # in-plane mask cell edge in voxels (a multiple of the patch size)
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.3  # fraction of the run over which the teacher temperature warms up
    center_momentum: float = 0.9
    momentum: float = 0.996  # the EMA momentum at step 0; it rises to 1 on a cosine
    rec_weight: float = 10.0

    def __post_init__(self) -> None:
        for name in ("head_hidden", "head_bottleneck", "out_dim", "decoder_depth", "casa_heads", "mask_grid"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise Ar3dInputError(f"Alice option {name} must be a positive integer, got {value!r}")
        if self.head_bottleneck % self.casa_heads:
            raise Ar3dInputError(
                f"Alice head_bottleneck {self.head_bottleneck} is not divisible by casa_heads {self.casa_heads}")
        for name in ("mask_ratio", "center_momentum", "momentum", "teacher_temp_warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise Ar3dInputError(f"Alice option {name} must be in [0, 1), got {getattr(self, name)!r}")
        if min(self.student_temp, self.teacher_temp_start, self.teacher_temp) <= 0 or self.rec_weight < 0:
            raise Ar3dInputError("Alice temperatures must be positive and rec_weight must not be negative")

    @classmethod
    def from_dict(cls, d: dict) -> AliceOptions:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise Ar3dInputError(f"unknown Alice option(s) {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class NormedLinear(nn.Module):
    """Linear map without bias whose weight rows are L2-normalised at every call (weight norm with g = 1, frozen)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class AliceHead(nn.Module):
    """DINO-style projection: a shared MLP to an L2-normalised bottleneck; one last layer for cls, one for patches."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.cls_last = NormedLinear(bottleneck, out_dim)
        self.patch_last = NormedLinear(bottleneck, out_dim)

    def bottleneck(self, x: Tensor) -> Tensor:
        """(..., C) -> (..., bottleneck), L2-normalised."""
        return F.normalize(self.mlp(x), dim=-1)

    def cls(self, token: Tensor) -> Tensor:
        """(B, C) -> (B, out_dim)."""
        return self.cls_last(self.bottleneck(token))

    def patches(self, features: Tensor) -> Tensor:
        """(B, N, bottleneck) aligned patch features -> (B, N, out_dim)."""
        return self.patch_last(F.normalize(features, dim=-1))


class AliceDecoder(nn.Module):
    """Light transformer decoder on the encoder's tokens: decoder tokens for the head, voxels for L_rec."""

    def __init__(self, encoder_width: int, width: int, depth: int, heads: int, mlp_ratio: float, patch_voxels: int):
        super().__init__()
        if width < 1 or width % heads:
            raise Ar3dInputError(f"Alice decoder width {width} must be positive and divisible by its {heads} heads")
        self.embed = nn.Linear(encoder_width, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_voxels)  # decoder token -> the voxels of its patch
        self.to_head = nn.Linear(width, encoder_width)  # decoder token -> the head's input width
        self.apply(init_weights)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, 1+N, C) encoder tokens -> (B, N, D) decoder patch tokens."""
        x = self.embed(tokens)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)[:, 1:]


class CASA(nn.Module):
    """Cross-attention + FFN, post-norm: queries (B, Lq, D) attend to keys / values (B, Lk, D) -> (B, Lq, D)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_weights)

    def _split(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        return x.reshape(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, h, L, D/h)

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        B, L, D = queries.shape
        attended = F.scaled_dot_product_attention(self._split(self.q(queries)), self._split(self.k(keys)),
                                                  self._split(self.v(keys)))  # (B, h, Lq, D/h)
        x = self.norm1(queries + self.proj(attended.transpose(1, 2).reshape(B, L, D)))
        return self.norm2(x + self.ffn(x))


def tube_mask(batch: int, grid: tuple[int, int, int], cells: tuple[int, int], ratio: float,
              device: torch.device | None = None) -> Tensor:
    """(B, N) bool, True = masked: per sample, round(ratio * cx * cy) random in-plane cells, repeated through depth.

    grid: the patch grid (gx, gy, gz), tokens in C order (z fastest); cells: (cx, cy) in-plane mask
    cells, each covering (gx / cx) x (gy / cy) patches. At least one cell is masked and one kept.
    """
    gx, gy, gz = grid
    cx, cy = cells
    n_cells = cx * cy
    if n_cells < 2:
        raise Ar3dInputError(f"tube masking needs at least 2 in-plane cells, the view has {cx} x {cy}")
    masked = min(max(1, round(ratio * n_cells)), n_cells - 1)
    order = torch.rand(batch, n_cells, device=device).argsort(dim=1)
    cell_mask = (order < masked).reshape(batch, cx, 1, cy, 1)  # (B, cx, 1, cy, 1)
    patch_mask = cell_mask.expand(batch, cx, gx // cx, cy, gy // cy).reshape(batch, gx, gy, 1)
    return patch_mask.expand(batch, gx, gy, gz).reshape(batch, gx * gy * gz)


def dino_cross_entropy(student: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Mean over leading dims of -sum(teacher_probs * log_softmax(student / student_temp)) on the last dim."""
    return -(teacher_probs * F.log_softmax(student.float() / student_temp, dim=-1)).sum(dim=-1).mean()


class AliceObjective(nn.Module):
    """Alice on `encoder` (see the module docstring); `schedule_steps` sets the momentum and temperature schedules."""

    def __init__(self, encoder: ViT3D, schedule_steps: int = 1000, **options):
        super().__init__()
        self.options = AliceOptions.from_dict(options)
        opt, cfg = self.options, encoder.cfg
        if opt.mask_grid % cfg.patch_size:
            raise Ar3dInputError(
                f"Alice mask_grid {opt.mask_grid} must be a multiple of the patch size {cfg.patch_size}")
        if type(schedule_steps) is not int or schedule_steps < 1:
            raise Ar3dInputError(f"Alice schedule_steps must be a positive integer, got {schedule_steps!r}")
        self.schedule_steps = schedule_steps
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = AliceDecoder(cfg.width, opt.decoder_width or cfg.width // 2, opt.decoder_depth,
                                    opt.decoder_heads or cfg.heads, cfg.mlp_ratio, cfg.patch_size**3 * cfg.in_channels)
        self.head = AliceHead(cfg.width, opt.head_hidden, opt.head_bottleneck, opt.out_dim)
        self.casa = CASA(opt.head_bottleneck, opt.casa_heads, opt.casa_hidden or 4 * opt.head_bottleneck)
        self.teacher = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in TEACHER_PARTS})
        self.teacher.requires_grad_(False)
        self.register_buffer("center_cls", torch.zeros(1, opt.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, opt.out_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimizer steps done (for the schedules)

    def train(self, mode: bool = True) -> AliceObjective:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    # ------------------------------------------------------------------ schedules and the EMA

    def momentum_at(self, step: int) -> float:
        """EMA momentum at 0-based `step`: 1 - (1 - m0) * (1 + cos(pi * t)) / 2, t = step / schedule_steps in [0, 1]."""
        t = min(1.0, step / self.schedule_steps)
        return 1.0 - (1.0 - self.options.momentum) * 0.5 * (1.0 + math.cos(math.pi * t))

    def teacher_temp_at(self, step: int) -> float:
        """Teacher temperature at 0-based `step`: linear warm-up, then constant."""
        opt = self.options
        warmup = opt.teacher_temp_warmup * self.schedule_steps
        if step >= warmup:
            return opt.teacher_temp
        return opt.teacher_temp_start + (opt.teacher_temp - opt.teacher_temp_start) * step / warmup

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make the teacher a copy of the student (after the student's encoder was loaded from a checkpoint)."""
        for name in TEACHER_PARTS:
            self.teacher[name].load_state_dict(getattr(self, name).state_dict())

    @torch.no_grad()
    def after_step(self) -> None:
        """Move the teacher towards the student (momentum of this step); called after each optimizer step."""
        m = self.momentum_at(int(self.step))
        for name in TEACHER_PARTS:
            for s, t in zip(getattr(self, name).parameters(), self.teacher[name].parameters()):
                t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        self.step += 1

    @torch.no_grad()
    def update_centers(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """EMA of the teacher's batch means (all processes): teacher_cls (B, D), teacher_patch (B, N, D)."""
        means = torch.cat([teacher_cls.float().mean(0), teacher_patch.float().mean((0, 1))])  # (2D,)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        m, D = self.options.center_momentum, self.options.out_dim
        self.center_cls.mul_(m).add_(means[:D][None], alpha=1 - m)
        self.center_patch.mul_(m).add_(means[D:][None, None], alpha=1 - m)

    # ------------------------------------------------------------------ forward

    def views(self, volumes: Tensor) -> Tensor:
        """(B, 2, X, Y, Z) (or (B, 2, C, X, Y, Z)) -> (2B, 1, C, X, Y, Z): every query view, then every anchor view."""
        seq = self.encoder.sequence(volumes)  # (B, S, C, X, Y, Z), checked
        if seq.shape[1] != 2:
            raise Ar3dInputError(f"Alice takes two views per sample (query, anchor), got {seq.shape[1]}: "
                                 f"volumes of shape {tuple(volumes.shape)}")
        return seq.transpose(0, 1).flatten(0, 1).unsqueeze(1)

    def mask(self, views: Tensor) -> Tensor:
        """(2B, 1, C, X, Y, Z) -> (2B, N) tube mask (True = masked)."""
        X, Y = views.shape[-3:-1]
        g = self.options.mask_grid
        if X % g or Y % g:
            raise Ar3dInputError(f"Alice views of in-plane size {X} x {Y} are not a multiple of the mask grid {g}")
        grid = self.encoder.grid(views.shape[-3:])
        return tube_mask(views.shape[0], grid, (X // g, Y // g), self.options.mask_ratio, views.device)

    def student(self, views: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Masked views -> cls outputs (2B, D), encoder and decoder patch features (2B, N, K) (K the
        bottleneck), reconstruction (2B, C, X, Y, Z)."""
        x = self.encoder.embed(views)  # (2B, 1+N, C), positions added
        pos = sequence_pos_embed(self.encoder.grid(views.shape[-3:]), 1, x.shape[-1], x.device)  # (N, C)
        fill = (self.mask_token + pos).to(x.dtype)  # (1, N, C)
        x = torch.cat([x[:, :1], torch.where(mask[..., None], fill, x[:, 1:])], dim=1)
        tokens, _ = self.encoder.forward_tokens(x)  # (2B, 1+N, C)
        decoded = self.decoder(tokens)  # (2B, N, D_dec)
        cfg = self.encoder.cfg
        recon = unpatchify(self.decoder.pred(decoded), cfg.patch_size, self.encoder.grid(views.shape[-3:]),
                           cfg.in_channels)
        dec_features = self.head.bottleneck(self.decoder.to_head(decoded))
        return self.head.cls(tokens[:, 0]), self.head.bottleneck(tokens[:, 1:]), dec_features, recon

    @torch.no_grad()
    def teacher_outputs(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """Unmasked views -> the teacher's cls outputs (2B, D) and decoder patch features (2B, N, K)."""
        tokens, _ = self.teacher["encoder"].forward_features(views)
        decoded = self.teacher["decoder"](tokens)
        head = self.teacher["head"]
        return head.cls(tokens[:, 0]), head.bottleneck(self.teacher["decoder"].to_head(decoded))

    def forward(self, volumes: Tensor) -> dict[str, Tensor]:
        """volumes (B, 2, X, Y, Z): query and anchor views -> {"loss", "loss_cls", "loss_patch", "loss_rec", "mask"}."""
        views = self.views(volumes)  # (2B, 1, C, X, Y, Z)
        mask = self.mask(views)  # (2B, N)
        s_cls, s_enc, s_dec, recon = self.student(views, mask)
        t_cls, t_dec = self.teacher_outputs(views)
        s_aligned = self.head.patches(self.casa(s_enc, s_dec))  # (2B, N, D)
        with torch.no_grad():
            t_aligned = self.teacher["head"].patches(self.casa(s_enc.detach(), t_dec))
        temp = self.teacher_temp_at(int(self.step))
        t_cls_probs = F.softmax((t_cls.float() - self.center_cls) / temp, dim=-1)
        t_patch_probs = F.softmax((t_aligned.float() - self.center_patch) / temp, dim=-1)
        B = volumes.shape[0]
        opt = self.options
        loss_cls = 0.5 * (dino_cross_entropy(s_cls[B:], t_cls_probs[:B], opt.student_temp)
                          + dino_cross_entropy(s_cls[:B], t_cls_probs[B:], opt.student_temp))
        loss_patch = dino_cross_entropy(s_aligned, t_patch_probs, opt.student_temp)
        loss_rec = F.mse_loss(recon.float(), views[:, 0].float())
        if self.training:
            self.update_centers(t_cls, t_aligned)
        loss = loss_cls + loss_patch + opt.rec_weight * loss_rec
        return {"loss": loss, "loss_cls": loss_cls, "loss_patch": loss_patch, "loss_rec": loss_rec, "mask": mask}
