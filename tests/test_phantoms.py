"""The procedural phantoms: determinism, geometry, anatomy and intensities."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from model_core.data.phantoms import (
    Phantom,
    insert_unexpected_object,
    make_brain_mri,
    make_ct_abdomen,
)
from model_core.errors import Ar3dInputError

GENERATORS = [make_ct_abdomen, make_brain_mri]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def cts() -> list[Phantom]:
    return [make_ct_abdomen(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def brains() -> list[Phantom]:
    return [make_brain_mri(seed) for seed in SEEDS]


def volume_ml(phantom: Phantom, label: int) -> float:
    return float((phantom.labels == label).sum() * np.prod(phantom.spacing) / 1000.0)


def centroid_ras(phantom: Phantom, mask: np.ndarray) -> np.ndarray:
    """World RAS mm of the centre of `mask`."""
    ijk = np.argwhere(mask).mean(0)
    return phantom.affine[:3, :3] @ ijk + phantom.affine[:3, 3]


def core(phantom: Phantom, label: int) -> np.ndarray:
    """The label's mask without its boundary voxels (no partial volume with the neighbours)."""
    return ndimage.binary_erosion(phantom.labels == label)


def median(phantom: Phantom, image: str, mask: np.ndarray) -> float:
    return float(np.median(phantom.images[image][mask]))


@pytest.mark.parametrize("make", GENERATORS)
def test_same_seed_same_phantom_other_seed_other_phantom(make):
    a, b, c = make(seed=7), make(seed=7), make(seed=8)
    assert a.images.keys() == b.images.keys()
    for name in a.images:
        assert np.array_equal(a.images[name], b.images[name])
        assert not np.array_equal(a.images[name], c.images[name])
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.affine, b.affine)
    assert not np.array_equal(a.labels, c.labels)
    assert not np.allclose(a.affine, c.affine)


@pytest.mark.parametrize(
    "make, shape, names, n_classes",
    [(make_ct_abdomen, (48, 40, 24), {"ct"}, 9), (make_brain_mri, (40, 48, 36), {"t1n", "t1c", "t2w", "t2f"}, 7)],
)
def test_shapes_dtypes_and_class_tables(make, shape, names, n_classes):
    phantom = make(seed=0, shape=shape)
    assert set(phantom.images) == names
    for image in phantom.images.values():
        assert image.shape == shape and image.dtype == np.float32 and np.isfinite(image).all()
    assert phantom.labels.shape == shape and phantom.labels.dtype == np.uint8
    assert phantom.affine.shape == (4, 4) and np.array_equal(phantom.affine[3], [0, 0, 0, 1])
    assert sorted(phantom.class_names) == list(range(n_classes)) and phantom.class_names[0] == "background"
    assert set(np.unique(phantom.labels)) <= set(phantom.class_names)
    assert phantom.colors.keys() == phantom.class_names.keys()
    for value, rgba in phantom.colors.items():
        assert len(rgba) == 4 and all(0.0 <= c <= 1.0 for c in rgba)
        assert (rgba[3] == 0.0) == (value == 0)  # only the background is transparent
    for mask in phantom.extra.values():
        assert mask.shape == shape and mask.dtype == bool


def test_ct_organ_volumes_are_adult_sized(cts):
    ranges_ml = {  # adult organ volumes (the lung, aorta and vertebrae: the part in a 18-26 cm slab)
        "liver": (900, 2500), "spleen": (60, 450), "kidney_right": (60, 300), "kidney_left": (60, 300),
        "aorta": (20, 200), "vertebrae": (80, 600), "lung": (30, 1500), "bowel": (100, 2500),
    }  # fmt: skip
    for ct in cts:
        assert ct.modality == "CT"
        for label, name in ct.class_names.items():
            if label:
                low, high = ranges_ml[name]
                assert low < volume_ml(ct, label) < high, (name, volume_ml(ct, label))


def test_ct_hounsfield_units(cts):
    for ct in cts:
        names = {name: label for label, name in ct.class_names.items()}
        assert 35 < median(ct, "ct", core(ct, names["liver"])) < 85
        assert 20 < median(ct, "ct", core(ct, names["spleen"])) < 70
        for kidney in ("kidney_right", "kidney_left"):
            assert -10 < median(ct, "ct", core(ct, names[kidney])) < 60
        assert 0 < median(ct, "ct", core(ct, names["aorta"])) < 80
        assert median(ct, "ct", ct.labels == names["vertebrae"]) > 300
        assert median(ct, "ct", core(ct, names["lung"])) < -700
        assert median(ct, "ct", ~ct.extra["body"]) < -950  # air around the patient
        body_fat = ct.extra["body"] & (ct.labels == 0) & (ct.images["ct"] < -50) & (ct.images["ct"] > -200)
        assert -130 < median(ct, "ct", body_fat) < -60
        assert (ct.images["ct"][ct.labels == names["bowel"]] < -900).any()  # bowel gas
        far_air = ~ndimage.binary_dilation(ct.extra["body"], iterations=3)
        assert 5 < ct.images["ct"][far_air].std() < 25  # noise (air is clipped at -1024 HU)


def test_ct_anatomical_sides_in_ras(cts):
    for ct in cts:
        c = {name: centroid_ras(ct, ct.labels == label) for label, name in ct.class_names.items() if label}
        body = centroid_ras(ct, ct.extra["body"])
        assert c["liver"][0] > body[0] + 20  # patient's right is +x in RAS
        assert c["spleen"][0] < body[0] - 40
        assert c["kidney_right"][0] > body[0] > c["kidney_left"][0]
        assert c["vertebrae"][1] < c["aorta"][1]  # spine posterior (-y) of the aorta
        assert c["aorta"][0] < c["vertebrae"][0]  # aorta left of the midline
        assert c["spleen"][1] < body[1]  # spleen posterior
        assert c["lung"][2] > c["liver"][2] > c["kidney_right"][2]  # lung bases at the top


def test_ct_random_spacing_is_in_the_affine_and_anatomy_is_in_millimetres():
    spacings = {make_ct_abdomen(seed, shape=(64, 64, 32)).spacing for seed in SEEDS}
    assert len(spacings) == len(SEEDS)
    for sx, sy, sz in spacings:
        assert sx == pytest.approx(sy) and 4.0 < sx < 7.0 and 5.0 < sz < 8.5  # FOV / shape
    fine = make_ct_abdomen(3, shape=(128, 128, 64), spacing=(2.8, 2.8, 4.0))
    coarse = make_ct_abdomen(3, shape=(96, 96, 48), spacing=(3.6, 3.6, 5.0))
    assert fine.spacing == pytest.approx((2.8, 2.8, 4.0)) and coarse.spacing == pytest.approx((3.6, 3.6, 5.0))
    assert np.sign(np.diag(fine.affine)[:3]).tolist() == [-1, -1, 1]  # LPS voxel axes, like DICOM
    for label in (1, 2):  # the same patient whatever the grid
        assert volume_ml(fine, label) == pytest.approx(volume_ml(coarse, label), rel=0.08)
    assert np.abs(centroid_ras(fine, fine.labels == 1) - centroid_ras(coarse, coarse.labels == 1)).max() < 4.0


def test_brain_tissue_volumes_and_tumour(brains):
    for brain in brains:
        assert brain.modality == "MRI"
        intracranial_ml = brain.extra["brainmask"].sum() * np.prod(brain.spacing) / 1000
        assert 1000 < intracranial_ml < 2000
        assert np.array_equal(brain.extra["brainmask"], brain.labels > 0)
        names = {name: label for label, name in brain.class_names.items()}
        assert 100 < volume_ml(brain, names["csf"]) < 500
        assert 300 < volume_ml(brain, names["grey_matter"]) < 900
        assert 400 < volume_ml(brain, names["white_matter"]) < 1000
        assert 1 < volume_ml(brain, names["enhancing_tumor"]) < 60
        assert 0.1 < volume_ml(brain, names["necrosis"]) < 30
        assert 5 < volume_ml(brain, names["edema"]) < 300
        tumour = np.isin(brain.labels, [names["enhancing_tumor"], names["necrosis"]])
        x_ras = brain.affine[0, 0] * np.argwhere(tumour)[:, 0] + brain.affine[0, 3]
        assert (x_ras > 0).all() or (x_ras < 0).all()  # one hemisphere
        edema_centre = centroid_ras(brain, brain.labels == names["edema"])
        assert np.linalg.norm(edema_centre - centroid_ras(brain, tumour)) < 25.0  # oedema around the tumour


def test_brain_contrasts(brains):
    for brain in brains:
        names = {name: label for label, name in brain.class_names.items()}
        csf, gm, wm = core(brain, names["csf"]), core(brain, names["grey_matter"]), core(brain, names["white_matter"])
        edema, rim = core(brain, names["edema"]), brain.labels == names["enhancing_tumor"]
        assert median(brain, "t1n", wm) > median(brain, "t1n", gm) > median(brain, "t1n", csf)
        assert median(brain, "t2w", csf) > median(brain, "t2w", gm) > median(brain, "t2w", wm)
        assert median(brain, "t2f", edema) > median(brain, "t2f", gm) > median(brain, "t2f", csf)
        assert median(brain, "t2w", edema) > median(brain, "t2w", wm)
        rim_gain = median(brain, "t1c", rim) / median(brain, "t1n", rim)
        wm_gain = median(brain, "t1c", wm) / median(brain, "t1n", wm)
        assert rim_gain > 1.5 * wm_gain  # enhancement on t1c only
        assert median(brain, "t1c", rim) > median(brain, "t1c", brain.labels == names["necrosis"])
        assert median(brain, "t1n", ~brain.extra["brainmask"] & (brain.images["t1n"] < 100)) < 60  # air


def test_brain_geometry_and_random_spacing():
    brains = [make_brain_mri(seed, shape=(48, 56, 48)) for seed in SEEDS]
    assert len({b.spacing for b in brains}) == len(SEEDS)
    for brain in brains:
        sx, sy, sz = brain.spacing
        assert sx == pytest.approx(sy) == pytest.approx(sz)
        fov = np.array(brain.shape) * sx
        assert (fov > [150, 180, 140]).all()  # the whole head fits
        assert np.sign(np.diag(brain.affine)[:3]).tolist() == [1, 1, 1]  # RAS voxel axes
    explicit = make_brain_mri(0, shape=(48, 56, 48), spacing=(4.0, 4.0, 4.0))
    assert explicit.spacing == pytest.approx((4.0, 4.0, 4.0))


@pytest.mark.parametrize("make", GENERATORS)
def test_bad_arguments_raise_a_clear_error(make):
    with pytest.raises(Ar3dInputError, match="shape"):
        make(shape=(64, 64))
    with pytest.raises(Ar3dInputError, match="spacing"):
        make(spacing=(1.0, -1.0, 1.0))


@pytest.mark.parametrize("make", GENERATORS)
def test_default_shapes_generate_in_under_two_seconds(make):
    make(seed=0)  # first call pays for imports and caches
    start = time.perf_counter()
    make(seed=1)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("make", GENERATORS)
def test_unexpected_object_is_a_bright_sphere_inside_the_body(make):
    phantom = make(seed=4, shape=(64, 64, 48))
    marked = insert_unexpected_object(phantom, seed=1, radius_mm=10.0)
    mask = marked.extra["unexpected"]
    inside = phantom.extra.get("body", phantom.extra.get("brainmask"))
    expected_voxels = 4 / 3 * np.pi * 10.0**3 / np.prod(phantom.spacing)
    assert 0.6 * expected_voxels < mask.sum() < 1.4 * expected_voxels
    assert not (mask & ~inside).any()
    assert np.array_equal(marked.labels, phantom.labels)
    assert "unexpected" not in phantom.extra  # the input is not modified
    for name, image in marked.images.items():
        assert np.array_equal(image[~mask], phantom.images[name][~mask])
        assert image[mask].min() > np.percentile(phantom.images[name][inside], 99.5)
    again = insert_unexpected_object(phantom, seed=1, radius_mm=10.0).extra["unexpected"]
    other = insert_unexpected_object(phantom, seed=2, radius_mm=10.0).extra["unexpected"]
    assert np.array_equal(mask, again) and not np.array_equal(mask, other)
