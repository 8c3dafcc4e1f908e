"""Checkpoints: safetensors round trip, pickles refused unread, atomic saves, strict loading."""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model_core import checkpoint as ckpt
from model_core.checkpoint import (
    Checkpoint,
    TrainState,
    capture_rng,
    load_checkpoint,
    load_into,
    load_train_state,
    make_config,
    read_config,
    resolve_model,
    restore_rng,
    save_checkpoint,
)
from model_core.errors import Ar3dInputError, CheckpointError
from model_core.models import ViT3D, ViT3DConfig

TINY = dict(width=24, depth=2, heads=2)


def _encoder() -> tuple[ViT3D, dict]:
    cfg = ViT3DConfig.preset("tiny", **TINY)
    torch.manual_seed(0)
    return ViT3D(cfg), make_config(cfg.to_dict(), objective="ar", modality="CT", provenance={"data": ["phantoms"]})


def _marker_pickle(marker: Path) -> bytes:
    """A pickle whose unpickling would create `marker` (through os.system)."""

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Exploit(), protocol=4)


def test_round_trip_keeps_tensors_and_config(tmp_path):
    model, config = _encoder()
    path = save_checkpoint(tmp_path / "enc", model.state_dict(), config)
    loaded = load_checkpoint(path)
    assert loaded.config == config
    assert set(loaded.state_dict) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict[name], tensor), name
    fresh = ViT3D(ViT3DConfig.from_dict(loaded.config["encoder"]))
    load_into(fresh, loaded)
    assert torch.equal(fresh.start_token, model.start_token)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_tied_weights_are_saved(tmp_path):
    lin = nn.Linear(3, 3)
    state = {"a": lin.weight, "b": lin.weight, "c": lin.weight[0]}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "t", state, _encoder()[1]))
    assert torch.equal(loaded.state_dict["b"], lin.weight.detach())
    assert torch.equal(loaded.state_dict["c"], lin.weight.detach()[0])


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "weights.ckpt", "pytorch_model.bin"])
def test_torch_save_files_are_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = _marker_pickle(marker)
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_encoder()[1]))
    (folder / "model.safetensors").write_bytes(payload)  # a pickle disguised by its name
    (tmp_path / "evil.pkl").write_bytes(payload)
    (tmp_path / "evil_noext").write_bytes(payload)
    for target in (folder, tmp_path / "evil.pkl", tmp_path / "evil_noext", folder / "model.safetensors"):
        with pytest.raises(CheckpointError, match="never unpickles"):
            load_checkpoint(target)
    assert not marker.exists()
    # the payload does work when unpickled, so the check above is meaningful
    pickle.loads(payload)
    assert marker.exists()


def test_zip_named_safetensors_is_refused(tmp_path):
    folder = tmp_path / "zipped"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_encoder()[1]))
    with zipfile.ZipFile(folder / "model.safetensors", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x04N.")
    with pytest.raises(CheckpointError, match="zip archive"):
        load_checkpoint(folder)


def test_folder_without_safetensors_is_refused_and_names_the_pickle(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_checkpoint(empty)
    torch.save({"w": torch.zeros(1)}, empty / "best.pth")
    with pytest.raises(CheckpointError, match=r"best\.pth.*never unpickles"):
        load_checkpoint(empty)


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    model, config = _encoder()
    path = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_checkpoint(path)


def test_wrong_shapes_are_listed(tmp_path):
    model, config = _encoder()
    path = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    wider = ViT3D(ViT3DConfig.preset("tiny", width=30, depth=2, heads=2))
    with pytest.raises(CheckpointError, match=r"wrong shape: start_token is \(1, 1, 24\) in the checkpoint, \(1, 1, 30\) in the model"):
        load_into(wider, load_checkpoint(path))
    deeper = ViT3D(ViT3DConfig.preset("tiny", width=24, depth=3, heads=2))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.2\."):
        load_into(deeper, load_checkpoint(path))
    with pytest.raises(CheckpointError, match="unexpected: extra"):
        load_into(model, Checkpoint(config, {**model.state_dict(), "extra": torch.zeros(1)}, path))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "resnet50"}, "unknown architecture 'resnet50'"),
        ({"format": "other"}, "format is 'other'"),
        ({"version": 99}, "version 99 is not supported"),
    ],
)
def test_bad_config_is_refused(tmp_path, change, message):
    model, config = _encoder()
    path = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path / "d", model.state_dict(), {**config, **change})


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, config = _encoder()
    target = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    (target / "loss_log.csv").write_text("step,loss\n1,0.5\n")
    before = load_checkpoint(target).state_dict

    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    new_state = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, new_state, config)
    after = load_checkpoint(target).state_dict
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left
    assert (target / "loss_log.csv").read_text() == "step,loss\n1,0.5\n"


def test_save_replaces_and_carries_other_files(tmp_path):
    model, config = _encoder()
    target = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    (target / "loss_log.csv").write_text("step,loss\n")
    new_state = {k: v + 1 for k, v in model.state_dict().items()}
    save_checkpoint(target, new_state, config)
    loaded = load_checkpoint(target).state_dict
    assert all(torch.equal(loaded[k], new_state[k]) for k in new_state)
    assert (target / "loss_log.csv").read_text() == "step,loss\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_kill_between_renames_is_recovered(tmp_path):
    model, config = _encoder()
    target = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    os.rename(target, tmp_path / ".c.previous")  # the state a kill after the first rename leaves
    assert torch.equal(load_checkpoint(target).state_dict["start_token"], model.start_token.detach())
    assert target.is_dir() and not (tmp_path / ".c.previous").exists()


def test_train_state_round_trip(tmp_path):
    model, config = _encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model.start_token.sum().backward()
    opt.step()
    sched.step()
    torch.manual_seed(123)
    rng = capture_rng()
    expected = (torch.rand(3), np.random.rand(2), random.random())
    state = TrainState(7, opt.state_dict(), sched.state_dict(), [rng], {"wall_time_s": 1.5})
    save_checkpoint(tmp_path / "c", model.state_dict(), config, state)
    state = load_train_state(tmp_path / "c")
    assert state.step == 7 and state.extra == {"wall_time_s": 1.5}
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(state.optimizer)
    for pid, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            assert torch.equal(fresh.state_dict()["state"][pid][key], value), key
    assert state.scheduler["last_epoch"] == 1
    torch.manual_seed(999)
    restore_rng(state.rng[0])
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(again[0], expected[0]) and (again[1] == expected[1]).all() and again[2] == expected[2]
    assert load_train_state(save_checkpoint(tmp_path / "d", model.state_dict(), config)) is None


def test_read_config_only(tmp_path):
    model, config = _encoder()
    save_checkpoint(tmp_path / "c", model.state_dict(), config)
    assert read_config(tmp_path / "c")["encoder"]["width"] == 24


def test_resolve_model(tmp_path, monkeypatch):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(Ar3dInputError, match="unknown model 'nonesuch'; known names: .*ar3d-encoder"):
        resolve_model("nonesuch")
    with pytest.raises(Ar3dInputError, match="no such checkpoint folder"):
        resolve_model(str(tmp_path / "missing"))
    if "ar3d-encoder" not in ckpt.list_shipped():
        monkeypatch.delenv("AR3D_ENCODER", raising=False)
        with pytest.raises(Ar3dInputError, match="not shipped"):
            resolve_model("ar3d-encoder")
        monkeypatch.setenv("AR3D_ENCODER", str(tmp_path))
        assert resolve_model("ar3d-encoder") == tmp_path


def test_list_shipped_reads_the_package_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "SHIPPED_DIR", tmp_path)
    assert ckpt.list_shipped() == []
    model, config = _encoder()
    save_checkpoint(tmp_path / "my-model", model.state_dict(), config)
    (tmp_path / "not-a-model").mkdir()
    assert ckpt.list_shipped() == ["my-model"]
    assert resolve_model("my-model") == tmp_path / "my-model"
