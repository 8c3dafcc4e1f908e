"""`ar3d demo`, the README's built-in default job: phantom -> ar3d-ct-organs -> explain -> Dice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model_core.io.volume import read_volume

# Dice of the shipped ar3d-ct-organs on the default demo phantom (seed 0, not a training seed),
# measured 2026-11-25, minus a margin of 0.1 for numerical drift across machines and torch versions.
DICE_FLOORS = {
    "liver": 0.76,
    "spleen": 0.68,
    "kidney_right": 0.62,
    "kidney_left": 0.68,
    "aorta": 0.44,
    "vertebrae": 0.67,
}
ON_THE_INPUT_GRID = ("truth", "segmentation", "uncertainty", "attention", "prediction", "surprise")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = subprocess.run([sys.executable, "-m", "model_core.cli", "demo", "--out", str(out)],
                            capture_output=True, encoding="utf-8", timeout=300)  # tqdm bars: not ASCII
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_demo_writes_every_file_on_the_input_grid(demo):
    out, stdout = demo
    image = read_volume(out / "ct_phantom.nii.gz")
    assert image.array.min() <= -900 and image.array.max() >= 300  # Hounsfield units: air and bone
    files = {"truth": "ct_phantom_labels.nii.gz", "segmentation": "ct_phantom_seg.nii.gz",
             "uncertainty": "ct_phantom_uncertainty.nii.gz", "attention": "explain/attention.nii.gz",
             "prediction": "explain/prediction.nii.gz", "surprise": "explain/surprise.nii.gz"}
    assert set(files) == set(ON_THE_INPUT_GRID)
    for name, relative in files.items():
        volume = read_volume(out / relative)
        assert volume.shape == image.shape, name
        assert np.allclose(volume.affine, image.affine, atol=1e-5), name
        assert str((out / relative).resolve()) in stdout or relative in stdout, name
    seg = read_volume(out / files["segmentation"]).array
    assert set(np.unique(seg).tolist()) == set(range(7))  # background and the six classes, all found
    attention = read_volume(out / files["attention"]).array
    assert np.isfinite(attention).all() and attention.max() > attention.min()


def test_demo_prints_dice_above_the_measured_floor(demo):
    out, stdout = demo
    scores = json.loads((out / "dice.json").read_text())["dice"]
    assert set(scores) == set(DICE_FLOORS)
    for name, floor in DICE_FLOORS.items():
        assert scores[name] >= floor, f"{name}: Dice {scores[name]:.3f} < {floor}"
        assert f"{name}" in stdout and f"{scores[name]:.3f}" in stdout
    assert "(a phantom it was not trained on)" in stdout
    assert "(patient's right: True)" in stdout


def test_demo_tells_how_to_open_the_files_in_napari(demo):
    out, stdout = demo
    line = next(line for line in stdout.splitlines() if line.strip().startswith("napari "))
    opened = line.split()[1:]
    assert opened[-2:] == ["--plugin", "napari-ar3d"]
    for path in opened[:-2]:
        assert Path(path).is_file() and Path(path).is_relative_to(out.resolve()), path
    assert any(p.endswith("ct_phantom_seg.nii.gz") for p in opened)

    from napari_ar3d._reader import read_layers

    kinds = [kind for _, _, kind in read_layers(opened[:-2])]
    assert kinds == ["image", "labels", "labels", "image", "image"]


def test_class_dice_matches_classes_by_name():
    from model_core.demo import class_dice

    truth = np.array([0, 1, 1, 2, 2, 3])
    pred = np.array([0, 2, 2, 1, 0, 0])  # the model numbers the classes the other way round
    scores = class_dice(pred, ["spleen", "liver", "lung"], truth, {1: "liver", 2: "spleen", 3: "kidney"})
    assert scores == {"spleen": pytest.approx(2 / 3, abs=1e-4), "liver": 1.0}


def test_write_phantom_is_deterministic_by_seed(tmp_path):
    from model_core.demo import write_phantom

    a = write_phantom(tmp_path / "a", seed=5).summary
    b = write_phantom(tmp_path / "b", seed=5).summary
    c = write_phantom(tmp_path / "c", seed=6).summary
    assert a == b and a != c
    assert a["liver_on_patient_right"] and a["world_to_voxel_error"] < 1e-6
