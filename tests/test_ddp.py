"""DDP on CPU (gloo) through torchrun: the CLI end to end, per-rank data, synced weights, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model_core.checkpoint.store import load_checkpoint, load_train_state

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch.utils.data import Dataset
    from model_core.checkpoint.store import make_config
    from model_core.models.vit import ViT3D, ViT3DConfig
    from model_core.objectives.registry import build_objective
    from model_core.training.loop import TrainConfig, train

    out, steps, stop_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rank = int(os.environ["RANK"])

    class Recording(Dataset):
        def __init__(self):
            self.seen = []
        def __len__(self):
            return 10**6
        def __getitem__(self, i):
            self.seen.append(i)
            g = torch.Generator().manual_seed(i)
            return {"volumes": torch.rand(4, 16, 16, 8, generator=g), "case": f"case{i}"}

    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    cfg = ViT3DConfig.preset("tiny", patch_size=8, width=24, depth=2, heads=2)
    objective = build_objective("ar", ViT3D(cfg))
    data = Recording()
    done = []  # progress runs on rank 0 only, so only rank 0 asks to stop: every rank must stop
    stopper = (lambda: len(done) >= stop_at) if stop_at else None
    result = train(objective, data, TrainConfig(steps=steps, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1,
                   ckpt_every=100, device="cpu", seed=1), out, checkpoint_config=make_config(cfg.to_dict(), objective="ar"),
                   resume=os.path.exists(os.path.join(out, "model.safetensors")), progress=done.append,
                   should_stop=stopper)
    total = sum(float(t.double().sum()) for t in objective.state_dict().values())
    with open(f"{out}_{stop_at}_rank{rank}.json", "w") as f:
        json.dump({"seen": data.seen, "sum": total, "step": result.step,
                   "checkpoint": None if result.checkpoint is None else str(result.checkpoint)}, f)
    """
)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_pretrain_under_torchrun(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(
        "-m", "model_core.cli", "pretrain", "--data", "phantom:ct", "--phantoms", "2", "--out", out,
        "--config", "tiny", "--set", "width=32", "--set", "depth=2", "--set", "heads=2",
        "--crop", "32", "--slab", "16", "--steps", "3", "--workers", "0", "--device", "cpu",
        "--cache-dir", tmp_path / "cache", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint: ") == 1  # only rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]  # no temp folders left
    ckpt = load_checkpoint(out)
    assert ckpt.config["provenance"]["steps"] == 3 and ckpt.config["provenance"]["world_size"] == 2
    state = load_train_state(out)
    assert len(state.rng) == 2 and not torch.equal(state.rng[0]["torch_cpu"], state.rng[1]["torch_cpu"])


@pytest.mark.slow  # three torchrun launches
def test_ranks_read_their_own_data_and_stay_in_sync(tmp_path):
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    proc = torchrun(script, tmp_path / "full", 4, 0, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"full_0_rank{r}.json").read_text()) for r in range(2)]
    # step s, rank r reads items (2s + r) * 2 and (2s + r) * 2 + 1
    assert ranks[0]["seen"] == [0, 1, 4, 5, 8, 9, 12, 13]
    assert ranks[1]["seen"] == [2, 3, 6, 7, 10, 11, 14, 15]
    assert ranks[0]["sum"] == ranks[1]["sum"]  # gradients averaged: identical weights everywhere
    assert ranks[0]["checkpoint"] is not None and ranks[1]["checkpoint"] is None
    saved = load_checkpoint(tmp_path / "full").state_dict.values()
    assert sum(float(t.double().sum()) for t in saved) == pytest.approx(ranks[0]["sum"], rel=1e-12)

    # 2 steps, a cancel (checkpoint at step 2), then a resume to step 4 equals the 4-step run
    proc = torchrun(script, tmp_path / "split", 4, 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads((tmp_path / f"split_2_rank{r}.json").read_text())["step"] for r in range(2)] == [2, 2]
    proc = torchrun(script, tmp_path / "split", 4, 0, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [json.loads((tmp_path / f"split_0_rank{r}.json").read_text()) for r in range(2)]
    assert resumed[0]["seen"] == [8, 9, 12, 13] and resumed[1]["seen"] == [10, 11, 14, 15]
    split_weights = load_checkpoint(tmp_path / "split").state_dict
    full_weights = load_checkpoint(tmp_path / "full").state_dict
    for name, tensor in full_weights.items():
        torch.testing.assert_close(split_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
