"""The 3D ViT encoder: attention masks (by perturbation), token order, positions, configs, shapes."""

from __future__ import annotations

import pytest
import torch

from model_core.errors import Ar3dInputError, CheckpointError
from model_core.models.vit import (
    Block,
    NextTokenHead,
    ViT3D,
    ViT3DConfig,
    patchify,
    sequence_pos_embed,
    sincos_pos_embed_3d,
    unpatchify,
)

P = 4  # patch edge of the tiny test encoder
TINY = dict(patch_size=P, width=32, depth=2, heads=2)


@pytest.fixture
def encoder() -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(ViT3DConfig(**TINY)).eval()


def perturb_token(volumes: torch.Tensor, token: int, p: int = P) -> torch.Tensor:
    """Copy of volumes (B, S, X, Y, Z) with noise added to the voxels of patch token `token` (1-based),
    located from the documented order: sub-volume major, then a C-order raster with z fastest."""
    _, _, X, Y, Z = volumes.shape
    gy, gz = Y // p, Z // p
    n = (X // p) * gy * gz
    s, idx = divmod(token - 1, n)
    a, rest = divmod(idx, gy * gz)
    b, c = divmod(rest, gz)
    out = volumes.clone()
    out[:, s, a * p : (a + 1) * p, b * p : (b + 1) * p, c * p : (c + 1) * p] += torch.randn(p, p, p)
    return out


def changed_positions(before: torch.Tensor, after: torch.Tensor) -> list[set[int]]:
    """Per sample, the sequence positions whose output changed."""
    diff = (before - after).abs().amax(dim=-1)  # (B, L)
    return [set(torch.nonzero(row > 1e-6).flatten().tolist()) for row in diff]


@torch.no_grad()
def test_prefix_mask_by_perturbation(encoder):
    torch.manual_seed(1)
    volumes = torch.randn(3, 2, 8, 8, 8)  # 2 sub-volumes of 8 patches: N = 16, L = 17
    N, L = 16, 17
    prefix = torch.tensor([0, 5, 11])  # plain causal, a prefix inside sub-volume 0, one reaching into sub-volume 1
    base, _ = encoder.forward_features(volumes, mode="prefix", prefix_len=prefix)
    for token in range(1, N + 1):
        out, _ = encoder.forward_features(perturb_token(volumes, token), mode="prefix", prefix_len=prefix)
        for b, seen in enumerate(changed_positions(base, out)):
            if token <= prefix[b]:  # inside the prefix: every position sees it
                expected = set(range(L))
            else:  # after the prefix: only itself and later positions
                expected = set(range(token, L))
            assert seen == expected, (b, token, sorted(seen))


@torch.no_grad()
def test_bidirectional_every_position_sees_every_token(encoder):
    torch.manual_seed(2)
    volumes = torch.randn(2, 2, 8, 8, 8)
    base, _ = encoder.forward_features(volumes)
    for token in (1, 8, 9, 16):  # first and last patch of both sub-volumes
        out, _ = encoder.forward_features(perturb_token(volumes, token))
        assert changed_positions(base, out) == [set(range(17))] * 2


@torch.no_grad()
def test_full_prefix_equals_bidirectional_and_no_prefix_is_causal(encoder):
    torch.manual_seed(3)
    volumes = torch.randn(2, 1, 8, 8, 8)  # N = 8
    bidir, _ = encoder.forward_features(volumes)
    full, _ = encoder.forward_features(volumes, mode="prefix", prefix_len=torch.tensor([8, 8]))
    torch.testing.assert_close(full, bidir, atol=1e-5, rtol=1e-5)
    causal, _ = encoder.forward_features(volumes, mode="prefix")
    zero, _ = encoder.forward_features(volumes, mode="prefix", prefix_len=torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(causal, zero)
    assert (causal - bidir).abs().max() > 1e-3


def test_causal_gradient_reaches_only_earlier_patches(encoder):
    volumes = torch.randn(1, 1, 8, 8, 8, requires_grad=True)  # 8 patches
    tokens, _ = encoder.forward_features(volumes, mode="prefix", prefix_len=torch.tensor([0]))
    # A fixed random read-out: the plain sum of a layer-normed token is 0 whatever the input, so its
    # gradient is only rounding noise (which made this test pass or fail by CPU).
    readout = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(0))
    (tokens[0, 3] * readout).sum().backward()  # position 3 sees patch tokens 1..3
    grad = patchify(volumes.grad[:, 0:1], P)[0].abs().amax(dim=-1)  # (8,) per patch token
    assert (grad[:3] > 0).all() and (grad[3:] == 0).all(), grad


def test_patchify_unpatchify_round_trip():
    x = torch.randn(2, 3, 8, 12, 16)
    t = patchify(x, 4)
    assert t.shape == (2, 2 * 3 * 4, 4**3 * 3)
    assert torch.equal(unpatchify(t, 4, (2, 3, 4), channels=3), x)


def test_token_order_within_a_volume():
    gx, gy, gz = 2, 3, 4
    a, b, c = torch.meshgrid(torch.arange(gx * P), torch.arange(gy * P), torch.arange(gz * P), indexing="ij")
    patch_index = ((a // P) * gy + b // P) * gz + c // P  # C order, z fastest
    offset = ((a % P) * P + b % P) * P + c % P  # voxel order inside a patch
    t = patchify(patch_index[None, None].float(), P)[0]  # (24, 64)
    assert torch.equal(t, torch.arange(24.0)[:, None].expand(24, P**3))
    t = patchify(offset[None, None].float(), P)[0]
    assert torch.equal(t, torch.arange(float(P**3))[None].expand(24, P**3))


def test_token_order_is_sub_volume_major(encoder):
    n = 8  # (2, 2, 2) patches per 8^3 sub-volume
    a, b, c = torch.meshgrid(*(torch.arange(8),) * 3, indexing="ij")
    patch_index = ((a // P) * 2 + b // P) * 2 + c // P
    volumes = torch.stack([s * n + patch_index for s in range(3)])[None].float()  # (1, 3, 8, 8, 8)
    t = encoder.patchify(volumes)[0]  # (24, 64)
    assert torch.equal(t, torch.arange(24.0)[:, None].expand(24, P**3))


def test_multichannel_input_and_head():
    cfg = ViT3DConfig(**TINY, in_channels=2)
    enc = ViT3D(cfg)
    volumes = torch.randn(2, 3, 2, 8, 8, 8)  # (B, S, C, X, Y, Z)
    tokens, _ = enc.forward_features(volumes)
    assert tokens.shape == (2, 1 + 3 * 8, 32)
    assert NextTokenHead(cfg)(tokens).shape == (2, 25, 2 * P**3)
    voxels = enc.patchify(volumes)  # channel fastest inside a patch
    assert torch.equal(voxels[0, 8, 1::2], volumes[0, 1, 1, :4, :4, :4].reshape(-1))


@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 3, 4), (4, 4, 4), (8, 2, 1)])
@pytest.mark.parametrize("dim", [32, 48, 192])
def test_sincos_pos_embed_3d(grid, dim):
    emb = sincos_pos_embed_3d(grid, dim)
    n = grid[0] * grid[1] * grid[2]
    assert emb.shape == (n, dim) and torch.isfinite(emb).all()
    if n > 1:
        dist = torch.cdist(emb, emb) + torch.eye(n) * 1e9
        assert dist.min() > 1e-3  # distinct rows
    assert torch.equal(emb, sincos_pos_embed_3d(grid, dim))
    # a patch keeps its embedding whatever the grid: row (a, b, c) of this grid = row (a, b, c) of an 8^3 grid
    big = sincos_pos_embed_3d((8, 8, 8), dim)
    a, b, c = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    torch.testing.assert_close(emb, big[((a * 8 + b) * 8 + c).flatten()])


def test_sub_volumes_are_distinguishable():
    emb = sequence_pos_embed((2, 2, 2), 4, 32)  # (32, 32)
    assert emb.shape == (32, 32)
    dist = torch.cdist(emb, emb) + torch.eye(32) * 1e9
    assert dist.min() > 1e-3
    assert torch.equal(emb[:8], sequence_pos_embed((2, 2, 2), 1, 32))  # sub-volume 0 = a plain volume


def test_presets():
    base = ViT3DConfig.preset("base")
    assert (base.depth, base.width, base.heads, base.patch_size) == (12, 768, 12, 16)
    block = Block(base.width, base.heads, base.mlp_ratio)
    assert block.mlp[0].out_features == 3072
    assert (ViT3DConfig.preset("tiny").width, ViT3DConfig.preset("tiny").heads) == (192, 3)
    assert (ViT3DConfig.preset("small").width, ViT3DConfig.preset("small").heads) == (384, 6)
    assert ViT3DConfig.preset("small", patch_size=8).patch_size == 8
    with pytest.raises(Ar3dInputError, match="huge"):
        ViT3DConfig.preset("huge")
    with pytest.raises(Ar3dInputError, match="colour"):
        ViT3DConfig.preset("tiny", colour=3)


def test_config_dict_round_trip_and_errors():
    cfg = ViT3DConfig(**TINY, drop_path=0.1)
    assert ViT3DConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CheckpointError, match="n_layers"):
        ViT3DConfig.from_dict({**cfg.to_dict(), "n_layers": 3})
    with pytest.raises(CheckpointError, match="heads"):
        ViT3DConfig.from_dict({**cfg.to_dict(), "heads": 5})
    with pytest.raises(Ar3dInputError, match="width 30 is not divisible by heads 4"):
        ViT3DConfig(width=30, heads=4)


@torch.no_grad()
def test_return_blocks(encoder):
    volumes = torch.randn(2, 1, 8, 8, 8)
    tokens, blocks = encoder.forward_features(volumes, return_blocks=(2, 1))
    x = encoder.embed(volumes)
    first, _ = encoder.blocks[0](x)
    second, _ = encoder.blocks[1](first)
    assert len(blocks) == 2
    torch.testing.assert_close(blocks[0], second)
    torch.testing.assert_close(blocks[1], first)
    torch.testing.assert_close(tokens, encoder.norm(second))
    for bad in (0, 3):
        with pytest.raises(Ar3dInputError, match=str(bad)):
            encoder.forward_features(volumes, return_blocks=(bad,))


@torch.no_grad()
@pytest.mark.parametrize("mode,prefix", [("bidirectional", None), ("prefix", torch.tensor([0, 3]))])
def test_return_attention_matches_sdpa(encoder, mode, prefix):
    volumes = torch.randn(2, 2, 8, 8, 8)
    fast, fast_blocks = encoder.forward_features(volumes, mode=mode, prefix_len=prefix, return_blocks=(1,))
    slow, slow_blocks, attn = encoder.forward_features(
        volumes, mode=mode, prefix_len=prefix, return_blocks=(1,), return_attention=True
    )
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow_blocks[0], fast_blocks[0], atol=1e-5, rtol=1e-5)
    assert len(attn) == 2
    for a in attn:
        assert a.shape == (2, 2, 17, 17)
        torch.testing.assert_close(a.sum(dim=-1), torch.ones(2, 2, 17))


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    enc = ViT3D(ViT3DConfig(**TINY, drop_path=0.5))
    volumes = torch.randn(4, 1, 8, 8, 8)
    enc.train()
    assert not torch.equal(enc(volumes)[0], enc(volumes)[0])
    enc.eval()
    assert torch.equal(enc(volumes)[0], enc(volumes)[0])


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 8, 8, 8), r"\(2, 8, 8, 8\)"),  # missing the sub-volume axis
        ((1, 1, 8, 10, 8), r"\(1, 1, 8, 10, 8\)"),  # 10 not divisible by 4
        ((1, 1, 8, 2, 8), r"\(1, 1, 8, 2, 8\)"),  # smaller than a patch
        ((1, 9, 8, 8, 8), r"9 sub-volumes"),  # more than max_subvolumes
    ],
)
def test_bad_input_shapes(encoder, shape, match):
    with pytest.raises(Ar3dInputError, match=match):
        encoder.forward_features(torch.zeros(shape))


def test_bad_arguments(encoder):
    volumes = torch.zeros(2, 1, 8, 8, 8)
    with pytest.raises(Ar3dInputError, match="causal"):
        encoder.forward_features(volumes, mode="causal")
    with pytest.raises(Ar3dInputError, match=r"\[0, 8\]"):
        encoder.forward_features(volumes, mode="prefix", prefix_len=torch.tensor([0, 9]))
    with pytest.raises(Ar3dInputError, match=r"shape \(2,\)"):
        encoder.forward_features(volumes, mode="prefix", prefix_len=torch.tensor([1]))
    with pytest.raises(Ar3dInputError, match="bidirectional"):
        encoder.forward_features(volumes, prefix_len=torch.tensor([1, 1]))
    with pytest.raises(Ar3dInputError, match=r"\(8, 8, 8\)"):
        patchify(torch.zeros(8, 8, 8), 4)
    with pytest.raises(Ar3dInputError, match=r"\(1, 7, 64\)"):
        unpatchify(torch.zeros(1, 7, 64), 4, (2, 2, 2))
    with pytest.raises(Ar3dInputError, match=r"\(9, 4, 4\)"):
        encoder.grid((9, 4, 4))


def test_builds_on_the_meta_device_for_sizing_without_memory():
    cfg = ViT3DConfig.preset("tiny")
    with torch.device("meta"):
        meta = ViT3D(cfg)
    real = ViT3D(cfg)
    assert all(p.is_meta for p in meta.parameters())
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
