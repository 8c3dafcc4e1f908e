"""The `ar3d` command line: help, pretrain end to end on phantoms, resume, errors, info."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_core.checkpoint.store import load_checkpoint
from model_core.cli import main
from model_core.errors import Ar3dEnvironmentError, Ar3dInputError, TrainingError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--set", "width=32", "--set", "depth=2", "--set", "heads=2"]
DATA = ["--data", "phantom:ct", "--phantoms", "2", "--crop", "32", "--slab", "16", "--workers", "0"]


def ar3d(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m model_core.cli` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "model_core.cli", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


def assert_one_line_error(proc_or_err: str, code: int, pattern: str) -> None:
    lines = proc_or_err.strip().splitlines()
    assert code == 2, proc_or_err
    assert "Traceback" not in proc_or_err
    assert lines[-1].startswith("ar3d: error: ") and pattern in lines[-1], proc_or_err


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    """A 3-step pretraining run on two CT phantoms, through a real subprocess."""
    out = tmp_path_factory.mktemp("runs") / "run"
    proc = ar3d("pretrain", *DATA, *TINY, "--out", out, "--steps", "3", "--log-every", "1",
                "--cache-dir", cache, "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith(f"checkpoint: {out}")
    return out


def test_help_lists_the_subcommands():
    proc = ar3d("--help")
    assert proc.returncode == 0
    for name in ("pretrain", "info"):
        assert name in proc.stdout


def test_help_does_not_import_torch():
    code = "import sys; from model_core.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "False"


def test_pretrain_writes_a_checkpoint(trained):
    assert {p.name for p in trained.iterdir()} >= {"config.json", "model.safetensors", "loss_log.csv", "train_state"}
    ckpt = load_checkpoint(trained)
    assert ckpt.config["encoder"]["width"] == 32 and ckpt.config["encoder"]["depth"] == 2
    assert ckpt.config["objective"] == "ar"
    prov = ckpt.config["provenance"]
    assert prov["steps"] == 3 and prov["seed"] == 5 and prov["data"] == ["phantom:ct"]
    assert prov["sequence"]["crop"] == 32 and "pretrain" in prov["command"]
    assert ckpt.state_dict["encoder.patch_embed.weight"].shape == (32, 1, 16, 16, 16)
    with open(trained / "loss_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss"]) > 0 for r in rows)


def test_resume_continues(trained, tmp_path, cache):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = load_checkpoint(out).state_dict
    proc = ar3d("pretrain", *DATA, *TINY, "--out", out, "--steps", "5", "--log-every", "1",
                "--cache-dir", cache, "--seed", "5", "--resume")
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(out)
    assert ckpt.config["provenance"]["steps"] == 5
    assert not torch.equal(ckpt.state_dict["head.proj.weight"], before["head.proj.weight"])
    with open(out / "loss_log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]


def test_init_starts_a_new_run_from_a_checkpoints_encoder(trained, tmp_path, cache, capsys):
    out = tmp_path / "continued"
    assert main(["pretrain", *DATA, "--init", str(trained), "--out", str(out), "--steps", "1", "--lr", "1e-12",
                 "--cache-dir", str(cache), "--workers", "0"]) == 0
    start, now = load_checkpoint(trained), load_checkpoint(out)
    assert now.config["encoder"] == start.config["encoder"]  # the size comes from --init
    for name, tensor in start.state_dict.items():
        if name.startswith("encoder.") or name.startswith("head.proj."):
            assert torch.allclose(now.state_dict[name], tensor, atol=1e-6), name  # a step of lr 1e-12 moves nothing
    assert now.config["provenance"]["init"]["name"] == trained.name
    assert str(tmp_path) not in json.dumps(now.config)  # provenance holds names, not paths
    assert main(["pretrain", *DATA, "--init", str(trained), *TINY, "--out", str(tmp_path / "x")]) == 2
    assert "--init keeps the size" in capsys.readouterr().err


def test_mae_objective_resumes_with_its_decoder(tmp_path, cache, capsys):
    argv = ["pretrain", *DATA, *TINY, "--objective", "mae", "--out", str(tmp_path / "mae"), "--cache-dir", str(cache)]
    assert main([*argv, "--steps", "1"]) == 0
    heads = load_checkpoint(tmp_path / "mae").config["heads"]
    assert heads == {"mae_decoder": {"mask_ratio": 0.75, "decoder_width": 16, "decoder_depth": 4, "decoder_heads": 2}}
    assert main([*argv, "--steps", "2", "--resume"]) == 0
    ckpt = load_checkpoint(tmp_path / "mae")
    assert ckpt.config["objective"] == "mae" and ckpt.config["provenance"]["steps"] == 2
    assert "mask_token" in ckpt.state_dict


def test_existing_checkpoint_without_resume_is_refused(trained, capsys):
    code = main(["pretrain", *DATA, *TINY, "--out", str(trained), "--steps", "4"])
    assert_one_line_error(capsys.readouterr().err, code, "pass --resume")


def test_resume_with_other_settings_is_refused(trained, capsys):
    code = main(["pretrain", *DATA, *TINY, "--out", str(trained), "--steps", "4", "--resume", "--crop", "64"])
    assert_one_line_error(capsys.readouterr().err, code, "sequence settings differ")


def test_missing_data_path_exits_2(tmp_path):
    proc = ar3d("pretrain", "--data", tmp_path / "nothere.nii.gz", "--out", tmp_path / "out", *TINY)
    assert_one_line_error(proc.stderr, proc.returncode, "nothere.nii.gz: file or folder not found")
    assert not (tmp_path / "out").exists()


def test_corrupt_file_exits_2(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    proc = ar3d("pretrain", "--data", bad, "--out", tmp_path / "out", *TINY, "--workers", "0")
    assert_one_line_error(proc.stderr, proc.returncode, "scan.nii.gz")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "colour=3"], "colour"),
        (["--set", "depth"], "is not KEY=VALUE"),
        (["--config", "huge"], "neither a size"),
        (["--sequence", "spatial,temporal"], "--sequence"),
        (["--spacing", "1,2"], "--spacing"),
        (["--steps", "0"], "steps must be a positive integer"),
    ],
)
def test_bad_options_exit_2(tmp_path, capsys, argv, message):
    code = main(["pretrain", "--data", "phantom:ct", "--phantoms", "1", "--out", str(tmp_path / "o"), *argv])
    assert_one_line_error(capsys.readouterr().err, code, message)


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", "phantoms"])  # no --out
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_info_lists_shipped_models(capsys, monkeypatch, tmp_path):
    from model_core.checkpoint import store as checkpoint

    monkeypatch.setattr(checkpoint, "SHIPPED_DIR", tmp_path / "none")
    assert main(["info"]) == 0
    assert "no models are shipped" in capsys.readouterr().out


def test_info_prints_the_card(trained, capsys):
    assert main(["info", str(trained)]) == 0
    card = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert card["model"] == str(trained)
    assert card["steps"] == "3" and card["data"] == "phantom:ct" and card["resumable"] == "yes"
    n = sum(t.numel() for t in load_checkpoint(trained).state_dict.values())
    assert card["parameters"].startswith(f"{n / 1e6:.2f} M")


def test_info_refuses_a_pickle(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    code = main(["info", str(tmp_path / "model.pt")])
    assert_one_line_error(capsys.readouterr().err, code, "never unpickles")


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "ar3d"
    if not script.exists():
        pytest.skip("the package is not installed (no ar3d console script)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "pretrain" in proc.stdout


# ----------------------------------------------------------------------------- errors by kind


@pytest.mark.parametrize("error, code", [
    (Ar3dInputError("is not a volume", "scan.nii.gz"), 2),
    (Ar3dEnvironmentError("could not write the file: no space left on the device; free some space", "o.nii.gz"), 1),
    (TrainingError("training diverged: the loss is nan at step 3; lower the learning rate"), 1),
])
def test_errors_for_the_user_are_one_line_with_their_exit_code(monkeypatch, capsys, error, code):
    def fail(config):
        raise error

    monkeypatch.setattr("model_core.checkpoint.card.summary", fail)
    assert main(["info"]) == code
    err = capsys.readouterr().err
    assert err == f"ar3d: error: {error}\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(config):
        return config["no such key"]

    monkeypatch.setattr("model_core.checkpoint.card.summary", bug)
    with pytest.raises(KeyError, match="no such key"):
        main(["info"])
