"""Segmentation model: decoder shapes, point decoding, gradients in head and full mode, the loss."""

from __future__ import annotations

import pytest
import torch
from monai.losses import MaskedDiceLoss

from model_core.errors import Ar3dInputError, CheckpointError
from model_core.models.segmentation import (
    LIGHT_LEVELS,
    LightDecoder,
    SegmentationModel,
    UNETRDecoder,
    build_decoder,
    decoder_from_config,
    feature_blocks,
    light_features,
    model_from_config,
)
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.segmentation import SegmentationObjective, dice_ce_loss
from model_core.vocabulary import IGNORE

TINY = {"patch_size": 8, "width": 48, "depth": 4, "heads": 2}


def tiny_model(kind: str, num_classes: int = 3, decoder: dict | None = None, **overrides) -> SegmentationModel:
    torch.manual_seed(0)
    cfg = ViT3DConfig(**{**TINY, **overrides})
    return SegmentationModel(ViT3D(cfg), build_decoder(kind, cfg, num_classes, **(decoder or {})))


def test_feature_blocks_follow_the_seed_and_scale_down():
    assert feature_blocks(12, 4) == (3, 6, 9, 12)
    assert feature_blocks(4, 4) == (1, 2, 3, 4)
    assert feature_blocks(4, 3) == (1, 3, 4)
    assert feature_blocks(2, 4) == (1, 2)  # never block 0, never twice the same


@pytest.mark.parametrize("kind", ["light", "unetr"])
@pytest.mark.parametrize("patch", [8, 16])
def test_decoders_give_logits_of_the_window_size(kind, patch):
    model = tiny_model(kind, num_classes=4, patch_size=patch).eval()
    x = torch.rand(2, 1, 2 * patch, 3 * patch, patch)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 4, 2 * patch, 3 * patch, patch)
    assert torch.isfinite(logits).all()


def test_unetr_reads_blocks_scaled_to_the_depth():
    cfg = ViT3DConfig(patch_size=16, width=48, depth=12, heads=2)
    assert UNETRDecoder(cfg, 2).blocks == (3, 6, 9, 12)  # the seed's choice for 16^3 patches
    assert UNETRDecoder(ViT3DConfig(**TINY), 2).blocks == (1, 3, 4)  # 8^3 patches: 3 levels


def test_light_features_concatenate_four_levels():
    model = tiny_model("light")
    x = torch.rand(1, 1, 16, 24, 32)
    features = light_features(model.encoder, x)
    assert features.shape == (1, LIGHT_LEVELS * 48, 2, 3, 4)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x, features))


@pytest.mark.parametrize("mid", [16, 0])
def test_point_decoding_equals_dense_decoding(mid):
    model = tiny_model("light", decoder={"mid": mid}).double()
    x = torch.rand(2, 1, 16, 24, 32, dtype=torch.float64)
    features = light_features(model.encoder, x)
    n = 16 * 24 * 32
    points = torch.randint(0, n, (2, 300))
    points[0, :4] = torch.tensor([0, n - 1, 31, 24 * 32 * 15])  # corners and edges use the padding
    with torch.no_grad():
        dense = model.decoder(x, features).flatten(2)  # (2, 3, n)
        sparse = model.decoder.forward_points(x, features, points)  # (2, 3, 300)
    expected = dense.gather(2, points[:, None, :].expand(-1, 3, -1))
    assert torch.allclose(sparse, expected, atol=1e-9)


def test_light_decoder_refuses_a_grid_that_does_not_match_the_image():
    decoder = LightDecoder(4 * 48, 2, patch_size=8)
    with pytest.raises(Ar3dInputError, match="token grid"):
        decoder(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 4 * 48, 3, 2, 2))


def test_model_rebuilds_from_its_config():
    for kind in ("light", "unetr"):
        model = tiny_model(kind)
        rebuilt = model_from_config(model.encoder.cfg.to_dict(), model.decoder.config)
        ours, theirs = model.state_dict(), rebuilt.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].shape == theirs[k].shape for k in ours)
    with pytest.raises(CheckpointError, match="decoder config"):
        model_from_config(model.encoder.cfg.to_dict(), {"kind": "mystery", "num_classes": 3})


def test_a_light_decoder_saved_before_the_mid_branch_rebuilds_without_it():
    model = tiny_model("light", decoder={"mid": 0})
    old_config = {k: v for k, v in model.decoder.config.items() if k != "mid"}  # as config.json had it
    rebuilt = model_from_config(model.encoder.cfg.to_dict(), old_config)
    assert rebuilt.decoder.state_dict().keys() == model.decoder.state_dict().keys()
    assert not any(k.startswith("mid") for k in rebuilt.decoder.state_dict())
    assert any(k.startswith("mid") for k in tiny_model("light").decoder.state_dict())  # the default has it


def _batch(model: SegmentationModel) -> dict[str, torch.Tensor]:
    x = torch.rand(2, 1, 16, 16, 16)
    labels = torch.randint(0, model.num_classes, (2, 1, 16, 16, 16), dtype=torch.uint8)
    return {"volumes": x, "labels": labels}


def test_full_mode_gives_every_parameter_a_gradient():
    model = tiny_model("unetr")
    objective = SegmentationObjective(model, frozen_encoder=False)
    objective(**_batch(model))["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_head_mode_gives_no_encoder_parameter_a_gradient():
    model = tiny_model("light")
    objective = SegmentationObjective(model, frozen_encoder=True)
    objective(**_batch(model))["loss"].backward()  # the encoder runs, but is frozen
    encoder_grads = [n for n, p in objective.encoder.named_parameters() if p.grad is not None]
    decoder_missing = [n for n, p in objective.decoder.named_parameters() if p.grad is None]
    assert encoder_grads == [] and decoder_missing == []


def test_head_mode_trains_on_points_of_cached_features():
    model = tiny_model("light")
    objective = SegmentationObjective(model, frozen_encoder=True)
    batch = _batch(model)
    with torch.no_grad():
        features = light_features(model.encoder, batch["volumes"])
    points = torch.randint(0, 16**3, (2, 500))
    out = objective(**batch, features=features, points=points)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0.0 <= float(out["dice"]) <= 1.0
    assert all(p.grad is not None for p in objective.decoder.parameters())


def test_loss_ignores_unannotated_voxels():
    torch.manual_seed(0)
    dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True)
    logits = torch.randn(2, 3, 8, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    target[:, :, :4] = IGNORE  # half the voxels are unannotated
    loss = dice_ce_loss(logits, target, dice)
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(2, 3, 4, 8, 8) * 10  # predictions there change wildly
    assert torch.allclose(dice_ce_loss(changed, target, dice), loss)
    annotated_change = logits.clone()
    annotated_change[:, :, 4:] += torch.randn(2, 3, 4, 8, 8)
    assert not torch.allclose(dice_ce_loss(annotated_change, target, dice), loss)


def test_loss_of_a_perfect_prediction_is_near_zero():
    dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True)
    target = torch.randint(0, 3, (1, 1, 8, 8, 8))
    logits = 50.0 * torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    assert dice_ce_loss(logits, target, dice) < 1e-3
    assert dice_ce_loss(-logits, target, dice) > 1.0


def test_the_light_decoder_reads_the_blocks_it_is_given():
    torch.manual_seed(0)
    model = SegmentationModel(ViT3D(ViT3DConfig(patch_size=8, width=48, depth=4, heads=2)),
                              build_decoder("light", ViT3DConfig(patch_size=8, width=48, depth=4, heads=2), 3,
                                            blocks=[2, 3]))
    x = torch.rand(1, 1, 16, 16, 16)
    features = light_features(model.encoder, x, [2, 3])  # neither ends with the final (normalised) tokens
    assert features.shape == (1, 2 * 48, 2, 2, 2)
    assert model.decoder.config["blocks"] == [2, 3]
    assert torch.allclose(model(x), model(x, features), atol=1e-5)
    rebuilt = decoder_from_config(ViT3DConfig(patch_size=8, width=48, depth=4, heads=2), model.decoder.config)
    assert rebuilt.blocks == (2, 3)
    with pytest.raises(Ar3dInputError, match="increasing block numbers in 1..4"):
        light_features(model.encoder, x, [3, 2])
    with pytest.raises(Ar3dInputError, match="increasing block numbers in 1..4"):
        build_decoder("light", ViT3DConfig(patch_size=8, width=48, depth=4, heads=2), 3, blocks=[5])
