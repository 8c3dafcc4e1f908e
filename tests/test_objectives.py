"""Pretraining objectives: the AR loss counts only post-prefix tokens, prefix sampling, MAE masking, overfitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_core.errors import Ar3dInputError
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.autoregressive import (
    AutoregressiveObjective,
    MaskedAutoencoderObjective,
    normalize_patches,
    sample_prefix_len,
)
from model_core.objectives.registry import build_objective

P = 4
TINY = dict(patch_size=P, width=32, depth=2, heads=2)


def tiny_encoder(**overrides) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(ViT3DConfig(**{**TINY, **overrides}))


class ZeroHead(nn.Module):
    """Stands in for the next-token head: predicts 0 for every voxel."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.new_zeros(*tokens.shape[:2], P**3)


def test_ar_forward_loss_counts_only_tokens_after_the_prefix():
    obj = AutoregressiveObjective(tiny_encoder())
    pred = torch.zeros(2, 4, 1)
    target = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])[..., None]  # (B, N, 1)
    prefix = torch.tensor([1, 3])  # sample 0 counts tokens 2..4, sample 1 counts token 4
    loss = obj.forward_loss(pred, target, prefix)
    assert loss.item() == pytest.approx((2**2 + 3**2 + 4**2 + 8**2) / 4)  # mean over the 4 counted tokens
    garbage = pred.clone()
    garbage[0, :1] = 100.0  # predictions of prefix tokens
    garbage[1, :3] = -100.0
    assert obj.forward_loss(garbage, target, prefix).item() == pytest.approx(loss.item())
    garbage[1, 3] = 8.0  # the first counted prediction of sample 1 is now exact
    assert obj.forward_loss(garbage, target, prefix).item() == pytest.approx((2**2 + 3**2 + 4**2) / 4)


def test_ar_loss_end_to_end_with_a_known_head():
    obj = AutoregressiveObjective(tiny_encoder())
    obj.head = ZeroHead()
    torch.manual_seed(1)
    volume = torch.zeros(8, 8, 8)  # 8 patches: the first 4 (x < 4) vary, the last 4 are constant
    volume[:4] = torch.randn(4, 8, 8)
    volume[4:] = 3.0
    volumes = volume.expand(2, 1, 8, 8, 8)
    out = obj(volumes, prefix_len=torch.tensor([0, 4]))
    # With a zero prediction a varying patch costs mean(target^2) = var / (var + eps) ~ 1, a constant one 0.
    # Sample 0 counts all 8 tokens (4 varying); sample 1 counts tokens 5..8 (all constant): 4 / 12.
    assert out["loss"].item() == pytest.approx(4 / 12, rel=1e-4)
    assert out["pred"].shape == out["target"].shape == (2, 8, P**3)
    assert torch.equal(out["prefix_len"], torch.tensor([0, 4]))


def test_ar_prediction_depends_only_on_earlier_tokens():
    obj = AutoregressiveObjective(tiny_encoder()).eval()
    torch.manual_seed(2)
    volumes = torch.randn(1, 2, 8, 8, 8)  # N = 16
    with torch.no_grad():
        for prefix in (0, 6):
            base = obj(volumes, prefix_len=torch.tensor([prefix]))["pred"][0]
            for token in (3, 6, 9, 16):  # 1-based; token 9 opens sub-volume 1
                s, idx = divmod(token - 1, 8)
                a, rest = divmod(idx, 4)
                b, c = divmod(rest, 2)
                changed = volumes.clone()
                changed[0, s, a * P : (a + 1) * P, b * P : (b + 1) * P, c * P : (c + 1) * P] += 1.0
                pred = obj(changed, prefix_len=torch.tensor([prefix]))["pred"][0]
                moved = (pred - base).abs().amax(dim=-1) > 1e-6  # (16,): prediction of token t+1 moved
                # pred[t] is the output at position t, which sees token k iff k <= max(t, P)
                expected = torch.tensor([token <= max(t, prefix) for t in range(16)])
                assert torch.equal(moved, expected), (prefix, token, moved)


def test_sample_prefix_len_is_uniform_on_0_to_n_minus_1():
    gen = torch.Generator().manual_seed(0)
    draws = sample_prefix_len(20000, 10, generator=gen)
    assert draws.shape == (20000,) and draws.dtype == torch.long
    assert draws.min().item() == 0 and draws.max().item() == 9
    counts = torch.bincount(draws, minlength=10).float()
    assert ((counts - 2000).abs() < 300).all(), counts  # ~7 standard deviations
    again = sample_prefix_len(20000, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    with pytest.raises(Ar3dInputError, match="0 tokens"):
        sample_prefix_len(2, 0)


def test_ar_draws_prefix_when_none_given():
    obj = AutoregressiveObjective(tiny_encoder())
    torch.manual_seed(3)
    seen = torch.cat([obj(torch.randn(8, 1, 8, 8, 8))["prefix_len"] for _ in range(8)])
    assert seen.min() >= 0 and seen.max() <= 7 and len(set(seen.tolist())) > 4
    with pytest.raises(Ar3dInputError, match=r"\[0, 8\)"):
        obj(torch.randn(2, 1, 8, 8, 8), prefix_len=torch.tensor([0, 8]))


def test_normalize_patches():
    torch.manual_seed(4)
    patches = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 100 + torch.randn(3, 5, 1) * 1000
    out = normalize_patches(patches)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-4, rtol=0)
    flat = normalize_patches(torch.full((1, 1, 64), 7.0))
    assert torch.equal(flat, torch.zeros(1, 1, 64))


def overfit(obj: nn.Module, volumes: torch.Tensor, steps: int, evaluate) -> tuple[float, float]:
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    before = evaluate()
    for _ in range(steps):
        loss = obj(volumes)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, evaluate()


def test_ar_overfits_a_fixed_batch():
    obj = AutoregressiveObjective(tiny_encoder(width=64))
    torch.manual_seed(5)
    volumes = torch.randn(2, 1, 8, 8, 16)  # 16 tokens each, prefix drawn anew every step

    @torch.no_grad()
    def evaluate() -> float:
        return obj(volumes, prefix_len=torch.zeros(2, dtype=torch.long))["loss"].item()  # plain causal

    before, after = overfit(obj, volumes, 200, evaluate)
    assert after < before / 10, (before, after)


def test_mae_overfits_a_fixed_batch():
    obj = MaskedAutoencoderObjective(tiny_encoder(width=64), decoder_width=32, decoder_depth=2)
    torch.manual_seed(6)
    volumes = torch.randn(2, 1, 8, 8, 16)

    @torch.no_grad()
    def evaluate() -> float:
        with torch.random.fork_rng():
            torch.manual_seed(7)  # the same mask before and after
            return obj(volumes)["loss"].item()

    before, after = overfit(obj, volumes, 300, evaluate)
    assert after < before / 10, (before, after)


def test_mae_masks_75_percent_and_scores_only_masked_tokens():
    obj = MaskedAutoencoderObjective(tiny_encoder())
    torch.manual_seed(8)
    out = obj(torch.randn(4, 2, 8, 8, 8))  # N = 16
    mask = out["mask"]
    assert mask.shape == (4, 16) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [12] * 4
    assert len({tuple(row.tolist()) for row in mask}) > 1  # a different mask per sample
    expected = ((out["pred"] - out["target"]) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(out["loss"], expected)
    garbage = out["pred"].detach().clone()
    garbage[~mask] = 100.0
    torch.testing.assert_close(obj.forward_loss(garbage, out["target"], mask), out["loss"].detach())


@torch.no_grad()
def test_mae_encoder_sees_only_visible_tokens():
    obj = MaskedAutoencoderObjective(tiny_encoder()).eval()
    torch.manual_seed(9)
    volumes = torch.randn(1, 1, 8, 8, 8)  # 8 patches, 2 visible

    def encode(v: torch.Tensor):
        with torch.random.fork_rng():
            torch.manual_seed(10)
            return obj.forward_encoder(v)

    latent, mask, _ = encode(volumes)
    assert latent.shape == (1, 1 + 2, 32)
    patches = torch.arange(8).reshape(2, 2, 2)
    for token, masked in enumerate(mask[0].tolist()):
        a, b, c = (int(i) for i in torch.nonzero(patches == token)[0])
        changed = volumes.clone()
        changed[0, 0, a * P : (a + 1) * P, b * P : (b + 1) * P, c * P : (c + 1) * P] += 1.0
        moved = (encode(changed)[0] - latent).abs().max().item() > 1e-6
        assert moved != masked, (token, masked)


def test_build_objective():
    enc = tiny_encoder()
    assert isinstance(build_objective("ar", enc), AutoregressiveObjective)
    mae = build_objective("mae", enc, mask_ratio=0.5)
    assert isinstance(mae, MaskedAutoencoderObjective)
    assert mae(torch.randn(1, 1, 8, 8, 8))["mask"].sum().item() == 4
    with pytest.raises(Ar3dInputError, match="simclr"):
        build_objective("simclr", enc)
    with pytest.raises(Ar3dInputError, match="1.5"):
        build_objective("mae", enc, mask_ratio=1.5)
