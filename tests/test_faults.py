"""Faults: kill -9 during training and while saving, a full disk, out of memory in `ar3d segment`.

The kill tests run the real CLI in a subprocess of its own process group, wait until a checkpoint
exists, SIGKILL the group (DataLoader workers included), then check that the last checkpoint
loads and that `--resume` finishes with the same weights as a run that was never interrupted.
The full-disk tests mount a tiny tmpfs when the system allows it (root or a user namespace) and
otherwise skip; the ENOSPC-injection tests run everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_infer import save_segmenter

import model_core.checkpoint.store as ckpt
import model_core.io.volume as io
from model_core.checkpoint.store import (
    CONFIG_FILE,
    TRAIN_STATE_DIR,
    TrainState,
    load_checkpoint,
    load_train_state,
    make_config,
    save_checkpoint,
)
from model_core.cli import main
from model_core.data.phantoms import make_ct_abdomen
from model_core.errors import Ar3dEnvironmentError
from model_core.io.volume import write_volume
from model_core.models.vit import ViT3DConfig
from model_core.training.resume import work_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--set", "width=32", "--set", "depth=2", "--set", "heads=2"]
PRETRAIN = ["pretrain", "--data", "phantom:ct", "--phantoms", "1", "--crop", "32", "--slab", "16", *TINY,
            "--seed", "3", "--log-every", "1", "--device", "cpu"]
FINETUNE_MODEL = ["--model", "scratch", "--config", "tiny", "--set", "patch_size=8", "--set", "width=32",
                  "--set", "depth=2", "--set", "heads=2", "--window", "32", "--spacing", "8", "--crops", "2",
                  "--labels", "1", "--seed", "4", "--device", "cpu"]


# ----------------------------------------------------------------------------- helpers


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """`python -m model_core.cli ARGS` in a new session (its own process group), output to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "model_core.cli", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def saved_step(folder: Path) -> int | None:
    """The step of the checkpoint in `folder`, read without touching the folder (a save may be under way)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text())["provenance"]["steps"]
    except (OSError, ValueError, KeyError):
        return None


def kill_at_checkpoint(proc: subprocess.Popen, folder: Path, log: Path, timeout: float = 60.0) -> int:
    """SIGKILL `proc`'s process group as soon as `folder` holds a checkpoint; the step it had seen."""
    deadline = time.monotonic() + timeout
    while (step := saved_step(folder)) is None:
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint after {timeout} s:\n{log.read_text()}"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL, f"the run finished before the kill:\n{log.read_text()}"
    with pytest.raises(ProcessLookupError):  # no DataLoader worker survives
        for _ in range(100):
            os.killpg(proc.pid, 0)
            time.sleep(0.02)
    return step


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- kill -9 during training


def test_kill_during_pretrain_leaves_a_resumable_checkpoint(tmp_path, capsys):
    steps = ["--steps", "30", "--ckpt-every", "4"]
    assert main([*PRETRAIN, *steps, "--workers", "0", "--out", str(tmp_path / "straight")]) == 0

    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_cli(*PRETRAIN, *steps, "--workers", "1", "--out", run, log=log)
    kill_at_checkpoint(proc, run, log)
    killed = load_checkpoint(run)  # the last complete checkpoint loads
    state = load_train_state(run)
    assert state is not None and state.step == killed.config["provenance"]["steps"]
    assert state.step % 4 == 0 and state.step < 30

    assert main([*PRETRAIN, *steps, "--workers", "0", "--out", str(run), "--resume"]) == 0
    assert f"checkpoint: {run} (step 30" in capsys.readouterr().out
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(run)
    assert resumed.config["provenance"]["steps"] == 30
    assert max_difference(straight.state_dict, resumed.state_dict) < 1e-6
    logged = [int(line.split(",")[0]) for line in (run / "loss_log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, 31))  # rows past the checkpoint were dropped and written again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.log", "straight"]  # no temporary folder


def test_sigterm_to_the_process_group_stops_pretrain_cleanly_with_workers(tmp_path):
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_cli(*PRETRAIN, "--steps", "100000", "--ckpt-every", "4", "--workers", "2", "--out", run, log=log)
    deadline = time.monotonic() + 60
    while saved_step(run) is None:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # as `timeout` or a cluster scheduler sends it, workers included
    assert proc.wait(timeout=30) == 130, log.read_text()  # 130: stopped by a signal, after saving
    text = log.read_text()
    assert "stopping after this step" in text and "killed by signal" not in text, text
    state = load_train_state(run)
    assert state is not None and state.step == load_checkpoint(run).config["provenance"]["steps"]
    assert f"stopped at step {state.step}; checkpoint: {run}" in text
    logged = [int(line.split(",")[0]) for line in (run / "loss_log.csv").read_text().splitlines()[1:]]
    assert logged[-1] == state.step


def _write_pair(folder: Path) -> tuple[Path, Path]:
    ph = make_ct_abdomen(0, shape=(48, 40, 24))
    image = write_volume(folder / "ct.nii.gz", ph.images["ct"], ph.affine, kind="float")
    labels = write_volume(folder / "seg.nii.gz", ph.labels, ph.affine, kind="labels")
    return image, labels


def test_kill_during_finetune_leaves_a_resumable_checkpoint(tmp_path, capsys):
    image, labels = _write_pair(tmp_path)
    args = ["finetune", *FINETUNE_MODEL, "--train", str(image), str(labels), "--steps", "120"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    out, log = tmp_path / "model", tmp_path / "model.log"
    proc = start_cli(*args, "--ckpt-every", "5", "--out", out, log=log)
    work = work_folder(out)
    step = kill_at_checkpoint(proc, work, log)
    assert not out.exists()  # nothing is written to --out before the model is complete
    state = load_train_state(work)
    assert state is not None and state.step % 5 == 0 and step <= state.step < 120
    load_checkpoint(work)

    assert main([*args, "--ckpt-every", "5", "--out", str(out)]) == 2  # not without --resume
    assert "interrupted at step" in capsys.readouterr().err
    assert main([*args, "--ckpt-every", "7", "--out", str(out), "--resume"]) == 0
    assert f"model: {out}" in capsys.readouterr().out
    assert not work.exists() and TRAIN_STATE_DIR not in {p.name for p in out.iterdir()}
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(out)
    assert resumed.config["provenance"]["steps"] == 120 and resumed.config["classes"] == ["label_1"]
    assert max_difference(straight.state_dict, resumed.state_dict) < 1e-6


# ----------------------------------------------------------------------------- kill -9 while saving

SAVER = textwrap.dedent("""
    import sys, torch
    from model_core.checkpoint.store import TrainState, make_config, save_checkpoint
    from model_core.models.vit import ViT3DConfig
    encoder = ViT3DConfig.preset("tiny").to_dict()
    out, first = sys.argv[1], int(sys.argv[2])
    for v in range(first, first + 100000):
        weights = {"w": torch.full((256, 1024), float(v)), "b": torch.full((7,), float(v))}
        optimizer = {"state": {0: {"step": torch.tensor(float(v)), "exp_avg": torch.full((256, 1024), float(v))}},
                     "param_groups": [{"lr": 0.1, "params": [0]}]}
        save_checkpoint(out, weights, make_config(encoder, provenance={"steps": v}), TrainState(v, optimizer, {}))
        print(v, flush=True)
""")


def check_consistent(folder: Path) -> int:
    """Weights, config and train state of the checkpoint in `folder` all come from one save; its step."""
    loaded = load_checkpoint(folder)
    step = loaded.config["provenance"]["steps"]
    state = load_train_state(folder)
    assert state.step == step
    assert torch.equal(state.optimizer["state"][0]["exp_avg"], torch.full((256, 1024), float(step)))
    assert all(torch.equal(t, torch.full_like(t, float(step))) for t in loaded.state_dict.values())
    return step


def test_kill_at_random_moments_while_saving_keeps_one_complete_checkpoint(tmp_path):
    folder, log = tmp_path / "c", tmp_path / "saver.log"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    first, steps = 1, []
    for _ in range(6):
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, str(script), str(folder), str(first)], stdout=f, env=env,
                                    start_new_session=True)
        while saved_step(folder) is None or saved_step(folder) < first:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))  # a kill anywhere: writing, syncing, renaming, removing
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        step = check_consistent(folder)
        assert step >= first
        steps.append(step)
        first = step + 1  # the next run saves over what the kill left, as a resumed run does
    assert check_consistent(folder) == steps[-1]
    leftovers = {p.name for p in tmp_path.iterdir()} - {"c", "saver.py", "saver.log", ".c.saving", ".c.previous"}
    assert not leftovers, leftovers


def test_a_save_killed_while_removing_the_previous_checkpoint_does_not_block_the_next(tmp_path):
    encoder = ViT3DConfig.preset("tiny").to_dict()
    target = save_checkpoint(tmp_path / "c", {"w": torch.zeros(3)}, make_config(encoder))
    leftover = tmp_path / ".c.previous"
    leftover.mkdir()  # what a kill during the last step of a save leaves: part of the previous checkpoint
    (leftover / "model.safetensors").write_bytes(b"partly removed")
    save_checkpoint(target, {"w": torch.ones(3)}, make_config(encoder))
    assert torch.equal(load_checkpoint(target).state_dict["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_disk(tmp_path):
    """Mount a tmpfs of a given size (bytes) under tmp_path; skip where mounting is not allowed."""
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                        "the ENOSPC-injection tests cover this")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _assert_disk_full_error(message: str, path: Path) -> None:
    lines = message.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in message, message
    assert str(path) in lines[0] and "no space left on the device" in lines[0], message
    assert "free some space or choose another folder" in lines[0], message  # says what to do


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_volume_on_a_full_tmpfs(tiny_disk, suffix):
    disk = tiny_disk(256 * 1024)
    (disk / f"seg{suffix}").write_bytes(b"previous")
    noise = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)  # 1 MB that gzip cannot shrink
    with pytest.raises(Ar3dEnvironmentError) as err:
        write_volume(disk / f"seg{suffix}", noise, np.eye(4), kind="float")
    _assert_disk_full_error(str(err.value), disk / f"seg{suffix}")
    assert [p.name for p in disk.iterdir()] == [f"seg{suffix}"]  # no partial file, no temporary folder
    assert (disk / f"seg{suffix}").read_bytes() == b"previous"


def test_save_checkpoint_on_a_full_tmpfs(tiny_disk):
    disk = tiny_disk(1024 * 1024)
    encoder = ViT3DConfig.preset("tiny").to_dict()
    target = save_checkpoint(disk / "c", {"w": torch.zeros(1000)}, make_config(encoder))
    with pytest.raises(Ar3dEnvironmentError) as err:
        save_checkpoint(target, {"w": torch.ones(400_000)}, make_config(encoder))  # 1.6 MB
    _assert_disk_full_error(str(err.value), target)
    assert sorted(p.name for p in disk.iterdir()) == ["c"]
    assert torch.equal(load_checkpoint(target).state_dict["w"], torch.zeros(1000))


def test_pretrain_on_a_disk_that_fills_up_keeps_its_last_checkpoint(tiny_disk, capsys):
    disk = tiny_disk(5 * 1024 * 1024)  # one checkpoint of this model (3.5 MB with its optimizer state), not two
    out = disk / "run"
    code = main([*PRETRAIN, "--steps", "6", "--ckpt-every", "2", "--workers", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    _assert_disk_full_error(err.strip().splitlines()[-1], out)
    assert err.strip().splitlines()[-1].startswith(f"ar3d: error: {out}: could not write the checkpoint")
    assert load_train_state(out).step == 2 and sorted(p.name for p in disk.iterdir()) == ["run"]


def test_segment_onto_a_full_tmpfs_writes_nothing(tiny_disk, tmp_path, capsys):
    model = save_segmenter(tmp_path / "model")
    ph = make_ct_abdomen(1, shape=(64, 56, 32))
    scan = write_volume(tmp_path / "ct.nii.gz", ph.images["ct"], ph.affine, kind="float")
    disk = tiny_disk(300 * 1024)  # room for a probability map or two (about 100 kB each), not all four files
    code = main(["segment", str(scan), "--model", str(model), "-o", str(disk / "seg.nii.gz"), "--probabilities",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1, err
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith(f"ar3d: error: {disk / 'seg_prob_'}") and "Traceback" not in err
    _assert_disk_full_error(line, disk)
    assert list(disk.iterdir()) == []  # the maps written before the failure were removed


def test_enospc_in_write_volume_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(path, *args):
        Path(path).write_bytes(b"the first blocks")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(io, "_write_nifti", full_disk)
    with pytest.raises(Ar3dEnvironmentError) as err:
        write_volume(tmp_path / "seg.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4), kind="labels")
    _assert_disk_full_error(str(err.value), tmp_path / "seg.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_enospc_in_save_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    encoder = ViT3DConfig.preset("tiny").to_dict()
    target = save_checkpoint(tmp_path / "c", {"w": torch.zeros(3)}, make_config(encoder))
    real = ckpt.save_file

    def full_disk(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"the first blocks")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    ts = TrainState(1, {"state": {}, "param_groups": []}, {})
    with pytest.raises(Ar3dEnvironmentError) as err:
        save_checkpoint(target, {"w": torch.ones(3)}, make_config(encoder), ts)
    _assert_disk_full_error(str(err.value), target)
    monkeypatch.setattr(ckpt, "save_file", real)
    assert torch.equal(load_checkpoint(target).state_dict["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_enospc_in_the_loss_log_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("loss_log.csv") and "a" in mode:
            Path(file).write_text("step,loss,lr,tokens_per_s,time_s\n1,0.")  # a row cut short
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--steps", "2", "--workers", "0", "--out", str(out)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"ar3d: error: {out / 'loss_log.csv'}: could not write the loss log"), line
    assert "no space left on the device" in line
    monkeypatch.setattr(builtins, "open", real_open)
    assert not (out / "loss_log.csv").exists()  # the failed first write was undone


# ----------------------------------------------------------------------------- out of memory in ar3d segment


def test_cli_segment_prints_the_out_of_memory_fallback(tmp_path, monkeypatch, capsys):
    import model_core.inference.segment as infer

    real = infer._sliding_window

    def gpu_without_memory(segmenter, image, device, *args):
        if device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(segmenter, image, device, *args)

    monkeypatch.setattr(infer, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(infer, "_sliding_window", gpu_without_memory)
    model = save_segmenter(tmp_path / "model")
    ph = make_ct_abdomen(1, shape=(64, 56, 32))
    scan = write_volume(tmp_path / "ct.nii.gz", ph.images["ct"], ph.affine, kind="float")
    assert main(["segment", str(scan), "--model", str(model), "-o", str(tmp_path / "seg.nii.gz"),
                 "--device", "cuda"]) == 0
    err = capsys.readouterr().err
    for message in ("CUDA out of memory with 4 windows per batch; retrying with 2",
                    "CUDA out of memory with 2 windows per batch; retrying with 1",
                    "CUDA out of memory with 1 window per batch; falling back to CPU"):
        assert f"ar3d: warning: {scan}: {message}" in err, err
    assert "Traceback" not in err and (tmp_path / "seg.nii.gz").is_file()


@pytest.mark.parametrize("maps", ["attention,prediction,surprise,pca", "pca"])  # pca: nibabel writes the RGB map
def test_explain_onto_a_full_tmpfs_names_the_map_and_writes_nothing(tiny_disk, tmp_path, capsys, maps):
    from test_explain import SPACING, ct_volume, save_tiny_ar

    model = save_tiny_ar(tmp_path)
    scan = write_volume(tmp_path / "ct.nii.gz", ct_volume(), np.diag([SPACING] * 3 + [1.0]), kind="float")
    disk = tiny_disk(64 * 1024)  # less than the four maps need
    out = disk / "maps"
    code = main(["explain", str(scan), "--model", str(model), "--out", str(out), "--query", "20,18,15",
                 "--maps", maps, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"ar3d: error: {out}/") and ".explain-" not in line, line
    _assert_disk_full_error(line, out)
    assert list(disk.iterdir()) == []  # no map, no staging folder, no empty output folder
