"""`ar3d finetune | segment | evaluate | info` on phantom files: outputs, geometry, and exit code 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_core.checkpoint.store import read_config
from model_core.cli import main
from model_core.data.phantoms import CT_CLASSES, make_ct_abdomen
from model_core.io.volume import read_volume, write_volume

TINY = ["--config", "tiny", "--set", "patch_size=8", "--set", "width=48", "--set", "depth=4", "--set", "heads=2"]
QUICK = ["--steps", "3", "--crops", "2", "--window", "32", "--spacing", "8", "--device", "cpu"]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code: int, err: str, *words: str) -> None:
    """Exit code 2 and one error line (after any progress bars), naming `words`."""
    assert code == 2, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("ar3d: error: "), err
    assert all("%|" in line for line in lines[:-1]), err  # nothing else but tqdm bars
    for word in words:
        assert word in lines[-1], err


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """Two CT phantoms with labels.json beside their segmentations, and one in LPS storage as NRRD."""
    root = tmp_path_factory.mktemp("scans")
    files = {}
    for seed in (0, 1):
        ph = make_ct_abdomen(seed, shape=(48, 40, 24))
        folder = root / f"case{seed}"
        folder.mkdir()
        files[f"ct{seed}"] = write_volume(folder / "ct.nii.gz", ph.images["ct"], ph.affine, kind="float")
        files[f"seg{seed}"] = write_volume(folder / "seg.nii.gz", ph.labels, ph.affine, kind="labels")
        (folder / "labels.json").write_text(json.dumps({str(k): v for k, v in CT_CLASSES.items() if k}))
    files["nrrd"] = write_volume(root / "ct1.nrrd", ph.images["ct"], ph.affine, kind="float")
    return files


@pytest.fixture(scope="module")
def model(tmp_path_factory, scans) -> Path:
    out = tmp_path_factory.mktemp("models") / "liver_spleen"
    code = main(["finetune", "--model", "scratch", *TINY, "--train", str(scans["ct0"]), str(scans["seg0"]),
                 "--train", str(scans["ct1"]), str(scans["seg1"]), "--labels", "1,2", "--out", str(out), *QUICK])
    assert code == 0
    return out


def test_finetune_writes_a_model_with_the_class_names(model, capsys):
    config = read_config(model)
    assert config["classes"] == ["liver", "spleen"]  # from labels.json beside the segmentations
    assert config["provenance"]["command"].startswith("ar3d finetune --model scratch")
    code, out, _ = run(capsys, "info", model)
    assert code == 0
    assert "classes: 1=liver, 2=spleen" in out
    assert "decoder: light" in out


def test_finetune_merges_labels(tmp_path, scans, capsys):
    code, out, _ = run(capsys, "finetune", "--model", "scratch", *TINY, "--train", scans["ct0"], scans["seg0"],
                       "--merge", "kidneys=3,4", "--out", tmp_path / "m", *QUICK)
    assert code == 0 and "classes kidneys" in out
    assert read_config(tmp_path / "m")["provenance"]["label_map"]["classes"] == {"kidneys": [3, 4]}


def test_segment_one_input_writes_labels_in_its_geometry(model, scans, tmp_path, capsys):
    out = tmp_path / "labels.nii.gz"
    code, stdout, _ = run(capsys, "segment", "--model", model, scans["ct1"], "-o", out, "--device", "cpu")
    assert code == 0 and str(out) in stdout
    image, labels = read_volume(scans["ct1"]), read_volume(out)
    assert labels.shape == image.shape
    assert np.allclose(labels.affine, image.affine, atol=1e-5)
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) <= {0, 1, 2}
    assert json.loads((tmp_path / "labels.labels.json").read_text()) == {"1": "liver", "2": "spleen"}
    tta = tmp_path / "tta.nii.gz"
    code, _, _ = run(capsys, "segment", "--model", model, scans["ct1"], "-o", tta, "--tta", "--device", "cpu")
    assert code == 0 and read_volume(tta).shape == image.shape

    code, stdout, _ = run(capsys, "evaluate", "--pred", out, "--truth", out, "--json")  # names from beside the file
    assert code == 0 and {c["name"] for c in json.loads(stdout)["classes"]} <= {"liver", "spleen"}


def test_segment_several_inputs_into_a_folder_with_probabilities(model, scans, tmp_path, capsys):
    folder = tmp_path / "out"
    code, _, _ = run(capsys, "segment", "--model", model, scans["ct0"], scans["nrrd"], "-o", folder,
                     "--probabilities", "--device", "cpu")
    assert code == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([
        "ct_seg.nii.gz", "ct_seg.labels.json", "ct_prob_background.nii.gz", "ct_prob_liver.nii.gz",
        "ct_prob_spleen.nii.gz", "ct_uncertainty.nii.gz",
        "ct1_seg.nrrd", "ct1_seg.labels.json", "ct1_prob_background.nrrd", "ct1_prob_liver.nrrd",
        "ct1_prob_spleen.nrrd", "ct1_uncertainty.nrrd",
    ])
    source = read_volume(scans["nrrd"])
    labels = read_volume(folder / "ct1_seg.nrrd")
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine, atol=1e-4)
    probs = np.stack([read_volume(folder / f"ct1_prob_{n}.nrrd").array for n in ("background", "liver", "spleen")])
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-4)
    assert np.array_equal(probs.argmax(axis=0), labels.array)


def test_evaluate_scores_a_segmentation_against_itself_and_another(scans, capsys):
    code, out, _ = run(capsys, "evaluate", "--pred", scans["seg0"], "--truth", scans["seg0"], "--json")
    assert code == 0
    report = json.loads(out)
    assert report["mean_dice"] == 1.0
    assert {c["name"] for c in report["classes"]} >= {"liver", "spleen"}
    assert all(c["hd95_mm"] == 0.0 for c in report["classes"])
    code, out, _ = run(capsys, "evaluate", "--pred", scans["seg0"], "--truth", scans["seg0"], "--labels", "1")
    assert code == 0 and "liver" in out and "1.000" in out


def test_evaluate_refuses_maps_on_different_grids(scans, tmp_path, capsys):
    seg = read_volume(scans["seg0"])
    other = write_volume(tmp_path / "cut.nii.gz", seg.array[2:], seg.affine, kind="labels")
    code, _, err = run(capsys, "evaluate", "--pred", other, "--truth", scans["seg0"])
    assert_error(code, err, "cut.nii.gz", "seg.nii.gz", "same voxel grid")


@pytest.mark.parametrize("problem", ["grid", "empty", "labels", "model", "out is a file"])
def test_finetune_bad_inputs_exit_2_and_write_nothing(problem, scans, tmp_path, capsys):
    image, seg, model, labels = scans["ct0"], scans["seg0"], "scratch", "all"
    words: tuple[str, ...] = ()
    if problem == "grid":
        volume = read_volume(seg)
        moved = volume.affine.copy()
        moved[0, 3] += 5.0
        seg = write_volume(tmp_path / "shifted_seg.nii.gz", volume.array, moved, kind="labels")
        words = ("ct.nii.gz", "shifted_seg.nii.gz", "same voxel grid")
    elif problem == "empty":
        volume = read_volume(seg)
        seg = write_volume(tmp_path / "empty_seg.nii.gz", np.zeros_like(volume.array), volume.affine, kind="labels")
        words = ("empty_seg.nii.gz", "empty")
    elif problem == "labels":
        labels = "1,77"
        words = ("77", "do not occur")
    elif problem == "model":
        model = "no-such-model"
        words = ("no-such-model",)
    out = tmp_path / "model"
    if problem == "out is a file":
        out.write_text("x")
        words = ("model", "folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, "finetune", "--model", model, *(TINY if model == "scratch" else []),
                       "--train", image, seg, "--labels", labels, "--out", out, *QUICK)
    assert_error(code, err, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("problem", ["model", "encoder", "input", "suffix"])
def test_segment_bad_inputs_exit_2_and_write_nothing(problem, model, scans, tmp_path, capsys):
    args = ["--model", model, scans["ct0"], "-o", tmp_path / "labels.nii.gz"]
    words: tuple[str, ...]
    if problem == "model":
        args[1], words = "no-such-model", ("unknown model", "no-such-model")
    elif problem == "encoder":
        from model_core.checkpoint.store import make_config, save_checkpoint
        from model_core.models.vit import ViT3D, ViT3DConfig

        cfg = ViT3DConfig(patch_size=8, width=48, depth=4, heads=2)
        encoder = save_checkpoint(tmp_path / "encoder", ViT3D(cfg).state_dict(), make_config(cfg.to_dict()))
        args[1], words = encoder, ("no segmentation decoder",)
    elif problem == "input":
        args[2], words = tmp_path / "missing.nii.gz", ("missing.nii.gz", "not found")
    else:
        args[4], words = tmp_path / "labels.png", ("labels.png",)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, "segment", *args, "--device", "cpu")
    assert_error(code, err, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_evaluate_by_name_pairs_classes_numbered_differently(tmp_path, capsys):
    from model_core.io.volume import write_label_names

    truth = np.zeros((16, 16, 8), np.uint8)  # TotalSegmentator-style numbering, vertebrae by level
    truth[2:6, 2:6, 2:6], truth[8:12, 2:6, 2:4], truth[8:12, 2:6, 4:6], truth[12:14, 10:14, 2:6] = 5, 31, 32, 2
    pred = np.zeros_like(truth)  # the model's numbering: 1 liver, 2 vertebrae, 3 aorta
    pred[2:6, 2:6, 2:6], pred[8:12, 2:6, 2:6], pred[0:2, 0:2, 0:2] = 1, 2, 3
    t = write_volume(tmp_path / "truth.nii.gz", truth, np.eye(4), kind="labels")
    p = write_volume(tmp_path / "pred.nii.gz", pred, np.eye(4), kind="labels")
    write_label_names(t, {2: "kidney_right", 5: "liver", 31: "vertebrae_L1", 32: "vertebrae_T12"})
    write_label_names(p, {1: "liver", 2: "vertebrae", 3: "aorta"})

    code, out, _ = run(capsys, "evaluate", "--pred", p, "--truth", t, "--by-name", "--merge", "vertebrae=31,32", "--json")
    assert code == 0
    report = json.loads(out)
    assert {c["name"]: c["dice"] for c in report["classes"]} == {"liver": 1.0, "vertebrae": 1.0}
    assert report["not_in_truth"] == ["aorta"]

    code, out, _ = run(capsys, "evaluate", "--pred", p, "--truth", t, "--by-name", "--json")  # no merge
    assert {c["name"]: c["dice"] for c in json.loads(out)["classes"]} == {"liver": 1.0}

    code, _, err = run(capsys, "evaluate", "--pred", p, "--truth", t, "--merge", "vertebrae=31,32")
    assert_error(code, err, "--by-name")
    (tmp_path / "pred.labels.json").unlink()
    code, _, err = run(capsys, "evaluate", "--pred", p, "--truth", t, "--by-name")
    assert_error(code, err, "pred.nii.gz", "pred.labels.json")
