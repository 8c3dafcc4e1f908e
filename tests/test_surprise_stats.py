"""The next-token head's brightness and texture (`patch_stats`), and the surprise that sees them."""

from __future__ import annotations

import pytest
import torch

from model_core.checkpoint.store import load_checkpoint, make_config, save_checkpoint
from model_core.data.preprocess import PreprocessConfig
from model_core.inference.explain import load_explain_model, stats_surprise
from model_core.models.vit import STATS_MEAN_SCALE, ViT3D, ViT3DConfig, patch_stats
from model_core.objectives.autoregressive import AutoregressiveObjective

TINY = ViT3DConfig(patch_size=8, width=48, depth=2, heads=2)


def test_patch_stats_are_brightness_in_tenths_and_log_contrast():
    patches = torch.tensor([[0.5] * 8, [0.0, 1.0] * 4])  # flat mid-grey; black and white
    stats = patch_stats(patches)
    assert stats[0, 0] == pytest.approx(0.5 / STATS_MEAN_SCALE) and stats[1, 0] == pytest.approx(0.5 / STATS_MEAN_SCALE)
    assert stats[0, 1] == pytest.approx(torch.log(torch.tensor(1e-3)).item())  # no texture: the floor
    assert stats[1, 1] == pytest.approx(torch.log(torch.tensor(0.5 + 1e-3)).item())


def test_stats_surprise_is_zero_when_expected_and_grows_with_a_brightness_change():
    true = torch.rand(1, 5, 512)
    assert torch.allclose(stats_surprise(patch_stats(true), true), torch.zeros(1, 5), atol=1e-6)
    brighter = stats_surprise(patch_stats(true), true + 0.2)  # 2 units of mean brightness, the same texture
    assert torch.allclose(brighter, torch.full((1, 5), 2.0**2 / 2), atol=1e-4)


def test_the_paper_objective_is_unchanged_without_stats():
    torch.manual_seed(0)
    plain = AutoregressiveObjective(ViT3D(TINY))
    assert plain.head.stats is None and not any(k.startswith("head.stats") for k in plain.state_dict())
    out = plain(torch.rand(2, 2, 16, 16, 16))
    assert set(out) == {"loss", "pred", "target", "prefix_len"}


def test_the_stats_term_trains_the_stats_head_and_is_in_the_loss():
    torch.manual_seed(0)
    objective = AutoregressiveObjective(ViT3D(TINY), stats_weight=0.1)
    out = objective(torch.rand(2, 2, 16, 16, 16))
    assert out["loss"].item() == pytest.approx((out["loss_pattern"] + 0.1 * out["loss_stats"]).item(), rel=1e-5)
    out["loss"].backward()
    assert objective.head.stats.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stats_weight"):
        AutoregressiveObjective(ViT3D(TINY), stats_weight=-1.0)


def test_explain_loads_the_stats_head_of_a_checkpoint(tmp_path):
    objective = AutoregressiveObjective(ViT3D(TINY), stats_weight=0.1)
    config = make_config(TINY.to_dict(), objective="ar",
                         heads={"next_token": {"type": "linear", "out_features": 512, "stats_weight": 0.1}},
                         preprocessing=PreprocessConfig(spacing=(4.0,) * 3).to_dict())
    folder = save_checkpoint(tmp_path / "ar-stats", objective.state_dict(), config)
    model = load_explain_model(folder, device="cpu")
    assert model.head.stats is not None
    assert torch.equal(model.head.stats.weight, load_checkpoint(folder).state_dict["head.stats.weight"])
