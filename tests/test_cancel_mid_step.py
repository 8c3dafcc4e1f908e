"""Cancel inside a training step: the loop leaves at the next module or gradient, not at the next step."""

from __future__ import annotations

import torch
from test_train import WavesDataset, _cfg, _objective

from model_core.checkpoint.store import load_checkpoint
from model_core.training.loop import train


class StopDuringStep:
    """`should_stop` that turns True at its `at`-th call, which falls inside a step's forward or backward."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.at


def _calls_per_step(tmp_path) -> int:
    counter = StopDuringStep(at=10**9)
    objective, config = _objective()
    train(objective, WavesDataset(), _cfg(steps=1), tmp_path / "count", checkpoint_config=config, should_stop=counter)
    return counter.calls


def test_cancel_inside_a_step_keeps_the_weights_of_the_last_complete_step(tmp_path):
    per_step = _calls_per_step(tmp_path)
    assert per_step > 10  # polled by every module's forward and every gradient, not once a step

    objective, config = _objective()
    reference = train(objective, WavesDataset(), _cfg(steps=2), tmp_path / "two", checkpoint_config=config)

    objective, config = _objective()
    stop = StopDuringStep(at=2 * per_step + per_step // 2 + 1)  # half-way through the third step
    result = train(objective, WavesDataset(), _cfg(steps=20), tmp_path / "cancelled", checkpoint_config=config,
                   should_stop=stop)
    assert result.cancelled and result.step == 2 and stop.calls == stop.at
    want, got = load_checkpoint(reference.checkpoint).state_dict, load_checkpoint(result.checkpoint).state_dict
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not objective._forward_pre_hooks and not any(m._forward_pre_hooks for m in objective.modules())


def test_hooks_are_removed_after_training(tmp_path):
    objective, config = _objective()
    train(objective, WavesDataset(), _cfg(steps=2), tmp_path / "run", checkpoint_config=config, should_stop=lambda: False)
    assert not any(m._forward_pre_hooks for m in objective.modules())
    assert not any(p._backward_hooks for p in objective.parameters())
