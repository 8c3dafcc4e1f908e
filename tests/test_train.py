"""The training loop: loss falls, exact resume, cancel, progress, schedule, data order."""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch
from torch.utils.data import Dataset

from model_core.checkpoint.store import load_checkpoint, make_config
from model_core.errors import Ar3dInputError, CheckpointError
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.registry import build_objective
from model_core.training.loop import (
    LOSS_LOG,
    LOSS_LOG_COLUMNS,
    StepBatchSampler,
    TrainConfig,
    _truncate_log,
    lr_factor,
    train,
)

ENCODER = dict(patch_size=8, width=24, depth=2, heads=2)
SHAPE = (4, 16, 16, 8)  # S sub-volumes of (X, Y, Z): 2*2*1 patches each, 16 tokens


class WavesDataset(Dataset):
    """Item i: 4 slabs of a plane wave of random phase and scale, a pure function of i; records the indices read."""

    def __init__(self, length: int = 1000):
        self.length = length
        self.seen: list[int] = []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        self.seen.append(i)
        g = torch.Generator().manual_seed(i)
        freq = torch.tensor([0.3, 0.5, 0.7]) * (1 + 0.2 * torch.rand(1, generator=g))
        phase = torch.rand(1, generator=g) * 6.28
        s, x, y, z = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in SHAPE), indexing="ij")
        return torch.sin(freq[0] * x + freq[1] * y + freq[2] * (z + 4 * s) + phase)  # (4, 16, 16, 8)


def _objective(seed: int = 0, kind: str = "ar"):
    torch.manual_seed(seed)
    cfg = ViT3DConfig.preset("tiny", **ENCODER)
    return build_objective(kind, ViT3D(cfg)), make_config(cfg.to_dict(), objective=kind)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=2, lr=1e-3, warmup_steps=3, ckpt_every=10, log_every=1, device="cpu", seed=3)
    return TrainConfig(**{**base, **kw})


def _log(out) -> list[dict]:
    with open(out / LOSS_LOG, newline="") as f:
        return list(csv.DictReader(f))


def test_loss_falls(tmp_path):
    objective, config = _objective()
    cfg = _cfg(steps=80, batch_size=4, lr=2e-3, ckpt_every=50, log_every=2)
    result = train(objective, WavesDataset(), cfg, tmp_path / "run", checkpoint_config=config)
    losses = [loss for _, loss in result.history]
    assert len(losses) == 80 and result.step == 80 and not result.cancelled
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5
    rows = _log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == list(range(2, 81, 2))
    assert float(rows[-1]["loss"]) == pytest.approx(losses[-1], rel=1e-5)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.config["provenance"]["steps"] == 80 and ckpt.config["provenance"]["seed"] == 3
    assert ckpt.config["provenance"]["metrics"]["loss"] == pytest.approx(losses[-1])
    assert torch.equal(ckpt.state_dict["head.proj.weight"], objective.head.proj.weight.detach())


def test_loss_log_rows_have_the_documented_format(tmp_path):
    objective, config = _objective()
    result = train(objective, WavesDataset(), _cfg(steps=5, log_every=2), tmp_path / "run", checkpoint_config=config)
    lines = (tmp_path / "run" / LOSS_LOG).read_text().splitlines()
    assert lines[0] == ",".join(LOSS_LOG_COLUMNS)
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == ["2", "4", "5"]  # every log_every steps, and the last step
    assert [r[1] for r in rows] == [f"{loss:.6g}" for step, loss in result.history if step in (2, 4, 5)]
    assert all(re.fullmatch(r"\d+\.\d", r[3]) and re.fullmatch(r"\d+\.\d\d", r[4]) for r in rows)
    assert float(rows[0][4]) <= float(rows[1][4]) <= float(rows[2][4]) <= result.wall_time_s + 0.01


def test_resume_after_kill_equals_one_run(tmp_path):
    straight, config = _objective()
    train(straight, WavesDataset(), _cfg(), tmp_path / "a", checkpoint_config=config)

    def kill_at_13(p):
        if p.step == 13:
            raise KeyboardInterrupt  # a kill after step 13: the last checkpoint is step 10

    first, _ = _objective()
    with pytest.raises(KeyboardInterrupt):
        train(first, WavesDataset(), _cfg(), tmp_path / "b", checkpoint_config=config, progress=kill_at_13)
    assert load_checkpoint(tmp_path / "b").config["provenance"]["steps"] == 10

    resumed, _ = _objective(seed=99)  # different initial weights: all must come from the checkpoint
    data = WavesDataset()
    result = train(resumed, data, _cfg(), tmp_path / "b", checkpoint_config=config, resume=True)
    assert result.step == 20 and [s for s, _ in result.history] == list(range(11, 21))
    assert sorted(data.seen) == list(range(20, 40))  # steps 10..19 at batch size 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [int(r["step"]) for r in _log(tmp_path / "b")] == list(range(1, 21))
    assert [r["loss"] for r in _log(tmp_path / "b")] == [r["loss"] for r in _log(tmp_path / "a")]


def test_workers_give_the_same_batches(tmp_path):
    results = []
    for workers in (0, 2):
        objective, config = _objective()
        train(objective, WavesDataset(), _cfg(steps=3, num_workers=workers), tmp_path / str(workers), checkpoint_config=config)
        results.append(objective.state_dict())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], msg=name)


def test_cancel_stops_and_keeps_a_checkpoint(tmp_path):
    objective, config = _objective()
    seen = []
    result = train(
        objective,
        WavesDataset(),
        _cfg(),
        tmp_path / "run",
        checkpoint_config=config,
        progress=lambda p: seen.append(p.step),
        should_stop=lambda: len(seen) >= 4,
    )
    assert result.cancelled and result.step == 4 and seen == [1, 2, 3, 4]
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.config["provenance"]["steps"] == 4
    assert torch.equal(ckpt.state_dict["encoder.start_token"], objective.encoder.start_token.detach())
    again, _ = _objective()
    more = train(again, WavesDataset(), _cfg(steps=6), tmp_path / "run", checkpoint_config=config, resume=True)
    assert more.step == 6 and not more.cancelled


def test_progress_reports_every_step(tmp_path):
    objective, config = _objective(kind="mae")
    reports = []
    train(objective, WavesDataset(), _cfg(steps=5), tmp_path / "run", checkpoint_config=config, progress=reports.append)
    assert [p.step for p in reports] == [1, 2, 3, 4, 5]
    assert all(p.total == 5 for p in reports)
    assert all(math.isfinite(p.metrics["loss"]) and p.metrics["lr"] > 0 for p in reports)


def test_cosine_schedule_values():
    warm, total, floor = 4, 24, 0.1
    assert [lr_factor(s, warm, total, floor) for s in range(warm)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(warm, warm, total, floor) == pytest.approx(1.0)
    assert lr_factor(warm + 10, warm, total, floor) == pytest.approx(floor + (1 - floor) / 2)
    assert lr_factor(total, warm, total, floor) == pytest.approx(floor)
    assert lr_factor(total + 5, warm, total, floor) == pytest.approx(floor)
    values = [lr_factor(s, warm, total, floor) for s in range(warm, total)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_logged_lr_follows_the_schedule(tmp_path):
    objective, config = _objective()
    cfg = _cfg(steps=8, warmup_steps=2, min_lr_ratio=0.2)
    train(objective, WavesDataset(), cfg, tmp_path / "run", checkpoint_config=config)
    logged = [float(r["lr"]) for r in _log(tmp_path / "run")]
    expected = [cfg.lr * lr_factor(s, 2, 8, 0.2) for s in range(8)]
    assert logged == pytest.approx(expected, rel=1e-4)


def test_param_groups_set_their_own_lr(tmp_path):
    objective, config = _objective()
    groups = [
        {"params": objective.encoder.parameters(), "lr": 1e-4},
        {"params": objective.head.parameters(), "lr": 1e-3},
    ]
    before = [p.detach().clone() for p in objective.encoder.parameters()]
    train(objective, WavesDataset(), _cfg(steps=2, warmup_steps=0), tmp_path / "run", checkpoint_config=config, param_groups=groups)
    assert any(not torch.equal(a, b) for a, b in zip(before, objective.encoder.parameters()))


def test_existing_checkpoint_needs_resume(tmp_path):
    objective, config = _objective()
    train(objective, WavesDataset(), _cfg(steps=1), tmp_path / "run", checkpoint_config=config)
    with pytest.raises(Ar3dInputError, match="already holds a checkpoint"):
        train(objective, WavesDataset(), _cfg(steps=2), tmp_path / "run", checkpoint_config=config)


def test_resume_of_a_checkpoint_without_train_state_is_refused(tmp_path):
    from model_core.checkpoint.store import save_checkpoint

    objective, config = _objective()
    save_checkpoint(tmp_path / "final", objective.state_dict(), config)
    with pytest.raises(CheckpointError, match="no train_state"):
        train(objective, WavesDataset(), _cfg(steps=2), tmp_path / "final", checkpoint_config=config, resume=True)


def test_bad_train_config_names_the_value():
    with pytest.raises(Ar3dInputError, match="steps must be a positive integer, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(Ar3dInputError, match="amp 'fp8'"):
        TrainConfig(amp="fp8")


def test_step_sampler_shards_ranks_and_starts_at_the_resume_step():
    ranks = [list(StepBatchSampler(None, 3, 0, 4, rank=r, world=2)) for r in range(2)]
    assert ranks[0][:2] == [[0, 1, 2], [6, 7, 8]] and ranks[1][:2] == [[3, 4, 5], [9, 10, 11]]
    flat = [i for r in ranks for batch in r for i in batch]
    assert sorted(flat) == list(range(24))
    assert list(StepBatchSampler(None, 3, 2, 4, rank=1, world=2)) == ranks[1][2:]
    assert list(StepBatchSampler(5, 2, 0, 3)) == [[0, 1], [2, 3], [4, 0]]


@pytest.mark.parametrize("content", ["", "step,loss,lr,tokens_per_s,time_s\n1,0.5,1e-4,10,1\n2,0.4,1e-4,10,2\n3,0.3,1e-4,1"])
def test_resume_repairs_a_loss_log_that_a_kill_cut_short(tmp_path, content):
    log = tmp_path / LOSS_LOG
    log.write_text(content)  # killed before the header was written, or in the middle of a row
    _truncate_log(log, after_step=2)
    rows = log.read_text().splitlines()
    assert rows[0] == ",".join(LOSS_LOG_COLUMNS)
    assert [r.split(",")[0] for r in rows[1:]] == (["1", "2"] if content else [])
    assert [p.name for p in tmp_path.iterdir()] == [LOSS_LOG]  # no temporary file left
