"""Checkpoints: safetensors round trip, pickles refused unread, atomic saves, strict loading."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model_core.checkpoint import store as ckpt
from model_core.checkpoint.store import (
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
from model_core.models.vit import ViT3D, ViT3DConfig

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
    with pytest.raises(Ar3dInputError, match="could not write the checkpoint: disk full"):
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


def test_a_reader_between_the_two_renames_does_not_break_the_save(tmp_path, monkeypatch):
    model, config = _encoder()
    target = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    new_state = {k: v + 1 for k, v in model.state_dict().items()}
    rename, seen = os.rename, []

    def rename_then_read(src, dst):
        rename(src, dst)
        if Path(dst).name == ".c.previous" and not seen:  # the old checkpoint is set aside: a reader comes now
            seen.append(load_checkpoint(target))  # finds no "c" and puts the old one back (`_recover`)

    monkeypatch.setattr(os, "rename", rename_then_read)
    save_checkpoint(target, new_state, config)
    assert seen and torch.equal(seen[0].state_dict["start_token"], model.start_token.detach())
    assert torch.equal(load_checkpoint(target).state_dict["start_token"], new_state["start_token"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


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


# ---------------------------------------------------------------------------------------------
# Untrusted checkpoints through every loader and every CLI command that takes a model


PICKLE_NAMES = ["model.pt", "model.pth", "weights.ckpt", "pytorch_model.bin", "model.pkl", "model.safetensors"]


@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_code_running_pickle_is_refused_unread_under_any_name(tmp_path, name):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_encoder()[1]))
    (folder / name).write_bytes(_marker_pickle(marker))
    for target in (folder, folder / name):
        with pytest.raises(CheckpointError, match="never unpickles") as error:
            load_checkpoint(target)
        assert str(error.value).startswith(str(folder)) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="never unpickles"):
        ckpt.count_values(folder)
    assert not marker.exists()


def _tensor_name(state: dict) -> str:
    return next(k for k in state if k.startswith("encoder.blocks.0.attn"))


def _edit_weights(folder: Path, edit) -> None:
    state = load_checkpoint(folder).state_dict
    edit(state, _tensor_name(state))
    from safetensors.torch import save_file

    save_file(state, folder / "model.safetensors")


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _marker_into_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(_marker_pickle(folder.parent / "pwned"))


# name: (what breaks, how, the error, "tensors" when only loaders that build the model notice it)
BAD_CHECKPOINTS = {
    "pickle_as_safetensors": (_marker_into_weights, "is a pickle, not safetensors; napari-ar3d never unpickles", ""),
    "torch_zip": (lambda f: torch.save({"w": torch.zeros(2)}, f / "model.safetensors"), "torch.save zip archive", ""),
    "truncated_weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
                          "cannot read the weights", ""),
    "unknown_architecture": (lambda f: _edit_config(f, architecture="resnet50"), "unknown architecture 'resnet50'", ""),
    "unknown_objective": (lambda f: _edit_config(f, objective="diffusion"), "unknown objective 'diffusion'", ""),
    "unknown_modality": (lambda f: _edit_config(f, modality="PET"), "modality 'PET' is not one of CT, MRI, any", ""),
    "bad_encoder_setting": (lambda f: _edit_config(f, encoder__width="wide"), "bad encoder settings.*width", ""),
    "unknown_encoder_key": (lambda f: _edit_config(f, encoder__colour=3), "unknown encoder config key", ""),
    "bad_preprocessing": (lambda f: _edit_config(f, preprocessing={"spacing": [0, 1, 1]}), "bad preprocessing settings", ""),
    "huge_encoder": (lambda f: _edit_config(f, encoder__width=2**20), r"at least [\d,]+ values but model.safetensors holds", "tensors"),
    "wrong_shape": (lambda f: _edit_weights(f, lambda s, k: s.__setitem__(k, torch.zeros(3, 3))), r"wrong shape: (encoder\.)?blocks\.0", "tensors"),
    "missing_tensor": (lambda f: _edit_weights(f, lambda s, k: s.pop(k)), r"missing: (encoder\.)?blocks\.0", "tensors"),
    "extra_tensor": (lambda f: _edit_weights(f, lambda s, k: s.__setitem__("encoder.extra", torch.zeros(2))),
                     r"unexpected: (encoder\.)?extra", "tensors"),
    "wrong_dtype": (lambda f: _edit_weights(f, lambda s, k: s.__setitem__(k, s[k].to(torch.int32))),
                    r"wrong type: (encoder\.)?blocks\.0\.\S+ is torch.int32 in the checkpoint, torch.float32 in the model", "tensors"),
    "nan_weights": (lambda f: _edit_weights(f, lambda s, k: s[k].view(-1).__setitem__(0, float("nan"))),
                    r"NaN or infinite values: (encoder\.)?blocks\.0", "tensors"),
}


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny segmentation model (for `segment`) and a tiny AR checkpoint (for `explain` and `finetune`)."""
    from test_bad_inputs import make_corpus
    from test_explain import tiny_objective
    from test_infer import save_segmenter

    root = tmp_path_factory.mktemp("good")
    objective = tiny_objective(seed=1)
    config = make_config(objective.encoder.cfg.to_dict(), objective="ar",
                         heads={"next_token": {"type": "linear", "out_features": 8**3}},
                         preprocessing={"spacing": [8.0] * 3})
    corpus = make_corpus(root)
    return {
        "segment": save_segmenter(root / "seg", spacing=8.0, window=32),
        "ar": save_checkpoint(root / "ar", objective.state_dict(), config),
        "image": corpus["image"],
        "seg": corpus["seg"],
    }


COMMANDS = ["segment", "explain", "finetune", "info"]
CHECKPOINT_TABLE = [(p, c) for p in BAD_CHECKPOINTS for c in COMMANDS if not (c == "info" and BAD_CHECKPOINTS[p][2])]


@pytest.mark.parametrize("problem, command", CHECKPOINT_TABLE, ids=[f"{p}-{c}" for p, c in CHECKPOINT_TABLE])
def test_bad_checkpoint_exits_2_with_one_line_naming_it(problem, command, good_checkpoints, tmp_path, capsys):
    import shutil

    from model_core.cli import main

    break_it, message, _ = BAD_CHECKPOINTS[problem]
    folder = tmp_path / "bad"
    shutil.copytree(good_checkpoints["segment" if command == "segment" else "ar"], folder)
    break_it(folder)
    out = tmp_path / "out"
    out.mkdir()
    image, seg = good_checkpoints["image"], good_checkpoints["seg"]
    args = {
        "segment": ["segment", "--model", folder, image, "-o", out / "labels.nii.gz", "--device", "cpu"],
        "explain": ["explain", image, "--model", folder, "--out", out / "maps", "--device", "cpu"],
        "finetune": ["finetune", "--model", folder, "--train", image, seg, "--out", out / "model",
                     "--steps", "1", "--window", "32", "--device", "cpu"],
        "info": ["info", folder],
    }[command]
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"ar3d: error: {folder}") and all("%|" in line for line in lines[:-1]), err
    assert re.search(message, lines[-1]), lines[-1]
    assert list(out.iterdir()) == [] and not (tmp_path / "pwned").exists()


def test_huge_config_is_refused_before_allocating(tmp_path):
    model, config = _encoder()
    folder = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    _edit_config(folder, encoder__width=2**20, encoder__depth=64)  # 12 * 2^40 * 64 values: 3.4 PB as float32
    checkpoint = load_checkpoint(folder)
    tracemalloc.start()
    with pytest.raises(CheckpointError, match=r"at least 844,\d{3},\d{3},\d{3},\d{3} values"):
        ckpt.build_encoder(checkpoint)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20


def test_half_precision_weights_load_into_a_float_model(tmp_path):
    model, config = _encoder()
    folder = save_checkpoint(tmp_path / "c", {k: v.half() for k, v in model.state_dict().items()}, config)
    encoder = ckpt.build_encoder(load_checkpoint(folder))
    assert encoder.start_token.dtype == torch.float32
    assert torch.allclose(encoder.start_token, model.start_token.half().float())


def test_count_values_reads_only_the_header(tmp_path):
    model, config = _encoder()
    folder = save_checkpoint(tmp_path / "c", model.state_dict(), config)
    assert ckpt.count_values(folder) == sum(t.numel() for t in model.state_dict().values())


def test_weights_get_the_same_permissions_as_the_config(tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, make_config(ViT3DConfig.preset("tiny").to_dict()))
    finally:
        os.umask(old)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o644
