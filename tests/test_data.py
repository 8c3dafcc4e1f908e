"""Preprocessing (orientation, resampling, intensity), cases, the cache, sequence builders, the dataset."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from model_core.data import pretraining as data_mod
from model_core.data.phantoms import CT_CLASSES, make_brain_mri, make_ct_abdomen
from model_core.data.preprocess import (
    IntensityConfig,
    PreprocessConfig,
    guess_modality,
    normalize_intensity,
    preprocess_volume,
    reorient_to_ras,
    resample_to_grid,
    resample_to_spacing,
    voxel_spacing,
)
from model_core.data.pretraining import (
    CONTRASTS,
    Case,
    PreprocessCache,
    PretrainDataset,
    SequenceConfig,
    cases_from_folder,
    cases_from_manifest,
    cases_from_paths,
    contrast_sequence,
    make_pretrain_dataset,
    phantom_cases,
    preprocess_case,
    semantic_sequence,
    spatial_sequence,
)
from model_core.errors import Ar3dInputError
from model_core.io.volume import read_volume

COARSE = PreprocessConfig(spacing=(3.0, 3.0, 3.0))  # small arrays keep the tests fast


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def make_affine(matrix: np.ndarray, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    return affine


def world(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates of every voxel centre, (3, *shape)."""
    ijk = np.indices(shape).reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def voxels_in(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Voxel coordinates, in the grid of `affine`, of world points (3, ...)."""
    inv = np.linalg.inv(affine)
    return np.einsum("ij,j...->i...", inv[:3, :3], xyz) + inv[:3, 3].reshape(3, *[1] * (xyz.ndim - 1))


def within(ijk: np.ndarray, shape, margin: float = 0.0) -> np.ndarray:
    """Whether voxel coordinates (3, ...) lie in a grid of `shape`, widened by `margin` voxels."""
    upper = np.array(shape).reshape(3, *[1] * (ijk.ndim - 1)) - 1
    return np.all((ijk >= -margin) & (ijk <= upper + margin), axis=0)


def ramp(xyz: np.ndarray) -> np.ndarray:
    """A linear function of world position: trilinear interpolation reproduces it exactly."""
    return (0.5 * xyz[0] - 0.25 * xyz[1] + 0.75 * xyz[2] + 3.0).astype(np.float32)


# ---------------------------------------------------------------- orientation and resampling


@pytest.mark.parametrize(
    "matrix",
    [
        np.diag([-0.8, -0.8, 2.5]),  # LPS, as DICOM / NRRD
        np.array([[0.0, 0.0, -2.0], [1.5, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # permuted and flipped axes
        rotation(2, 20) @ np.diag([-1.0, 1.2, -1.5]),  # oblique, flipped
    ],
)
def test_reorient_to_ras_keeps_world_positions(matrix):
    rng = np.random.default_rng(0)
    array = rng.random((7, 9, 11)).astype(np.float32)
    affine = make_affine(matrix, (10.0, -20.0, 30.0))
    out, out_affine = reorient_to_ras(array, affine)
    # Each output voxel's world position is an input voxel centre holding the same value.
    src = np.linalg.inv(affine) @ np.vstack([world(out_affine, out.shape).reshape(3, -1), np.ones(out.size)])
    src_idx = np.rint(src[:3]).astype(int)
    np.testing.assert_allclose(src[:3], src_idx, atol=1e-9)
    np.testing.assert_array_equal(out.reshape(-1), array[tuple(src_idx)])
    # Axes now point along R, A, S (for the oblique grid: the nearest ones).
    matrix = out_affine[:3, :3]
    assert np.all(np.diag(matrix) > np.abs(matrix - np.diag(np.diag(matrix))).max(0))
    assert sorted(out.shape) == sorted(array.shape)


def test_resample_to_spacing_keeps_centre_shape_and_values():
    shape = (40, 30, 20)
    affine = make_affine(np.diag([-1.0, -2.0, 3.0]), (5.0, 7.0, -11.0))
    image = ramp(world(affine, shape))
    out, out_affine = resample_to_spacing(image, affine, 1.5, order=1)
    assert out.shape == (27, 40, 40)  # round(40*1/1.5), round(30*2/1.5), round(20*3/1.5)
    np.testing.assert_allclose(voxel_spacing(out_affine), 1.5)
    centre = lambda a, s: a[:3, :3] @ ((np.array(s) - 1) / 2) + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(out_affine, out.shape), centre(affine, shape), atol=1e-9)
    np.testing.assert_array_equal(np.sign(np.diag(out_affine)[:3]), np.sign(np.diag(affine)[:3]))
    # Voxels whose centres lie inside the source grid hold the ramp at their world position.
    expected = ramp(world(out_affine, out.shape))
    inside = within(voxels_in(affine, world(out_affine, out.shape)), shape)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-3)

    labels = (np.indices(shape)[0] // 10).astype(np.uint8)
    out_labels, labels_affine = resample_to_spacing(labels, affine, 1.5, order=0)
    assert out_labels.dtype == np.uint8 and out_labels.shape == out.shape
    np.testing.assert_array_equal(labels_affine, out_affine)
    assert set(np.unique(out_labels)) == {0, 1, 2, 3}


def test_resample_to_spacing_is_fast():
    image = np.random.default_rng(0).random((240, 240, 155), dtype=np.float32)
    start = time.perf_counter()
    out, _ = resample_to_spacing(image, np.eye(4), 1.5, order=1)
    assert time.perf_counter() - start < 2.0
    assert out.shape == (160, 160, 103)


def test_resample_to_grid_oblique_round_trip():
    src_shape = (40, 40, 40)
    src_affine = make_affine(np.diag([-1.0, -1.0, 1.0]), (20.0, 20.0, -20.0))  # LPS, centred near 0
    image = ramp(world(src_affine, src_shape))
    dst_shape = (30, 30, 30)
    dst_matrix = rotation(2, 30) @ rotation(0, 20) @ np.diag([1.1, 1.1, 1.1])
    dst_affine = make_affine(dst_matrix, -dst_matrix @ (np.array(dst_shape) - 1) / 2)
    on_dst = resample_to_grid(image, src_affine, dst_shape, dst_affine, order=1, cval=-99.0)

    def inside(affine_from, shape_from, affine_to, shape_to, margin):
        return within(voxels_in(affine_to, world(affine_from, shape_from)), shape_to, margin)

    dst_in = inside(dst_affine, dst_shape, src_affine, src_shape, 0.0)
    dst_out = ~inside(dst_affine, dst_shape, src_affine, src_shape, 0.5)
    assert dst_in.mean() > 0.5 and dst_out.any()
    np.testing.assert_allclose(on_dst[dst_in], ramp(world(dst_affine, dst_shape))[dst_in], atol=1e-3)
    assert np.all(on_dst[dst_out] == -99.0)
    near = ~dst_in & ~dst_out  # within half a source voxel of the grid: the border value, not cval
    assert near.any() and np.all(on_dst[near] != -99.0)

    back = resample_to_grid(on_dst, dst_affine, src_shape, src_affine, order=1)
    # Source voxels whose neighbourhood went through valid destination voxels come back unchanged.
    src_in = inside(src_affine, src_shape, dst_affine, dst_shape, 0.0)
    valid = src_in & (resample_to_grid(dst_in.astype(np.float32), dst_affine, src_shape, src_affine, order=1) == 1.0)
    assert valid.mean() > 0.2
    np.testing.assert_allclose(back[valid], image[valid], atol=1e-3)

    labels = np.zeros(src_shape, np.uint8)
    labels[5:25, 10:30, 8:35] = 3
    labels[22:36, 4:20, 4:20] = 7
    fine_shape = (64, 64, 64)
    fine_matrix = rotation(2, 30) @ rotation(0, 20) @ np.diag([0.6, 0.6, 0.6])
    fine_affine = make_affine(fine_matrix, -fine_matrix @ (np.array(fine_shape) - 1) / 2)
    fine = resample_to_grid(labels, src_affine, fine_shape, fine_affine, order=0)
    assert fine.dtype == np.uint8 and set(np.unique(fine)) == {0, 3, 7}
    again = resample_to_grid(fine, fine_affine, src_shape, src_affine, order=0)
    covered = inside(src_affine, src_shape, fine_affine, fine_shape, 0.0)
    assert covered.sum() > 1000
    assert np.mean(again[covered] == labels[covered]) > 0.98


def test_preprocess_then_to_source_gives_back_the_labels():
    rng = np.random.default_rng(1)
    labels = np.zeros((30, 24, 18), np.uint8)
    labels[3:15, 5:20, 2:9] = 1
    labels[16:28, 2:12, 10:17] = 2
    image = (labels * 100 + rng.normal(0, 5, labels.shape)).astype(np.float32)
    affine = make_affine(np.diag([-1.0, -1.0, 1.0]), (12.0, 30.0, -4.0))
    one_mm = PreprocessConfig(spacing=(1.0, 1.0, 1.0))
    pre = preprocess_volume(image, one_mm, affine=affine, labels=labels.astype(np.float32))
    assert pre.modality == "mri" and pre.labels.dtype == np.uint8
    assert np.all(np.diag(pre.affine)[:3] > 0)  # RAS
    np.testing.assert_array_equal(pre.to_source(pre.labels, order=0), labels)
    # At a coarser spacing the labels still sit where the bright voxels are.
    coarse = preprocess_volume(image, COARSE, affine=affine, labels=labels, modality="MRI")
    assert coarse.array.shape == coarse.labels.shape
    assert coarse.array[coarse.labels == 2].mean() > coarse.array[coarse.labels == 0].mean() + 0.3


# ---------------------------------------------------------------- intensity


def test_ct_window_normalisation():
    hu = np.array([-2000, -1000, 0, 500, 1000, 3000], np.float32).reshape(1, 2, 3)
    out = normalize_intensity(hu, IntensityConfig("ct"))
    np.testing.assert_allclose(out.reshape(-1), [0, 0, 0.5, 0.75, 1, 1])
    narrow = normalize_intensity(hu, IntensityConfig("ct", window=(-1000.0, 0.0)))
    np.testing.assert_allclose(narrow.reshape(-1), [0, 0, 1, 1, 1, 1])
    assert out.dtype == np.float32


def test_mri_percentiles_ignore_zero_background():
    rng = np.random.default_rng(0)
    x = np.zeros((20, 20, 20), np.float32)
    x[5:15, 5:15, 5:15] = rng.uniform(100.0, 200.0, (10, 10, 10))  # 12.5% foreground
    cfg = IntensityConfig("mri", percentiles=(1.0, 99.0))
    out = normalize_intensity(x, cfg)
    low, high = np.percentile(x[x != 0], [1.0, 99.0])
    assert low > 100.0  # the zeros did not count
    fg = x != 0
    np.testing.assert_allclose(out[fg], np.clip((x[fg] - low) / (high - low), 0, 1), atol=1e-6)
    assert np.all(out[~fg] == 0.0)
    assert np.isclose(np.mean(out[fg] == 1.0), 0.01, atol=0.005)


def test_non_finite_voxels_become_the_finite_minimum():
    x = np.array([[[np.nan, -50.0], [np.inf, 20.0]], [[-np.inf, 100.0], [0.0, 10.0]]], np.float32)
    before = x.copy()
    out = normalize_intensity(x, IntensityConfig("ct", window=(-100.0, 100.0)))
    assert np.all(np.isfinite(out))
    assert out[0, 0, 0] == out[0, 1, 0] == out[1, 0, 0] == out[0, 0, 1] == pytest.approx(0.25)
    np.testing.assert_array_equal(np.isnan(x), np.isnan(before))  # input untouched


def test_all_non_finite_volume_is_an_error():
    with pytest.raises(Ar3dInputError, match="scan.nii.gz: .*no finite voxel"):
        normalize_intensity(np.full((4, 4, 4), np.nan, np.float32), IntensityConfig("mri"), source="scan.nii.gz")


def test_guess_modality():
    ct = make_ct_abdomen(0, shape=(48, 48, 24)).images["ct"]
    mri = make_brain_mri(0, shape=(40, 48, 40)).images["t1c"]
    assert guess_modality(ct) == "ct" and guess_modality(mri) == "mri"
    assert guess_modality(mri, "CT angiography, 1.5 mm") == "ct"
    assert guess_modality(ct, "MRI T1, cropped") == "mri"
    assert guess_modality(ct, "MR") == "mri"
    assert guess_modality(mri, "DICOM series, contrast") == "mri"  # "contrast" is not the word CT


def test_configs_round_trip_through_json():
    pre = PreprocessConfig(spacing=(1.0, 1.0, 2.0), intensity=IntensityConfig("ct", window=(-200.0, 300.0)))
    assert PreprocessConfig.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()).intensity is None
    seq = SequenceConfig(kinds=("spatial", "semantic"), crop=64)
    assert SequenceConfig.from_dict(json.loads(json.dumps(seq.to_dict()))) == seq
    with pytest.raises(Ar3dInputError, match="spacingg"):
        PreprocessConfig.from_dict({"spacingg": [1, 1, 1]})
    with pytest.raises(Ar3dInputError, match="temporal"):
        SequenceConfig(kinds=("temporal",))
    with pytest.raises(Ar3dInputError, match="spacing"):
        PreprocessConfig(spacing=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------- sequence builders


def coordinate_volume(shape, offset: float = 0.0) -> np.ndarray:
    """vol[x, y, z] = x*10000 + y*100 + z + offset: every voxel says where it is (exact in float32)."""
    x, y, z = np.indices(shape)
    return (x * 10000 + y * 100 + z + offset).astype(np.float32)


@pytest.fixture(scope="module")
def ct_phantoms() -> list:
    """Five small CT phantoms (different patients), preprocessed."""
    phantoms = [make_ct_abdomen(seed, shape=(64, 64, 32)) for seed in range(5)]
    return [
        preprocess_volume(p.images["ct"], COARSE, affine=p.affine, labels=p.labels, modality="CT") for p in phantoms
    ]


@pytest.fixture(scope="module")
def mri_phantom():
    return preprocess_case(phantom_cases("mri", 1)[0], COARSE)


def test_spatial_sequence_slabs_overlap_by_stride():
    vol = coordinate_volume((80, 90, 70))
    seq = spatial_sequence(vol, 64, np.random.default_rng(3), slab=32, stride=8)
    assert seq.shape == (4, 64, 64, 32) and seq.dtype == torch.float32
    s = seq.numpy()
    x0, y0, z0 = int(s[0, 0, 0, 0]) // 10000, int(s[0, 0, 0, 0]) // 100 % 100, int(s[0, 0, 0, 0]) % 100
    for t in range(4):  # slab t is the crop at z offset z0 + 8 t
        np.testing.assert_array_equal(s[t], vol[x0 : x0 + 64, y0 : y0 + 64, z0 + 8 * t : z0 + 8 * t + 32])
    for t in range(3):
        np.testing.assert_array_equal(s[t + 1][:, :, :24], s[t][:, :, 8:])
    other = spatial_sequence(vol, 64, np.random.default_rng(4))
    assert not torch.equal(seq, other)


def test_spatial_sequence_pads_small_volumes_with_the_minimum():
    vol = coordinate_volume((20, 30, 10), offset=5.0)
    seq = spatial_sequence(vol, 32, np.random.default_rng(0), slab=32, stride=8).numpy()
    assert seq.shape == (4, 32, 32, 32)
    block = np.concatenate([seq[0], seq[3][:, :, 8:]], axis=2)  # the whole (32, 32, 56) extent
    inside = block != 5.0
    assert inside.sum() == vol.size - 1  # every voxel of the volume once (its minimum looks like padding)
    np.testing.assert_array_equal(np.sort(block[inside]), np.sort(vol.reshape(-1))[1:])


def test_spatial_sequence_on_a_phantom(ct_phantoms):
    seq = spatial_sequence(ct_phantoms[0].array, 48, np.random.default_rng(0))
    assert seq.shape == (4, 48, 48, 32)
    torch.testing.assert_close(seq[1][:, :, :24], seq[0][:, :, 8:])
    assert seq.std() > 0.05  # real anatomy, not padding


def test_contrast_sequence_takes_one_location_in_each_contrast(mri_phantom):
    assert set(CONTRASTS) <= set(mri_phantom.contrasts)
    shape = mri_phantom.image.shape
    vols = {**mri_phantom.contrasts, "where": coordinate_volume(shape)}
    seq = contrast_sequence(vols, np.random.default_rng(2), 32, slab=32, order=("where", "t1n", "t2w", "t2f"))
    assert seq.shape == (4, 32, 32, 32)
    code = int(seq[0, 0, 0, 0])
    x0, y0, z0 = code // 10000, code // 100 % 100, code % 100
    for t, name in enumerate(("where", "t1n", "t2w", "t2f")):
        np.testing.assert_array_equal(seq[t].numpy(), vols[name][x0 : x0 + 32, y0 : y0 + 32, z0 : z0 + 32])
    four = contrast_sequence(mri_phantom.contrasts, np.random.default_rng(2), 32)
    assert four.shape == (4, 32, 32, 32)
    assert all(not torch.equal(four[a], four[b]) for a in range(4) for b in range(a + 1, 4))
    with pytest.raises(ValueError, match="t1n"):
        contrast_sequence({"t1c": mri_phantom.image}, np.random.default_rng(0), 32)


def test_semantic_sequence_centres_crops_on_the_structure(ct_phantoms):
    liver = next(k for k, v in CT_CLASSES.items() if v == "liver")
    # Volumes that show their own labels and which source they come from.
    sources = [(d.labels.astype(np.float32) + 100 * n, d.labels, CT_CLASSES) for n, d in enumerate(ct_phantoms)]
    for seed in range(3):
        seq = semantic_sequence(sources, "liver", np.random.default_rng(seed), 32, slab=32).numpy()
        assert seq.shape == (4, 32, 32, 32)
        centres = seq[:, 16, 16, 16]
        assert np.all(centres % 100 == liver)
        assert len(set(centres // 100)) == 4  # four different patients out of five
    few = semantic_sequence(sources[:2], "liver", np.random.default_rng(0), 32, slab=32).numpy()
    assert set(few[:, 16, 16, 16] // 100) == {0, 1}  # each available patient at least once
    images = [(d.array, d.labels, CT_CLASSES) for d in ct_phantoms]
    seq = semantic_sequence(images, "kidney_left", np.random.default_rng(0), 40, slab=32)
    assert seq.shape == (4, 40, 40, 32) and seq.dtype == torch.float32
    with pytest.raises(ValueError, match="hippocampus"):
        semantic_sequence(images, "hippocampus", np.random.default_rng(0), 32)


# ---------------------------------------------------------------- the dataset


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory) -> PretrainDataset:
    seq = SequenceConfig(kinds=("spatial", "contrast", "semantic"), crop=32, slab=32)
    cache_dir = tmp_path_factory.mktemp("cache")
    return make_pretrain_dataset(["phantoms"], seq, COARSE, seed=7, cache_dir=cache_dir, n_phantoms=2)


def test_dataset_items_are_a_pure_function_of_seed_and_index(phantom_dataset):
    ds = phantom_dataset
    assert ds.kinds == ("spatial", "contrast", "semantic")
    first = [ds[i] for i in range(8)]
    for i, item in enumerate(first):
        again = ds[i]
        assert item["kind"] == again["kind"] and item["case"] == again["case"]
        assert torch.equal(item["volumes"], again["volumes"])
        assert item["volumes"].shape == (4, 32, 32, 32)
    assert not torch.equal(first[0]["volumes"], first[1]["volumes"])
    kinds = {ds[i]["kind"] for i in range(40)}
    assert kinds == {"spatial", "contrast", "semantic"}
    other_seed = PretrainDataset(ds.cases, ds.seq_cfg, ds.pre_cfg, seed=8, cache_dir=ds.cache.cache_dir)
    assert not torch.equal(other_seed[0]["volumes"], first[0]["volumes"])

    loader = DataLoader(ds, batch_size=2, sampler=list(range(8)), num_workers=2)
    batches = list(loader)
    volumes = torch.cat([b["volumes"] for b in batches])
    torch.testing.assert_close(volumes, torch.stack([item["volumes"] for item in first]), rtol=0, atol=0)
    assert [c for b in batches for c in b["case"]] == [item["case"] for item in first]


def test_dataset_kinds_follow_the_data(phantom_dataset):
    ct_only = [c for c in phantom_dataset.cases if c.id.startswith("phantom_ct")]
    seq = SequenceConfig(kinds=("spatial", "contrast"), crop=32)
    ds = PretrainDataset(ct_only, seq, COARSE, cache_dir=phantom_dataset.cache.cache_dir)
    assert ds.kinds == ("spatial",)  # no multi-contrast case among CT phantoms
    with pytest.raises(Ar3dInputError, match="contrast"):
        PretrainDataset(ct_only, SequenceConfig(kinds=("contrast",)), COARSE, cache_dir=phantom_dataset.cache.cache_dir)
    semantic = [phantom_dataset[i] for i in range(40) if phantom_dataset[i]["kind"] == "semantic"]
    assert semantic and all("+" in item["case"] for item in semantic)  # two different cases each


# ---------------------------------------------------------------- the cache


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([-2.0, -2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def small_case(tmp_path) -> Case:
    rng = np.random.default_rng(0)
    labels = np.zeros((24, 20, 16), np.uint8)
    labels[4:12, 6:14, 3:10] = 1
    image = (labels * 400.0 - 900.0 + rng.normal(0, 10, labels.shape)).astype(np.float32)  # CT-like
    image_path = write_nifti(tmp_path / "img.nii.gz", image)
    return Case("small", image_path, write_nifti(tmp_path / "seg.nii.gz", labels), labels={1: "blob"})


def test_cache_reads_and_resamples_each_case_once(small_case, tmp_path, monkeypatch):
    calls = {"read": 0, "preprocess": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(data_mod, "read_volume", counting("read", data_mod.read_volume))
    monkeypatch.setattr(data_mod, "preprocess_volume", counting("preprocess", data_mod.preprocess_volume))
    cache_dir = tmp_path / "cache"
    first = PreprocessCache(cache_dir).load(small_case, COARSE)
    assert calls == {"read": 2, "preprocess": 1}  # image and seg, one resampling
    assert first.modality == "ct" and first.present == (1,)
    cache = PreprocessCache(cache_dir)  # a new process (or DataLoader worker) finds the files
    second = cache.load(small_case, COARSE)
    assert calls == {"read": 2, "preprocess": 1}
    assert isinstance(second.image, np.memmap)
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.affine, first.affine)
    assert cache.load(small_case, COARSE) is second  # in-process LRU
    cache.load(small_case, PreprocessConfig(spacing=(4.0, 4.0, 4.0)))  # another config: another entry
    assert calls["preprocess"] == 2
    os.utime(small_case.image, ns=(0, os.stat(small_case.image).st_mtime_ns + 10**9))  # the file changed
    PreprocessCache(cache_dir).load(small_case, COARSE)
    assert calls["preprocess"] == 3


def test_seg_and_extra_images_on_another_grid_land_on_the_image_grid(small_case, tmp_path):
    """A seg stored flipped (RAS instead of LPS) and an extra image holding a crop go through world space."""
    same = preprocess_case(small_case, COARSE)
    seg, image = read_volume(small_case.seg), read_volume(small_case.image)
    flipped_affine = image.affine @ np.array([[-1, 0, 0, 23], [0, -1, 0, 19], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    crop_affine = image.affine @ make_affine(np.eye(3), (2.0, 3.0, 1.0))
    crop = image.array[2:20, 3:18, 1:15]
    case = Case(
        "other_grids",
        small_case.image,
        write_nifti(tmp_path / "seg_ras.nii.gz", seg.array[::-1, ::-1].copy(), flipped_affine),
        extra_images={"crop": write_nifti(tmp_path / "crop.nii.gz", crop.copy(), crop_affine)},
    )
    other = preprocess_case(case, COARSE)
    np.testing.assert_array_equal(other.labels, same.labels)
    assert other.contrasts["crop"].shape == same.image.shape
    in_crop = voxels_in(crop_affine, world(same.affine, same.image.shape))
    inside = within(in_crop, crop.shape)
    assert 0.2 < inside.mean() < 0.9
    np.testing.assert_allclose(other.contrasts["crop"][inside], same.image[inside], atol=1e-5)
    far = ~within(in_crop, crop.shape, margin=1.0)
    assert far.any() and np.all(other.contrasts["crop"][far] == 0.0)


def test_cache_entries_are_written_atomically(small_case, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    real_save = np.save
    saved = []

    def failing_save(path, array, *args, **kwargs):
        saved.append(path)
        if len(saved) == 2:
            raise OSError("disk full")
        real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        PreprocessCache(cache_dir).load(small_case, COARSE)
    assert list(cache_dir.iterdir()) == []  # neither a half entry nor a temporary folder is left
    monkeypatch.setattr(np, "save", real_save)
    data = PreprocessCache(cache_dir).load(small_case, COARSE)
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert data.labels is not None


# ---------------------------------------------------------------- cases


def test_cases_from_folder_pairs_and_skips(tmp_path):
    blob = np.zeros((10, 12, 8), np.float32)
    study = tmp_path / "study"
    study.mkdir()
    write_nifti(study / "ct.nii.gz", blob)
    write_nifti(study / "ct_seg.nii.gz", blob.astype(np.uint8))
    write_nifti(study / "brainmask.nii.gz", blob)
    (study / "labels.json").write_text(json.dumps({"1": "liver"}))
    other = tmp_path / "other"
    other.mkdir()
    write_nifti(other / "a.nii", blob)
    write_nifti(other / "b.nrrd.nii.gz", blob)
    write_nifti(other / "dwi.nii.gz", np.zeros((10, 12, 8, 5), np.float32))  # 4D: skipped
    (other / "notes.txt").write_text("not an image")
    cases = {c.id: c for c in cases_from_folder(tmp_path)}
    assert sorted(cases) == ["other/a", "other/b.nrrd", "study/ct"]
    assert cases["study/ct"].seg == str(study / "ct_seg.nii.gz")
    assert cases["study/ct"].labels == {1: "liver"}
    assert cases["other/a"].seg is None


def test_cases_from_paths(tmp_path):
    cases = cases_from_paths(["phantoms"], n_phantoms=3)
    assert [c.id for c in cases] == [f"phantom_ct_{n}" for n in range(3)] + [f"phantom_mri_{n}" for n in range(3)]
    assert all(c.contrast_names() == set(CONTRASTS) for c in cases if c.id.startswith("phantom_mri"))
    image = write_nifti(tmp_path / "scan.nii.gz", np.zeros((8, 8, 8), np.float32))
    mixed = cases_from_paths(["phantom:mri", image, image], n_phantoms=1)
    assert [c.id for c in mixed] == ["phantom_mri_0", "scan", "scan#2"]
    with pytest.raises(Ar3dInputError, match="phantom kind 'pet'"):
        cases_from_paths(["phantom:pet"])
    with pytest.raises(Ar3dInputError, match="missing.nii.gz: file or folder not found"):
        cases_from_paths([str(tmp_path / "missing.nii.gz")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(Ar3dInputError, match="notes.txt: not an image file"):
        cases_from_paths([str(tmp_path / "notes.txt")])


def test_manifest_errors_name_the_manifest(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"cases": [{"id": "a", "image": "nowhere.nii.gz"}]}))
    with pytest.raises(Ar3dInputError, match="manifest.json: case a: image nowhere.nii.gz not found"):
        cases_from_manifest(manifest)
    manifest.write_text("{not json")
    with pytest.raises(Ar3dInputError, match="manifest.json: cannot read the manifest"):
        cases_from_manifest(manifest)


# ---------------------------------------------------------------- the shared real data


def test_shared_manifest_pretrain_cases(shared_data, manifest):
    cases = cases_from_manifest(shared_data / "manifest.json", use="pretrain")
    ids = {c.id for c in cases}
    assert not any(i.startswith("brats2015") for i in ids)  # non-commercial: never pretrain on it
    assert {"totalseg_ct_sm", "totalseg_ct_dicom", "itksnap_mricrop", "mni152", "brats_style_4seq"} <= ids
    assert ids == {e["id"] for e in manifest if "pretrain" in e["use"]}
    by_id = {c.id: c for c in cases}
    assert by_id["totalseg_ct_sm"].labels[1] == "spleen"  # from labels.json
    assert by_id["brats_style_4seq"].contrast_names() >= set(CONTRASTS)
    assert all(Path(c.image).is_absolute() and Path(c.image).exists() for c in cases)
    everything = {c.id for c in cases_from_manifest(shared_data / "manifest.json", use=None)}
    assert "brats2015_pat0003" in everything and len(everything) == len(manifest)
    assert {c.id for c in cases_from_paths([shared_data])} == ids


def test_shared_folder_scan_finds_dicom_series(shared_data):
    cases = {c.id: c for c in cases_from_folder(shared_data / "dcmqi_ct3slice")}
    assert sorted(cases) == ["dicom", "image"]  # liver_SEG.dcm is not a series of its own
    assert cases["image"].seg.endswith("seg.nii.gz")


def test_shared_case_labels_stay_on_the_anatomy(shared_data, tmp_path):
    case = next(c for c in cases_from_manifest(shared_data / "manifest.json") if c.id == "totalseg_ct_sm")
    data = PreprocessCache(tmp_path).load(case, PreprocessConfig(spacing=(2.0, 2.0, 2.0)))
    assert data.modality == "ct" and data.labels.shape == data.image.shape
    np.testing.assert_allclose(voxel_spacing(data.affine), 2.0)
    source = read_volume(case.image)
    seg = read_volume(case.seg)
    liver = next(k for k, v in case.labels.items() if v == "liver")
    centroid = lambda mask, affine: affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(
        centroid(data.labels == liver, data.affine), centroid(np.rint(seg.array) == liver, source.affine), atol=2.0
    )
    lung = next(k for k, v in case.labels.items() if v == "lung_lower_lobe_left")
    assert data.image[data.labels == lung].mean() < 0.2 < data.image[data.labels == liver].mean()


def test_mri_percentiles_skip_a_constant_background_of_a_z_scored_scan():
    from model_core.data.preprocess import (
        IntensityConfig,
        mri_background,
        normalize_intensity,
    )

    rng = np.random.default_rng(0)
    brain = rng.normal(0, 1, (20, 20, 20)).astype(np.float32)
    x = np.full((40, 40, 40), brain.min() - 0.5, np.float32)  # z-scored inside the brain, air one negative constant
    x[10:30, 10:30, 10:30] = brain
    assert mri_background(x) == x.min()
    out = normalize_intensity(x, IntensityConfig("mri"))
    low, high = np.percentile(brain, (0.5, 99.5))
    assert np.allclose(out[10:30, 10:30, 10:30], np.clip((brain - low) / (high - low), 0, 1), atol=1e-5)
    assert (out[:10] == 0).all()
    shifted = x - x.min()  # the same scan with its air at 0: the usual rule gives the same result
    assert mri_background(shifted) == 0.0
    assert np.allclose(normalize_intensity(shifted, IntensityConfig("mri")), out, atol=1e-5)


def test_contrast_names_in_other_spellings_make_a_contrast_sequence():
    from model_core.data.pretraining import Case, contrast_name

    assert [contrast_name(n) for n in ("t1pre", "T1post", "t2", "FLAIR", "t2f", "dwi")] == \
        ["t1n", "t1c", "t2w", "t2f", "t2f", "dwi"]
    case = Case("tcia", "/data/t1post.nii.gz", extra_images={"t1pre": "a", "t2": "b", "flair": "c"})
    assert case.image_name == "t1c" and case.contrast_names() == {"t1n", "t1c", "t2w", "t2f"}
