"""The figure-making scripts in benchmarks/ that run fast enough for every test run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(init: str, case: str, dice: float) -> dict:
    return {"task": "t", "init": init, "case": case, "dice": {"tumor": dice}, "hd95_mm": {}, "seconds": 1.0}


def test_paired_dice_pairs_the_same_case_within_a_run(tmp_path, capsys):
    paired_dice = _load("paired_dice")
    (tmp_path / "s1.json").write_text(json.dumps([_run("ar", "a", 0.8), _run("scratch", "a", 0.7),
                                                  _run("ar", "b", 0.5), _run("scratch", "b", 0.6),
                                                  _run("ar", "c", 0.9)]))  # c: no scratch run, left out
    (tmp_path / "s2.json").write_text(json.dumps([_run("ar", "a", 0.9), _run("scratch", "a", 0.6)]))
    pairs = paired_dice.paired(sorted(tmp_path.glob("*.json")), "ar", "scratch")
    assert list(pairs) == ["t/tumor"]
    assert [(ar, scratch) for _, ar, scratch in pairs["t/tumor"]] == [(0.8, 0.7), (0.5, 0.6), (0.9, 0.6)]
    paired_dice.main([str(p) for p in sorted(tmp_path.glob("*.json"))])
    row = capsys.readouterr().out.splitlines()[-1].split(" | ")
    assert row[1:5] == ["3", "0.733", "0.633", "+0.100"] and row[-1] == "2/3 |"


def test_paired_dice_refuses_files_without_pairs(tmp_path):
    paired_dice = _load("paired_dice")
    (tmp_path / "s.json").write_text(json.dumps([_run("ar", "a", 0.8)]))
    with pytest.raises(SystemExit, match="no case scored by both ar and scratch"):
        paired_dice.main([str(tmp_path / "s.json")])


@pytest.mark.slow
def test_fewshot_quick_runs_a_shipped_encoder_by_name(shared_data, tmp_path):
    """`fewshot.py --ar ar3d-encoder`: a shipped name works as well as a folder, and the JSON holds a real Dice."""
    out = tmp_path / "runs.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fewshot.py"), "--quick", "--data", str(shared_data),
                    "--ar", "ar3d-encoder", "--inits", "ar", "--tasks", "brats_whole_tumor", "--out", str(out)],
                   check=True, timeout=600)
    (run,) = json.loads(out.read_text())
    assert run["init"] == "ar" and run["case"] == "brats2015_pat0003"
    assert 0.0 <= run["dice"]["whole_tumor"] <= 1.0 and run["seconds"] > 0
