"""Explain: attention maps, next-token prediction, surprise, PCA features, `ar3d explain`.

Fast tests use a tiny random AR model (patch 8, width 32, depth 2, model spacing 2 mm); the
geometry test hand-sets block 0 so that each token attends to itself. The surprise test in the
fast suite checks the *mechanism* with an oracle predictor (the phantom without the object); the
slow test trains a tiny AR model on CT phantoms and checks that it *learned* to be surprised.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from model_core.checkpoint.store import make_config, save_checkpoint
from model_core.data.phantoms import insert_unexpected_object, make_ct_abdomen
from model_core.data.preprocess import IntensityConfig, PreprocessConfig
from model_core.errors import Ar3dInputError, CheckpointError
from model_core.inference.explain import (
    Cancelled,
    ExplainModel,
    attention_map,
    attention_matrix,
    explain,
    load_explain_model,
    next_token_prediction,
    patch_surprise,
    pca_features,
    prepare,
    surprise_map,
)
from model_core.io.volume import Volume, read_volume, voxel_to_world, write_volume
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.autoregressive import (
    AutoregressiveObjective,
    normalize_patches,
)

REPO = Path(__file__).resolve().parents[1]
P, SPACING, WINDOW = 8, 2.0, (32, 32, 16)
CT = PreprocessConfig(spacing=(SPACING,) * 3, intensity=IntensityConfig("ct"))


def tiny_objective(seed: int = 0, heads: int = 2) -> AutoregressiveObjective:
    torch.manual_seed(seed)
    return AutoregressiveObjective(ViT3D(ViT3DConfig(patch_size=P, width=32, depth=2, heads=heads)))


def as_model(objective: AutoregressiveObjective, preprocess: PreprocessConfig = CT) -> ExplainModel:
    return ExplainModel(objective.encoder, objective.head, preprocess, WINDOW)


def ct_volume(shape=(40, 36, 30), spacing=1.5, seed=0) -> np.ndarray:
    """Smooth random 'anatomy' in HU with some air, so that a CT window normalises it."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=shape), 3.0 / spacing)
    return (field / field.std() * 400.0).astype(np.float32)


def ras_affine(shape, spacing, rotation: np.ndarray | None = None) -> np.ndarray:
    """An affine with `rotation` (default none) @ diag(spacing), centred on world (5, -3, 2) mm."""
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag([spacing] * 3)
    affine[:3, 3] = np.array([5.0, -3.0, 2.0]) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def flipped(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels in world space, stored with i and k reversed and j, k swapped (an LPS-like file)."""
    I, _, K = array.shape
    flip = np.array([[-1, 0, 0, I - 1], [0, 1, 0, 0], [0, 0, -1, K - 1], [0, 0, 0, 1]], dtype=float)
    array, affine = array[::-1, :, ::-1], affine @ flip
    swap = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    return np.ascontiguousarray(array.transpose(0, 2, 1)), affine @ swap


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def geometry_cases() -> dict[str, Volume]:
    """One anatomy stored three ways: RAS, flipped and transposed, and oblique (rotated 25 deg and 10 deg)."""
    array = ct_volume()
    affine = ras_affine(array.shape, 1.5)
    flip_array, flip_affine = flipped(array, affine)
    oblique = ras_affine(array.shape, 1.7, rotation(25.0, 10.0))
    return {
        "ras": Volume(array, affine, "ras.nii.gz"),
        "flipped": Volume(flip_array, flip_affine, "flipped.nii.gz"),
        "oblique": Volume(array, oblique, "oblique.nii.gz"),
    }


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = rankdata(scores)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="session")
def model() -> ExplainModel:
    return as_model(tiny_objective())


def save_tiny_ar(folder: Path) -> Path:
    """A tiny AR checkpoint in the format `ar3d pretrain` writes (encoder.* and head.* tensors)."""
    objective = tiny_objective(seed=1)
    config = make_config(
        objective.encoder.cfg.to_dict(),
        objective="ar",
        heads={"next_token": {"type": "linear", "out_features": P**3}},
        preprocessing=PreprocessConfig(spacing=(SPACING,) * 3).to_dict(),
        provenance={"sequence": {"kinds": ["spatial"], "crop": 32, "slab": 16, "stride": 8, "n_sub": 4}},
    )
    return save_checkpoint(folder / "tiny-ar", objective.state_dict(), config)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_ar(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def headless_checkpoint(tmp_path_factory) -> Path:
    """An encoder without a next-token head (as an exported or MAE encoder)."""
    encoder = tiny_objective().encoder
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    config = make_config(encoder.cfg.to_dict(), objective="mae", preprocessing={"spacing": [SPACING] * 3})
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "no-head", state, config)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The geometry cases written as NIfTI files, and a 2D image."""
    folder = tmp_path_factory.mktemp("inputs")
    files = {name: write_volume(folder / f"{name}.nii.gz", v.array, v.affine, kind="float")
             for name, v in geometry_cases().items()}
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), folder / "slice.nii.gz")
    files["2d"] = folder / "slice.nii.gz"
    return files


# ----------------------------------------------------------------------------- loading


def test_checkpoint_loads_encoder_head_window_and_spacing(checkpoint):
    model = load_explain_model(checkpoint, device="cpu")
    saved = tiny_objective(seed=1)
    assert model.window == (32, 32, 16) and model.preprocess.spacing == (SPACING,) * 3
    for name, tensor in saved.head.state_dict().items():
        torch.testing.assert_close(model.head.state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(model.encoder.start_token, saved.encoder.start_token, rtol=0, atol=0)


def test_checkpoint_without_next_token_head_gives_attention_and_pca_only(headless_checkpoint, inputs, tmp_path):
    assert load_explain_model(headless_checkpoint, device="cpu").head is None
    with pytest.raises(CheckpointError, match="no next-token head; the prediction and surprise maps need"):
        explain(headless_checkpoint, inputs["ras"], tmp_path / "out", maps=["pca", "surprise"])
    written = explain(headless_checkpoint, inputs["ras"], tmp_path / "out", maps=["pca"])
    assert list(written) == ["pca"]


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("layer, head, rollout", [(0, None, False), (-1, None, False), (1, 1, False), (-1, None, True)])
def test_attention_rows_sum_to_one(model, layer, head, rollout):
    x = torch.rand(2, 1, 32, 32, 16)
    weights = attention_matrix(model.encoder, x, layer, head, rollout)  # (B, L, L)
    L = 1 + 4 * 4 * 2
    assert weights.shape == (2, L, L)
    assert weights.min() >= 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, L), atol=1e-5, rtol=0)


def test_rollout_differs_from_one_block_and_mixes_in_the_identity(model):
    x = torch.rand(1, 1, 32, 32, 16)
    plain = attention_matrix(model.encoder, x, 0)
    rolled = attention_matrix(model.encoder, x, 0, rollout=True)
    torch.testing.assert_close(rolled, 0.5 * plain + 0.5 * torch.eye(plain.shape[-1]), atol=1e-5, rtol=0)
    deeper = attention_matrix(model.encoder, x, 1, rollout=True)
    assert (deeper - rolled).abs().max() > 1e-4


def test_bad_layer_and_head_are_named(model):
    x = torch.rand(1, 1, 16, 16, 16)
    with pytest.raises(Ar3dInputError, match="layer 2 does not exist; the encoder has 2 blocks"):
        attention_matrix(model.encoder, x, layer=2)
    with pytest.raises(Ar3dInputError, match="head 5 does not exist"):
        attention_matrix(model.encoder, x, head=5)
    with pytest.raises(Ar3dInputError, match="rollout averages the heads"):
        attention_matrix(model.encoder, x, head=0, rollout=True)


def self_attending_model() -> ExplainModel:
    """Block 0 makes every token attend (almost only) to itself, whatever the image.

    The patch embedding is zeroed, so a token is its sin-cos position; with one head and
    q = k = 10 * LayerNorm(token), every LayerNorm output has the same norm and the score
    q_i . k_j is largest for j = i (Cauchy-Schwarz), by a wide margin.
    """
    objective = tiny_objective(heads=1)
    encoder = objective.encoder
    C = encoder.cfg.width
    with torch.no_grad():
        encoder.patch_embed.weight.zero_()
        qkv = encoder.blocks[0].attn.qkv
        qkv.weight[: 2 * C] = 10.0 * torch.eye(C).repeat(2, 1)
    return as_model(objective)


@pytest.mark.parametrize("case", ["ras", "flipped", "oblique"])
def test_attention_map_peaks_at_the_query_in_world_space(case):
    model = self_attending_model()
    volume = geometry_cases()[case]
    grid = prepare(model, volume)
    centre = voxel_to_world(volume.affine, (np.array(volume.shape) - 1) / 2)
    for offset_mm in ([-18.0, 12.0, 9.0], [15.0, -14.0, -10.0]):  # far from the centre: a flip would show
        target = centre + np.array(offset_mm)
        query = np.rint(np.linalg.solve(volume.affine[:3, :3], target - volume.affine[:3, 3])).astype(int)
        out = attention_map(model, grid, tuple(query), layer=0)
        assert out.shape == volume.shape
        peak = np.unravel_index(np.argmax(out), out.shape)
        distance = np.linalg.norm(voxel_to_world(volume.affine, peak) - voxel_to_world(volume.affine, query))
        # token centre within ~1 model voxel (2 mm) per axis of the query, plus half an input voxel
        assert distance < 7.0, (case, query, peak, distance)
        assert out.max() > 0.5


def test_query_outside_the_volume_names_query_and_shape(model):
    volume = geometry_cases()["ras"]
    with pytest.raises(Ar3dInputError, match=r"query voxel \(40, 0, 0\) is outside the volume of shape \(40, 36, 30\)"):
        attention_map(model, volume, (40, 0, 0))


# ----------------------------------------------------------------------------- prediction and surprise


def test_prediction_depends_only_on_earlier_tokens(model):
    """Perturb one patch: the patches before it (AR order, same window) and every other window keep
    their prediction; every later patch of its window changes; its own changes only through the
    de-normalisation with its true mean and std."""
    shape = (32, 32, 32)  # at the model spacing in RAS: the model grid is the input grid
    base = ct_volume(shape, spacing=SPACING, seed=3)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    token = (1, 2, 1)  # window 0 covers z 0..15 (token z 0, 1); window 1 z 16..31
    changed = base.copy()
    changed[8:16, 16:24, 8:16] += np.linspace(-300, 300, 512).reshape(8, 8, 8)
    before = next_token_prediction(model, Volume(base, affine))
    after = next_token_prediction(model, Volume(changed, affine))

    def patch(volume: np.ndarray, a: int, b: int, c: int) -> np.ndarray:
        return volume[a * P:(a + 1) * P, b * P:(b + 1) * P, c * P:(c + 1) * P]

    order = [(a, b, c) for a in range(4) for b in range(4) for c in range(2)]  # window 0, z fastest
    perturbed = order.index(token)
    for n, t in enumerate(order):
        difference = np.abs(patch(after, *t) - patch(before, *t)).max()
        if n < perturbed:
            assert difference < 1e-6, (t, difference)
        elif n > perturbed:
            assert difference > 1e-4, (t, difference)
    np.testing.assert_allclose(after[:, :, 16:], before[:, :, 16:], atol=1e-6)

    def normalised(volume: np.ndarray, image: np.ndarray) -> np.ndarray:
        true = patch(prepare(model, Volume(image, affine)).array, *token)
        return (patch(volume, *token) - true.mean()) / np.sqrt(true.var() + 1e-6)

    np.testing.assert_allclose(normalised(after, changed), normalised(before, base), atol=1e-4)


def test_surprise_mechanism_with_an_oracle_predictor(model):
    """Mechanism only (no learning): an oracle that predicts the phantom WITHOUT the object is
    wrong exactly where the object is, and the surprise map, on the input's own flipped CT grid,
    must light up there. Checks the metric, the token layout and the token-to-input geometry."""
    clean = make_ct_abdomen(seed=4, shape=(64, 64, 32))
    odd = insert_unexpected_object(clean, seed=4, radius_mm=12.0)
    grids = [prepare(model, Volume(p.images["ct"], p.affine)) for p in (clean, odd)]
    clean_patches, true_patches = (model.encoder.patchify(torch.from_numpy(g.array)[None, None]) for g in grids)
    oracle = normalize_patches(clean_patches)  # (1, n, p^3)
    tokens = patch_surprise(oracle, true_patches).reshape(grids[1].tokens).numpy()
    surprise = grids[1].tokens_to_input(tokens)
    assert surprise.shape == clean.shape
    inside, body = odd.extra["unexpected"], odd.extra["body"] & ~odd.extra["unexpected"]
    assert surprise[inside].mean() > 10 * surprise[body].mean()
    assert auroc(np.concatenate([surprise[inside], surprise[body]]),
                 np.r_[np.ones(inside.sum(), bool), np.zeros(body.sum(), bool)]) > 0.95


def test_maps_have_the_input_shape(model):
    volume = geometry_cases()["oblique"]
    grid = prepare(model, volume)
    surprise = surprise_map(model, grid)
    rgb = pca_features(model, grid)
    assert surprise.shape == volume.shape and rgb.shape == (*volume.shape, 3)
    assert np.isfinite(surprise).all() and surprise.min() >= 0
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.std(axis=(0, 1, 2)).min() > 0.05


@pytest.mark.slow  # trains for ~30-60 s on 2 CPU cores
def test_trained_model_is_surprised_by_an_unexpected_object(tmp_path):
    """Learned, not built in: a tiny AR model pretrained for 1500 steps on CT phantoms finds a
    metal-like sphere more surprising than the rest of the body; a random model of the same
    config does not (measured: AUROC about 0.76 vs 0.53 on these phantoms)."""
    from model_core.cli import main

    out = tmp_path / "ct-ar"
    code = main(["pretrain", "--data", "phantom:ct", "--phantoms", "4", "--crop", "32", "--slab", "16",
                 "--workers", "0", "--config", "tiny", "--set", "width=64", "--set", "depth=2",
                 "--set", "heads=2", "--set", f"patch_size={P}", "--out", str(out), "--steps", "1500",
                 "--batch-size", "4", "--lr", "1e-3", "--spacing", "3", "--sequence", "spatial", "--seed", "0"])
    assert code == 0
    trained = load_explain_model(out, device="cpu")
    torch.manual_seed(0)
    objective = AutoregressiveObjective(ViT3D(trained.encoder.cfg))
    untrained = ExplainModel(objective.encoder, objective.head, trained.preprocess, trained.window)
    scores = {"trained": [], "random": []}
    means = []
    for seed in range(20, 26):
        phantom = insert_unexpected_object(make_ct_abdomen(seed), seed=seed, radius_mm=12.0)
        inside = phantom.extra["unexpected"]
        body = phantom.extra["body"] & ~inside
        labels = np.r_[np.ones(inside.sum(), bool), np.zeros(body.sum(), bool)]
        for name, m in (("trained", trained), ("random", untrained)):
            s = surprise_map(m, Volume(phantom.images["ct"], phantom.affine))
            scores[name].append(auroc(np.concatenate([s[inside], s[body]]), labels))
            if name == "trained":
                means.append((s[inside].mean(), s[body].mean()))
    inside_mean, body_mean = np.mean(means, axis=0)
    assert inside_mean > body_mean
    assert sum(a > b for a, b in means) >= 5, means
    assert np.mean(scores["trained"]) > 0.65, scores
    assert np.mean(scores["trained"]) > np.mean(scores["random"]) + 0.1, scores


# ----------------------------------------------------------------------------- explain() and the CLI


@pytest.mark.parametrize("case", ["ras", "flipped", "oblique"])
def test_explain_writes_every_map_on_the_input_grid(checkpoint, inputs, tmp_path, case):
    source = read_volume(inputs[case])
    written = explain(checkpoint, inputs[case], tmp_path / "out", query_ijk=(5, 6, 7), device="cpu")
    assert sorted(written) == ["attention", "pca", "prediction", "surprise"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "attention.nii.gz", "pca.nii.gz", "prediction.nii.gz", "surprise.nii.gz"]
    for name, path in written.items():
        image = nib.load(path)
        expected = (*source.shape, 3) if name == "pca" else source.shape
        assert image.shape == expected, name
        np.testing.assert_array_equal(image.affine, source.affine)
        assert np.isfinite(np.asarray(image.dataobj)).all()


def test_query_mm_is_the_same_as_the_voxel_it_falls_in(checkpoint, inputs, tmp_path):
    volume = read_volume(inputs["flipped"])
    query = (30, 8, 11)
    world = voxel_to_world(volume.affine, query) + 0.2  # within the voxel
    by_index = explain(checkpoint, inputs["flipped"], tmp_path / "a", query_ijk=query, maps=["attention"])
    by_mm = explain(checkpoint, inputs["flipped"], tmp_path / "b", query_mm=world, maps=["attention"])
    a, b = (np.asarray(nib.load(p["attention"]).dataobj) for p in (by_index, by_mm))
    np.testing.assert_array_equal(a, b)
    other = explain(checkpoint, inputs["flipped"], tmp_path / "c", query_ijk=(5, 25, 30), maps=["attention"])
    assert not np.array_equal(a, np.asarray(nib.load(other["attention"]).dataobj))


def test_bad_arguments_write_nothing(checkpoint, headless_checkpoint, inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Ar3dInputError, match="2D"):
        explain(checkpoint, inputs["2d"], out)
    with pytest.raises(Ar3dInputError, match=r"query voxel \(40, 0, 0\) is outside the volume of shape \(40, 36, 30\)"):
        explain(checkpoint, inputs["ras"], out, query_ijk=(40, 0, 0))
    with pytest.raises(Ar3dInputError, match=r"query point .* is outside the volume"):
        explain(checkpoint, inputs["ras"], out, query_mm=(500.0, 0.0, 0.0))
    with pytest.raises(CheckpointError, match="no next-token head"):
        explain(headless_checkpoint, inputs["ras"], out)
    with pytest.raises(Ar3dInputError, match="unknown map"):
        explain(checkpoint, inputs["ras"], out, maps=["attention", "saliency"])
    with pytest.raises(Ar3dInputError, match="layer 7 does not exist"):
        explain(checkpoint, inputs["ras"], out, layer=7)
    assert not out.exists()


def test_cancel_writes_nothing(checkpoint, inputs, tmp_path):
    calls = []

    def stop_on_third_check() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(Cancelled):
        explain(checkpoint, inputs["ras"], tmp_path / "out", should_stop=stop_on_third_check)
    assert not (tmp_path / "out").exists()


def ar3d(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "model_core.cli", *map(str, args)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def test_cli_explain_writes_the_maps(checkpoint, inputs, tmp_path):
    proc = ar3d("explain", "--model", checkpoint, inputs["oblique"], "--out", tmp_path / "out",
                "--query", "3,4,5", "--maps", "attention,surprise", "--layer", "-2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["attention.nii.gz", "surprise.nii.gz"]
    assert str(tmp_path / "out" / "surprise.nii.gz") in proc.stdout


@pytest.mark.parametrize("problem", ["2d", "query", "no-head"])
def test_cli_errors_are_one_line_with_exit_code_2(checkpoint, headless_checkpoint, inputs, tmp_path, problem):
    out = tmp_path / "out"
    args = {
        "2d": ["--model", checkpoint, inputs["2d"]],
        "query": ["--model", checkpoint, inputs["ras"], "--query", "0,36,0"],
        "no-head": ["--model", headless_checkpoint, inputs["ras"]],
    }[problem]
    proc = ar3d("explain", *args, "--out", out)
    expected = {"2d": "2D", "query": "outside the volume of shape (40, 36, 30)", "no-head": "no next-token head"}
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ar3d: error: ") and expected[problem] in lines[0], proc.stderr
    assert not out.exists()
