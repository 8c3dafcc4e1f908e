"""Alice: the objective (EMA teacher, centring, tube masks, CASA), the anatomical matchers, the
cross-patient views, and `ar3d pretrain --objective alice` end to end (resume, DDP)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_core.checkpoint.store import build_encoder, load_checkpoint, make_config, read_config
from model_core.cli import main
from model_core.data.anatomy import (
    Anatomy,
    BodyMatcher,
    CrossPatientViews,
    LabelMatcher,
    make_matcher,
    make_views_dataset,
    register_affine,
)
from model_core.data.preprocess import PreprocessConfig
from model_core.data.pretraining import CaseData, cases_from_manifest
from model_core.errors import Ar3dInputError
from model_core.io.volume import write_volume
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.alice import CASA, AliceObjective, tube_mask
from model_core.objectives.registry import build_objective
from model_core.training.loop import LOSS_LOG, TrainConfig, default_param_groups, train

REPO = Path(__file__).resolve().parents[1]
SMALL = {"head_hidden": 32, "head_bottleneck": 16, "out_dim": 24, "casa_heads": 2, "mask_grid": 8}


def small_objective(**options) -> AliceObjective:
    torch.manual_seed(0)
    encoder = ViT3D(ViT3DConfig(patch_size=8, width=24, depth=2, heads=2))
    return AliceObjective(encoder, schedule_steps=options.pop("schedule_steps", 100), **{**SMALL, **options})


# ----------------------------------------------------------------------------- the objective


def test_ema_moves_the_teacher_by_the_momentum_of_the_step():
    obj = small_objective(schedule_steps=10)
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {n: t.clone() for n, t in obj.teacher["encoder"].named_parameters()}
    student = dict(obj.encoder.named_parameters())
    obj.after_step()
    m = 0.996
    for name, t in obj.teacher["encoder"].named_parameters():
        torch.testing.assert_close(t, m * before[name] + (1 - m) * student[name])
    assert int(obj.step) == 1
    assert obj.momentum_at(0) == pytest.approx(0.996)
    assert obj.momentum_at(5) == pytest.approx(0.998)
    assert obj.momentum_at(10) == pytest.approx(1.0) and obj.momentum_at(50) == pytest.approx(1.0)
    assert obj.teacher_temp_at(0) == pytest.approx(0.04) and obj.teacher_temp_at(3) == pytest.approx(0.07)
    obj.reset_teacher()  # after --init loaded the student's encoder
    for name, t in obj.teacher["encoder"].named_parameters():
        torch.testing.assert_close(t, student[name], rtol=0, atol=0)


def test_centres_move_towards_the_teacher_mean_and_only_in_training():
    obj = small_objective()
    cls, patch = torch.full((4, 24), 2.0), torch.full((4, 5, 24), -1.0)
    obj.update_centers(cls, patch)
    obj.update_centers(cls, patch)
    torch.testing.assert_close(obj.center_cls, torch.full((1, 24), 2.0 * (1 - 0.9**2)))
    torch.testing.assert_close(obj.center_patch, torch.full((1, 1, 24), -1.0 * (1 - 0.9**2)))
    obj.eval()
    frozen = obj.center_cls.clone()
    obj(torch.rand(2, 2, 16, 16, 16))
    torch.testing.assert_close(obj.center_cls, frozen)
    obj.train()
    obj(torch.rand(2, 2, 16, 16, 16))
    assert not torch.equal(obj.center_cls, frozen)


def test_tube_mask_masks_three_quarters_of_the_in_plane_cells_through_depth():
    torch.manual_seed(0)
    mask = tube_mask(3, (8, 8, 4), (4, 4), 0.75)  # 2 x 2 patches per cell, 4 patches deep
    assert mask.shape == (3, 8 * 8 * 4) and mask.dtype == torch.bool
    grid = mask.reshape(3, 8, 8, 4)
    assert (grid == grid[..., :1]).all()  # the same through depth
    cells = grid[..., 0].reshape(3, 4, 2, 4, 2)
    assert (cells == cells[:, :, :1, :, :1]).all()  # whole cells
    assert (grid.float().mean(dim=(1, 2, 3)) == 0.75).all()
    assert not torch.equal(grid[0], grid[1])  # a mask per sample
    with pytest.raises(Ar3dInputError, match="2 in-plane cells"):
        tube_mask(1, (2, 2, 2), (1, 1), 0.75)


def test_casa_aligns_keys_onto_the_queries_shape():
    casa = CASA(16, 2, 32)
    out = casa(torch.randn(3, 7, 16), torch.randn(3, 11, 16))
    assert out.shape == (3, 7, 16)
    obj = small_objective()
    views = obj.views(torch.rand(2, 2, 16, 16, 24))
    assert views.shape == (4, 1, 1, 16, 16, 24)
    s_cls, s_enc, s_dec, recon = obj.student(views, obj.mask(views))
    assert s_cls.shape == (4, 24) and s_enc.shape == s_dec.shape == (4, 2 * 2 * 3, 16)
    assert recon.shape == (4, 1, 16, 16, 24)


def test_no_gradient_reaches_the_teacher():
    obj = small_objective()
    out = obj(torch.rand(2, 2, 16, 16, 16))
    assert set(out) == {"loss", "loss_cls", "loss_patch", "loss_rec", "mask"}
    torch.testing.assert_close(out["loss"], out["loss_cls"] + out["loss_patch"] + 10 * out["loss_rec"])
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert all(p.grad is not None for p in obj.parameters() if p.requires_grad)
    optimised = {id(p) for group in default_param_groups(obj, 0.01) for p in group["params"]}
    assert not optimised & {id(p) for p in obj.teacher.parameters()}


def test_bad_views_and_options_are_refused():
    obj = small_objective()
    with pytest.raises(Ar3dInputError, match="two views"):
        obj(torch.rand(2, 3, 16, 16, 16))
    with pytest.raises(Ar3dInputError, match="mask grid"):
        small_objective(mask_grid=16)(torch.rand(2, 2, 24, 16, 16))
    with pytest.raises(Ar3dInputError, match="multiple of the patch size"):
        small_objective(mask_grid=12)
    with pytest.raises(Ar3dInputError, match="unknown Alice option"):
        small_objective(mask_size=3)


class FixedPairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"volumes": torch.rand(2, 16, 16, 16, generator=g), "case": f"pair{i}"}


def test_a_short_run_lowers_the_loss_and_logs_every_term(tmp_path):
    """The loss falls over the first steps and the reconstruction keeps falling. (On 4 noise pairs the cls
    and patch terms then climb back to log(out_dim): centring flattens a teacher that sees no structure.)"""
    obj = build_objective("alice", ViT3D(ViT3DConfig(patch_size=8, width=24, depth=2, heads=2)), steps=30, **SMALL)
    assert obj.schedule_steps == 30
    config = make_config(obj.encoder.cfg.to_dict(), objective="alice", heads={"alice": obj.options.to_dict()})
    result = train(obj, FixedPairs(), TrainConfig(steps=30, lr=2e-3, warmup_steps=2, log_every=1, seed=0),
                   tmp_path / "run", checkpoint_config=config)
    losses = [loss for _, loss in result.history]
    assert min(losses[:10]) < 0.8 * losses[0], losses
    with open(tmp_path / "run" / LOSS_LOG, newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["loss_rec"]) < 0.5 * float(rows[0]["loss_rec"])
    assert list(rows[0])[:5] == ["step", "loss", "lr", "tokens_per_s", "time_s"]
    assert {"loss_cls", "loss_patch", "loss_rec"} <= set(rows[0]) and len(rows) == 30
    assert int(obj.step) == 30  # after_step ran once per optimizer step


# ----------------------------------------------------------------------------- matchers


def anatomy(case_id: str, lo, hi, centroids: dict | None = None, spacing=(1.0, 1.0, 1.0)) -> Anatomy:
    return Anatomy(case_id, case_id, "mri", (100, 100, 100), np.array(spacing, float), np.array(lo, float),
                   np.array(hi, float), {k: np.array(v, float) for k, v in (centroids or {}).items()})


def test_body_matcher_maps_relative_positions_in_the_foreground_box():
    a, b = anatomy("a", (10, 10, 10), (50, 30, 20)), anatomy("b", (0, 0, 0), (80, 40, 10))
    np.testing.assert_allclose(BodyMatcher().match(a, np.array([30, 20, 15]), b), [40, 20, 5])


def test_label_matcher_recovers_shifts_and_affine_maps_with_one_structure_left_out():
    rng = np.random.default_rng(0)
    points = rng.uniform(10, 90, size=(7, 3))
    names = [f"s{i}" for i in range(7)]
    shift = np.array([5.0, -3.0, 2.0])
    a = anatomy("a", (0, 0, 0), (99, 99, 99), dict(zip(names[:2], points[:2])))
    b = anatomy("b", (0, 0, 0), (99, 99, 99), dict(zip(names[:2], points[:2] + shift)))
    np.testing.assert_allclose(LabelMatcher().match(a, np.array([40.0, 40, 40]), b), [45, 37, 42])
    A = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.02, 0.0, 1.2]])
    a = anatomy("a", (0, 0, 0), (99, 99, 99), dict(zip(names, points)), spacing=(2.0, 2.0, 2.0))
    b = anatomy("b", (0, 0, 0), (99, 99, 99), dict(zip(names, points @ A.T + shift)), spacing=(2.0, 2.0, 2.0))
    held_out = LabelMatcher(exclude=["s6"]).match(a, points[6], b)  # fitted on 6 structures
    np.testing.assert_allclose(held_out, A @ points[6] + shift, atol=1e-6)
    assert LabelMatcher().match(a, points[0], anatomy("c", (0, 0, 0), (9, 9, 9))) is None


def blob_volume(shift=(0, 0, 0), shape=(48, 48, 40)) -> np.ndarray:
    """An asymmetric bright head-like shape: an ellipsoid with a brighter off-centre lobe."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    c = np.array([24, 22, 20]) + np.array(shift)
    body = ((x - c[0]) / 16) ** 2 + ((y - c[1]) / 13) ** 2 + ((z - c[2]) / 11) ** 2 < 1
    lobe = ((x - c[0] - 7) / 5) ** 2 + ((y - c[1] + 4) / 4) ** 2 + ((z - c[2] - 3) / 4) ** 2 < 1
    return (0.5 * body + 0.4 * lobe).astype(np.float32)


def case_data(image: np.ndarray, spacing: float = 2.0) -> CaseData:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return CaseData(image, affine, "mri", None, {"image": image}, ())


def test_registration_to_a_template_finds_the_shift():
    template, scan = case_data(blob_volume()), case_data(blob_volume(shift=(3, -2, 2)))
    matrix, dice = register_affine(template, scan, 0.05)
    assert dice > 0.9
    np.testing.assert_allclose(matrix[:3, 3], [6.0, -4.0, 4.0], atol=2.0)  # mm: within a 2 mm voxel
    matcher = make_matcher("registration", template, seed=0)
    a = anatomy("t", (0, 0, 0), (47, 47, 39), spacing=(2.0, 2.0, 2.0))
    b = anatomy("s", (0, 0, 0), (47, 47, 39), spacing=(2.0, 2.0, 2.0))
    matcher.prepare(a, template)
    matcher.prepare(b, scan)
    np.testing.assert_allclose(matcher.match(a, np.array([30.0, 20, 22]), b), [33, 18, 24], atol=1.0)
    with pytest.raises(Ar3dInputError, match="template"):
        make_matcher("registration")
    with pytest.raises(Ar3dInputError, match="unknown matcher"):
        make_matcher("sam")


# ----------------------------------------------------------------------------- the views dataset


def write_scan(folder: Path, name: str, shift=(0, 0, 0), empty: bool = False) -> dict:
    image = np.zeros((48, 48, 40), np.float32) if empty else blob_volume(shift) * 100
    labels = np.zeros(image.shape, np.uint8)
    c = np.array([24, 22, 20]) + np.array(shift)
    labels[c[0] - 8: c[0] - 4, c[1] - 2: c[1] + 2, c[2] - 2: c[2] + 2] = 1
    labels[c[0] + 4: c[0] + 8, c[1] - 2: c[1] + 2, c[2] - 2: c[2] + 2] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_volume(folder / f"{name}.nii.gz", image, affine, kind="float")
    write_volume(folder / f"{name}_seg.nii.gz", labels, affine, kind="labels")
    return {"id": name, "image": f"{name}.nii.gz", "seg": f"{name}_seg.nii.gz", "modality": "MRI",
            "labels": {"1": "left", "2": "right"}}


def write_manifest(folder: Path, *scans: dict) -> Path:
    path = folder / "manifest.json"
    path.write_text(json.dumps({"cases": list(scans)}))
    return path


@pytest.fixture(scope="module")
def two_patients(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two_patients")
    return write_manifest(folder, write_scan(folder, "p1"), write_scan(folder, "p2", shift=(3, -2, 1)))


def test_views_pair_a_foreground_crop_with_another_patients_matched_crop(two_patients):
    ds = make_views_dataset([two_patients], PreprocessConfig(), (16, 16, 16), seed=3)
    item = ds[5]
    assert item["volumes"].shape == (2, 16, 16, 16) and item["volumes"].dtype == torch.float32
    assert item["case"] in ("p1>p2", "p2>p1")
    torch.testing.assert_close(ds[5]["volumes"], item["volumes"])  # a function of (seed, index)
    assert not torch.equal(ds[6]["volumes"], item["volumes"])
    assert item["volumes"][0, 8, 8, 8] > 0  # the query is centred on foreground
    left = ds.anatomy[0].centroids["left"]  # same anatomy in both: the labels give the shift
    matched = ds.matcher.match(ds.anatomy[0], left, ds.anatomy[1])
    np.testing.assert_allclose(matched, ds.anatomy[1].centroids["left"], atol=0.5)


def test_one_patient_is_refused_naming_the_manifest(tmp_path):
    manifest = write_manifest(tmp_path, write_scan(tmp_path, "p7_2001-01-01"),
                              write_scan(tmp_path, "p7_2002-06-30", shift=(1, 0, 0)))
    with pytest.raises(Ar3dInputError, match="one patient") as err:
        make_views_dataset([manifest], PreprocessConfig(), (16, 16, 16))
    assert str(manifest) in str(err.value) and "\n" not in str(err.value)


def test_a_scan_without_foreground_is_refused_naming_it(tmp_path):
    manifest = write_manifest(tmp_path, write_scan(tmp_path, "p1"), write_scan(tmp_path, "p2", empty=True))
    with pytest.raises(Ar3dInputError, match="no foreground") as err:
        CrossPatientViews(cases_from_manifest(manifest), PreprocessConfig(), BodyMatcher())
    assert "p2.nii.gz" in str(err.value)


# ----------------------------------------------------------------------------- the command line

RUN = ["--workers", "0", "--device", "cpu", "--log-every", "1"]
ALICE = ["--objective", "alice", "--config", "tiny", "--set", "width=32", "--set", "depth=2", "--set", "heads=2",
         "--crop", "32", "--slab", "32", *RUN]


def test_cli_pretrains_resumes_and_the_encoder_serves_downstream(two_patients, tmp_path, capsys):
    out = tmp_path / "alice"
    assert main(["pretrain", "--data", str(two_patients), "--out", str(out), "--steps", "2", *ALICE]) == 0
    assert main(["pretrain", "--data", str(two_patients), "--out", str(out), "--steps", "3", "--resume", *RUN]) == 0
    with open(out / LOSS_LOG, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and all(float(r["loss_patch"]) > 0 for r in rows)
    config = read_config(out)
    assert config["objective"] == "alice" and config["provenance"]["steps"] == 3
    assert config["heads"]["alice"]["out_dim"] == 512 and config["provenance"]["sequence"]["crop"] == 32
    encoder = build_encoder(load_checkpoint(out))
    assert encoder.cfg.width == 32
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "objective alice" in capsys.readouterr().out
    maps = tmp_path / "maps"
    assert main(["explain", str(two_patients.parent / "p1.nii.gz"), "--model", str(out), "--out", str(maps),
                 "--maps", "pca"]) == 0
    assert (maps / "pca.nii.gz").is_file()
    folder = two_patients.parent
    assert main(["finetune", "--model", str(out), "--train", str(folder / "p1.nii.gz"), str(folder / "p1_seg.nii.gz"),
                 "--out", str(tmp_path / "seg"), "--steps", "2", "--crops", "1", "--window", "32", "--device", "cpu"]) == 0
    assert read_config(tmp_path / "seg")["objective"] == "segmentation"


def test_cli_refuses_one_patient(tmp_path, capsys):
    manifest = write_manifest(tmp_path, write_scan(tmp_path, "solo"))
    assert main(["pretrain", "--data", str(manifest), "--out", str(tmp_path / "o"), "--steps", "1", *ALICE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ar3d: error: ") and "one patient" in err[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a torchrun launch of two processes
def test_two_process_ddp_run(two_patients, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model_core.cli",
           "pretrain", "--data", str(two_patients), "--out", str(out), "--steps", "2", *ALICE]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = read_config(out)
    assert config["provenance"]["world_size"] == 2 and config["provenance"]["steps"] == 2
    state = load_checkpoint(out).state_dict
    assert int(state["step"]) == 2
    assert state["center_cls"].abs().sum() > 0  # centred on the teacher's outputs of both ranks
