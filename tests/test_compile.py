"""`TrainConfig(compile=True)` / `ar3d pretrain --compile`: the compiled training step trains as the eager one."""

from __future__ import annotations

import math

import pytest
import torch

from model_core.checkpoint.store import load_checkpoint, make_config
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.registry import build_objective
from model_core.training.loop import TrainConfig, train

ENCODER = dict(patch_size=8, width=24, depth=2, heads=2)
STEPS = 4


def waves(n: int = 8) -> list[torch.Tensor]:
    """Sequences of 4 sub-volumes (16, 16, 8) of plane waves: 16 tokens each."""
    g = torch.Generator().manual_seed(0)
    s, x, y, z = torch.meshgrid(*(torch.arange(k, dtype=torch.float32) for k in (4, 16, 16, 8)), indexing="ij")
    return [torch.sin(0.3 * x + 0.5 * y + 0.7 * (z + 4 * s) + 6.28 * torch.rand(1, generator=g)) for _ in range(n)]


def run(tmp_path, compile_step: bool) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    cfg = ViT3DConfig.preset("tiny", **ENCODER)
    objective = build_objective("ar", ViT3D(cfg))
    train_cfg = TrainConfig(steps=STEPS, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, device="cpu", amp="off",
                            seed=3, compile=compile_step)
    result = train(objective, waves(), train_cfg, tmp_path / f"compile-{compile_step}",
                   checkpoint_config=make_config(cfg.to_dict(), objective="ar"))
    return [loss for _, loss in result.history], objective


def test_the_compiled_step_trains_as_the_eager_one(tmp_path):
    from torch._dynamo.utils import counters

    eager, _ = run(tmp_path, False)
    counters.clear()
    compiled, objective = run(tmp_path, True)
    assert counters["stats"]["unique_graphs"] >= 1  # the step did run compiled
    assert len(compiled) == STEPS and all(math.isfinite(v) for v in compiled)
    assert compiled == pytest.approx(eager, rel=1e-3)  # same data, masks and weights: only rounding differs
    checkpoint = load_checkpoint(tmp_path / "compile-True")
    assert checkpoint.config["provenance"]["train"]["compile"] is True
    assert not any(k.startswith("_orig_mod") for k in checkpoint.state_dict)  # the plain module's names
    assert torch.equal(checkpoint.state_dict["head.proj.weight"], objective.head.proj.weight.detach())
