"""Procedural CT and MRI phantoms with known labels (numpy + scipy only).

Every phantom is drawn from its seed alone (`np.random.default_rng(seed)`), so the same seed gives
bit-identical arrays. Anatomy is defined in millimetres in patient coordinates, so a finer or
coarser voxel grid shows the same anatomy with more or fewer voxels.

Geometry follows `model_core.io.volume.Volume`: arrays are indexed `(i, j, k)` like nibabel, and
`Phantom.affine` maps `(i, j, k, 1)` to world millimetres in RAS+ (x to the patient's Right,
y Anterior, z Superior). The CT is stored with DICOM-like voxel axes (i runs to the patient's left,
j to posterior, k to superior: affine diag(-s, -s, s)); the MRI with RAS voxel axes (affine
diag(s, s, s)). Both are centred near world (0, 0) in-plane, so a structure on the patient's right
has a positive RAS x.

Labels: 0 is "background" (everything without a class: air, fat, muscle, skull...) and appears in
`class_names` and `colors` (transparent) like every other value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from model_core.errors import Ar3dInputError
from model_core.vocabulary import CONTRASTS

__all__ = [
    "CT_CLASSES",
    "MRI_CLASSES",
    "Phantom",
    "insert_unexpected_object",
    "make_brain_mri",
    "make_ct_abdomen",
]

CT_CLASSES: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "aorta",
    6: "vertebrae",
    7: "lung",
    8: "bowel",  # stomach, small bowel and colon, their gas included
}
CT_COLORS: dict[int, tuple[float, float, float, float]] = {
    0: (0.0, 0.0, 0.0, 0.0),
    1: (0.69, 0.31, 0.22, 1.0),  # liver: brown-red
    2: (0.55, 0.27, 0.62, 1.0),  # spleen: purple
    3: (0.90, 0.62, 0.25, 1.0),  # kidneys: orange
    4: (0.95, 0.78, 0.35, 1.0),
    5: (0.86, 0.08, 0.10, 1.0),  # aorta: arterial red
    6: (0.96, 0.93, 0.84, 1.0),  # vertebrae: bone white
    7: (0.55, 0.76, 0.96, 1.0),  # lung: light blue
    8: (0.93, 0.80, 0.58, 1.0),  # bowel: pale tan
}
MRI_CLASSES: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "grey_matter",
    3: "white_matter",
    4: "edema",
    5: "enhancing_tumor",
    6: "necrosis",
}
MRI_COLORS: dict[int, tuple[float, float, float, float]] = {
    0: (0.0, 0.0, 0.0, 0.0),
    1: (0.35, 0.60, 0.95, 1.0),  # csf: blue
    2: (0.62, 0.62, 0.62, 1.0),  # grey matter: grey
    3: (0.95, 0.95, 0.92, 1.0),  # white matter: off-white
    4: (0.30, 0.80, 0.30, 1.0),  # edema: green (BraTS)
    5: (0.95, 0.85, 0.15, 1.0),  # enhancing tumor: yellow (BraTS)
    6: (0.85, 0.15, 0.15, 1.0),  # necrosis: red (BraTS)
}


@dataclass
class Phantom:
    """A synthetic scan: co-registered images, their label map and the geometry.

    `images` maps a name ("ct", or "t1n", "t1c", "t2w", "t2f") to a float32 array (I, J, K);
    `labels` is a uint8 array (I, J, K) with values in `class_names`; `extra` holds boolean masks
    (I, J, K): "body" (CT), "brainmask" (MRI: everything inside the skull) and, after
    `insert_unexpected_object`, "unexpected".
    """

    images: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: dict[int, str]
    affine: np.ndarray
    modality: str
    colors: dict[int, tuple[float, float, float, float]]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (the column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)


def make_ct_abdomen(
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 64),
    spacing: tuple[float, float, float] | None = None,
) -> Phantom:
    """A non-contrast CT of the upper abdomen in Hounsfield units, from the lung bases down.

    Anatomy (patient frame, RAS): liver on the patient's right (+x), spleen left (-x) and
    posterior, kidneys on both sides of the spine, aorta just anterior and left of the vertebral
    bodies, spine posterior (-y), lung bases in the top (most superior) slices, stomach and bowel
    loops with gas anteriorly. The label map is warped by a smooth random displacement field;
    intensities get per-organ offsets, texture, a slight blur and Gaussian noise (10-20 HU).
    With `spacing=None` a random field of view (340-420 mm in-plane, 180-260 mm craniocaudal)
    sets the spacing, so the body fits whatever the `shape`.
    """
    shape = _check_shape(shape, "make_ct_abdomen")
    rng = np.random.default_rng(seed)  # every step below draws from it, in this order
    affine, c = _ct_canvas(rng, shape, spacing)
    body, cavity = _paint_body_wall(c)
    _paint_thorax_and_upper_organs(c, cavity)
    _paint_stomach(c, cavity)
    _paint_kidneys(c, cavity)
    _paint_bowel(c, cavity & (c.labels == 0))
    _paint_vessels_and_muscles(c)
    _paint_spine(c)
    return Phantom(
        images={"ct": _ct_intensities(c)},
        labels=c.labels,
        class_names=dict(CT_CLASSES),
        affine=affine,
        modality="CT",
        colors=dict(CT_COLORS),
        extra={"body": body},
    )


@dataclass
class _CTCanvas:
    """A CT being painted: warped patient coordinates (mm) and the HU and label maps, all (I, J, K)."""

    rng: np.random.Generator
    u: np.ndarray  # mm to the patient's right
    v: np.ndarray  # mm anterior
    t: np.ndarray  # mm below the top of the field of view
    axes: tuple[np.ndarray, ...]  # the unwarped RAS position of the voxels along each axis: (I,), (J,), (K,)
    box: tuple  # the physical box of the noise lattices ((lo, hi) mm per axis)
    hu: np.ndarray  # float32, air (-1000) until painted
    labels: np.ndarray  # uint8, background (0) until painted

    def jitter(self) -> float:
        """A per-structure HU offset."""
        return self.rng.normal(0.0, 6.0)

    def paint(self, mask: np.ndarray, value: float, label: int | None = None) -> None:
        """Set HU in `mask`, and the label unless None (None: a detail inside the organ already there)."""
        self.hu[mask] = value
        if label is not None:
            self.labels[mask] = label

    def ellipsoid(self, centre: tuple, semi: tuple, rot_deg: float = 0.0) -> np.ndarray:
        return _ellipsoid(self.u, self.v, self.t, centre, semi, rot_deg)


def _ct_canvas(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float] | None
) -> tuple[np.ndarray, _CTCanvas]:
    """Draw the patient's size, the field of view and the warp: the affine and an empty canvas (air)."""
    body_scale = rng.uniform(0.9, 1.05)  # in-plane size of the patient
    cc_scale = rng.uniform(0.9, 1.1)  # craniocaudal size of the organs
    fov_mm = (rng.uniform(340.0, 420.0) * body_scale, rng.uniform(180.0, 260.0))  # drawn whatever `spacing`
    if spacing is None:
        s = fov_mm[0] / max(shape[0], shape[1])
        spacing = (s, s, fov_mm[1] / shape[2])
    spacing = _check_spacing(spacing, "make_ct_abdomen")
    fov_centre = (rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-200.0, 0.0))
    # DICOM-like voxel axes: i -> patient's left, j -> posterior, k -> superior.
    affine = _affine(shape, spacing, signs=(-1, -1, 1), centre=fov_centre)
    x, y, z = _grid_axes(affine, shape)
    z_top = fov_centre[2] + 0.5 * fov_mm[1]  # the top slice when `spacing` is random; anatomy hangs from it
    axes, box = (x, y, z_top - z), ((-260.0, 260.0), (-260.0, 260.0), (-20.0, 320.0))  # t: mm below z_top
    u, v, t = _warped_grid(rng, axes, box, amplitude_mm=rng.uniform(4.0, 8.0), scale_mm=70.0)
    hu, labels = np.full(shape, -1000.0, np.float32), np.zeros(shape, np.uint8)
    return affine, _CTCanvas(rng, u / body_scale, v / body_scale, t / cc_scale, axes, box, hu, labels)


def _paint_body_wall(c: _CTCanvas) -> tuple[np.ndarray, np.ndarray]:
    """Skin, subcutaneous fat, muscle, the visceral fat of the abdominal cavity, ribs: the (body, cavity) masks."""
    u, v, t = c.u, c.v, c.t
    body_a, body_b = 150.0, 108.0
    fat_mm = c.rng.uniform(12.0, 28.0)
    body = _superellipse(u, v, (0, 0), (body_a, body_b)) < 1
    wall_inner = (body_a - fat_mm, body_b - fat_mm)
    cavity_ab = (wall_inner[0] - 11.0, wall_inner[1] - 11.0)
    c.paint(body, 20.0 + c.jitter())
    c.paint(_superellipse(u, v, (0, 0), (body_a - 2.5, body_b - 2.5)) < 1, -105.0 + c.jitter())
    c.paint(_superellipse(u, v, (0, 0), wall_inner) < 1, 50.0 + c.jitter())
    cavity = _superellipse(u, v, (0, 0), cavity_ab) < 1
    c.paint(cavity, -90.0 + c.jitter())
    ribs = (
        (_superellipse(u, v, (0, 0), wall_inner) < 1)
        & ~(_superellipse(u, v, (0, 0), (wall_inner[0] - 8.0, wall_inner[1] - 8.0)) < 1)
        & (np.abs(u) > 55.0)
        & (t < 140.0)
        & (np.mod(t + 0.3 * v + c.rng.uniform(0, 28), 28.0) < 9.0)
    )
    c.paint(ribs, 450.0 + c.jitter())
    return body, cavity


def _paint_thorax_and_upper_organs(c: _CTCanvas, cavity: np.ndarray) -> None:
    """Lung bases and the heart at the top, then the liver dome under the right lung, gallbladder, spleen."""
    for side in (-1, 1):
        c.paint(cavity & (c.ellipsoid((side * 72, -28, -75), (66, 72, 120)) < 1), -850.0 + c.jitter(), 7)
    c.paint(cavity & (c.ellipsoid((-18, 38, -40), (62, 46, 60)) < 1), 40.0 + c.jitter(), 0)
    liver = (c.ellipsoid((62, 2, 70), (74, 80, 72)) < 1) | (c.ellipsoid((0, 42, 45), (58, 34, 34)) < 1)
    c.paint(cavity & liver, 58.0 + c.jitter(), 1)
    c.paint(cavity & (c.ellipsoid((42, 42, 112), (14, 18, 28)) < 1), 10.0, 0)  # gallbladder
    c.paint(cavity & (c.ellipsoid((-92, -42, 62), (24, 52, 44), rot_deg=-35) < 1), 45.0 + c.jitter(), 2)


def _paint_stomach(c: _CTCanvas, cavity: np.ndarray) -> None:
    """Stomach in the left upper quadrant: wall, fluid, and gas rising anteriorly (patient supine)."""
    stomach_c, stomach_r = (-45, 30, 58), (44, 34, 42)
    stomach = cavity & (c.labels == 0) & (c.ellipsoid(stomach_c, stomach_r) < 1)
    c.paint(stomach, 40.0 + c.jitter(), 8)
    lumen = stomach & (c.ellipsoid(stomach_c, tuple(r - 4.0 for r in stomach_r)) < 1)
    c.paint(lumen, 12.0 + c.jitter())
    c.paint(lumen & (c.v > stomach_c[1] + c.rng.uniform(0.1, 0.5) * stomach_r[1]), -1000.0)


def _paint_kidneys(c: _CTCanvas, cavity: np.ndarray) -> None:
    """Kidneys (the right one lower, under the liver): cortex, medulla, hila facing antero-medially."""
    for label, side, t0 in ((3, 1, 122.0), (4, -1, 108.0)):
        centre = (side * 68, -44, t0 + c.rng.uniform(-8, 8))
        kidney = cavity & (c.ellipsoid(centre, (28, 25, 55), rot_deg=side * 30) < 1)
        c.paint(kidney, 30.0 + c.jitter(), label)
        medulla = kidney & (c.ellipsoid(centre, (16, 14, 38), rot_deg=side * 30) < 1)
        c.paint(medulla, 18.0 + c.jitter())
        hilum = (centre[0] - side * 16, centre[1] + 8, centre[2])
        c.paint(kidney & (c.ellipsoid(hilum, (10, 9, 22)) < 1), -60.0 + c.jitter(), 0)


def _paint_vessels_and_muscles(c: _CTCanvas) -> None:
    """The great vessels (IVC, aorta), then psoas and the back muscles beside the spine."""
    u, v, t = c.u, c.v, c.t
    c.paint(c.ellipsoid((22, -20, 0), (13, 10, np.inf)) < 1, 40.0 + c.jitter(), 0)  # IVC
    c.paint(c.ellipsoid((-16, -22, 0), (12, 12, np.inf)) < 1, 42.0 + c.jitter(), 5)
    for side in (-1, 1):
        psoas_r = np.clip(6.0 + 0.16 * (t - 95.0), 0.0, None)
        c.paint((t > 95.0) & (((u - side * 38) / 1.15) ** 2 + (v + 44) ** 2 < psoas_r**2), 48.0 + c.jitter(), 0)
        c.paint(c.ellipsoid((side * 36, -84, 0), (27, 19, np.inf)) < 1, 48.0 + c.jitter(), 0)


def _ct_intensities(c: _CTCanvas) -> np.ndarray:
    """The painted HU with a slight blur, organ texture and noise, clipped to the CT range (I, J, K)."""
    hu = ndimage.gaussian_filter(c.hu, sigma=0.6)
    hu += c.rng.uniform(4.0, 8.0) * _smooth_noise(c.rng, c.axes, c.box, scale_mm=8.0) * (c.labels > 0)
    hu += c.rng.normal(0.0, c.rng.uniform(10.0, 20.0), c.hu.shape).astype(np.float32)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu


def make_brain_mri(
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 112, 96),
    spacing: tuple[float, float, float] | None = None,
    tumour: bool = True,
) -> Phantom:
    """A brain MRI with a glioma-like tumour (unless `tumour=False`) in four co-registered contrasts t1n, t1c, t2w, t2f.

    Scalp, skull, CSF (subarachnoid space, sulci, ventricles), a folded grey-matter ribbon, deep
    grey nuclei, white matter, and in one hemisphere a tumour: necrotic core, enhancing rim (bright
    on t1c only) and surrounding oedema (bright on t2w and t2f). Relative intensities follow the
    usual contrasts (T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF dark, oedema bright). Each
    contrast gets its own smooth multiplicative bias field and Rician-like noise. Voxel axes are
    RAS (affine diag(s, s, s)). With `spacing=None` a random isotropic spacing makes the head fill
    the field of view with a margin, whatever the `shape`.
    """
    shape = _check_shape(shape, "make_brain_mri")
    rng = np.random.default_rng(seed)  # every step below draws from it, in this order
    affine, h = _mri_canvas(rng, shape, spacing)
    intracranial, depth = _mri_skull(h)
    _mri_cortex(h, intracranial, depth)
    _mri_deep_grey(h)
    if tumour:
        _mri_tumour(h, intracranial)
    return Phantom(
        images=_mri_images(h),
        labels=np.where(h.tissue <= 6, h.tissue, 0).astype(np.uint8),
        class_names=dict(MRI_CLASSES),
        affine=affine,
        modality="MRI",
        colors=dict(MRI_COLORS),
        extra={"brainmask": intracranial},
    )


_HEAD_SEMI = (80.0, 96.0, 74.0)  # mm, before the random head scale
_INTRACRANIAL_SEMI = (70.0, 86.0, 62.0)
# Relative intensities per contrast (x1000) of the tissue codes: air, csf, gm, wm, edema, enhancing,
# necrosis, scalp (fat), skull (cortical bone).
_MRI_INTENSITIES = {
    "t1n": [0, 250, 600, 850, 520, 560, 300, 1000, 80],
    "t1c": [0, 260, 610, 860, 540, 1150, 300, 1000, 80],
    "t2w": [0, 1000, 560, 400, 820, 650, 950, 700, 60],
    "t2f": [0, 120, 620, 470, 950, 760, 480, 750, 60],
}


@dataclass
class _MRICanvas:
    """A brain MRI being drawn: warped head coordinates (mm, RAS) and the tissue map, all (I, J, K)."""

    rng: np.random.Generator
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    axes: tuple[np.ndarray, ...]  # the unwarped RAS position of the voxels along each axis: (I,), (J,), (K,)
    box: tuple  # the physical box of the noise lattices ((lo, hi) mm per axis)
    tissue: np.ndarray  # uint8: 0 air, 1..6 the classes, 7 scalp, 8 skull

    def ellipsoid(self, centre: tuple, semi: tuple, rot_deg: float = 0.0) -> np.ndarray:
        return _ellipsoid(self.u, self.v, self.w, centre, semi, rot_deg)


def _mri_canvas(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float] | None
) -> tuple[np.ndarray, _MRICanvas]:
    """Draw the head's size, the field of view and the warp: the affine and an empty canvas (air)."""
    head_scale = rng.uniform(0.92, 1.05)
    head_semi = np.array(_HEAD_SEMI) * head_scale
    margin = rng.uniform(1.08, 1.25)  # field of view / head size, drawn whatever `spacing`
    if spacing is None:
        s = margin * float(np.max(2.0 * head_semi / np.array(shape)))
        spacing = (s, s, s)
    spacing = _check_spacing(spacing, "make_brain_mri")
    fov_centre = tuple(rng.uniform(-5.0, 5.0, 3))
    affine = _affine(shape, spacing, signs=(1, 1, 1), centre=fov_centre)
    axes, box = _grid_axes(affine, shape), ((-110.0, 110.0),) * 3
    x, y, z = _warped_grid(rng, axes, box, amplitude_mm=rng.uniform(2.0, 4.0), scale_mm=45.0)
    tissue = np.zeros(shape, np.uint8)
    return affine, _MRICanvas(rng, x / head_scale, y / head_scale, z / head_scale, axes, box, tissue)


def _mri_skull(h: _MRICanvas) -> tuple[np.ndarray, np.ndarray]:
    """Scalp, skull, and CSF filling the skull: the intracranial mask and the depth (mm) below the skull."""
    h.tissue[h.ellipsoid((0, 0, 0), _HEAD_SEMI) < 1] = 7
    h.tissue[h.ellipsoid((0, 0, 0), (75, 91, 68)) < 1] = 8
    rho = np.sqrt(h.ellipsoid((0, 0, 0), _INTRACRANIAL_SEMI))
    depth = (1.0 - rho) * 72.0  # approximate distance in mm below the inner skull surface
    intracranial = rho < 1
    h.tissue[intracranial] = 1
    return intracranial, depth


def _mri_cortex(h: _MRICanvas, intracranial: np.ndarray, depth: np.ndarray) -> None:
    """White matter under a folded grey-matter ribbon, and the interhemispheric fissure."""
    tissue, u = h.tissue, h.u
    # Sulci are the zero crossings of a band-limited field, lined with grey matter.
    gyri = np.abs(_smooth_noise(h.rng, h.axes, h.box, scale_mm=7.0))
    tissue[intracranial & (depth > 2.0)] = 3
    tissue[intracranial & (depth > 2.0) & ((depth < 6.5) | ((gyri < 0.5) & (depth < 18.0)))] = 2
    tissue[intracranial & (gyri < 0.1) & (depth < 14.0)] = 1
    # The fissure, lined with grey matter, above and around the corpus callosum.
    fissure = intracranial & (h.ellipsoid((0, -6, -8), (np.inf, 52, 24)) > 1)
    tissue[fissure & (np.abs(u) < 5.0) & (tissue == 3)] = 2
    tissue[fissure & (np.abs(u) < 1.3)] = 1


def _mri_deep_grey(h: _MRICanvas) -> None:
    """Deep grey nuclei (thalamus, putamen, caudate head), then the ventricles."""
    nuclei = (((11, -12, 2), (10, 15, 10)), ((24, 5, 3), (6, 17, 11)), ((14, 18, 12), (6, 10, 8)))
    for side in (-1, 1):
        for centre, semi in nuclei:
            h.tissue[h.ellipsoid((side * centre[0], *centre[1:]), semi) < 1] = 2
        h.tissue[h.ellipsoid((side * 10, 4, 13), (6, 32, 8), rot_deg=side * 6) < 1] = 1
        h.tissue[h.ellipsoid((side * 17, -32, 8), (5, 14, 7), rot_deg=-side * 25) < 1] = 1
    h.tissue[h.ellipsoid((0, -3, 0), (2.0, 13, 9)) < 1] = 1  # third ventricle


def _mri_tumour(h: _MRICanvas, intracranial: np.ndarray) -> None:
    """A tumour in one hemisphere: lobulated necrotic core and enhancing rim, oedema in the parenchyma."""
    rng, tissue = h.rng, h.tissue
    side = rng.choice([-1.0, 1.0])
    for _ in range(100):
        centre = np.array([side * rng.uniform(22, 42), rng.uniform(-45, 45), rng.uniform(-5, 35)])
        if np.linalg.norm(centre / _INTRACRANIAL_SEMI) < 0.7:
            break
    r_tumour = rng.uniform(9.0, 17.0)
    lobes = _smooth_noise(rng, h.axes, h.box, scale_mm=12.0)
    dist = np.sqrt((h.u - centre[0]) ** 2 + (h.v - centre[1]) ** 2 + (h.w - centre[2]) ** 2)
    dist_tumour = dist / (1.0 + 0.15 * lobes)
    dist_edema = dist / (1.0 + 0.3 * lobes)
    parenchyma = (tissue == 2) | (tissue == 3)
    tissue[parenchyma & (dist_edema < r_tumour + rng.uniform(8.0, 18.0))] = 4
    tissue[intracranial & (dist_tumour < r_tumour)] = 5
    tissue[intracranial & (dist_tumour < r_tumour * rng.uniform(0.4, 0.65))] = 6


def _mri_images(h: _MRICanvas) -> dict[str, np.ndarray]:
    """The four contrasts of the tissue map: drawn intensities, blur, bias field, Rician noise (float32)."""
    rng, shape = h.rng, h.tissue.shape
    values = {name: np.array(_MRI_INTENSITIES[name], np.float32) * rng.uniform(0.95, 1.05, 9) for name in CONTRASTS}
    bias = {name: np.exp(0.12 * _smooth_noise(rng, h.axes, h.box, scale_mm=80.0)) for name in CONTRASTS}
    images = {}
    for name in CONTRASTS:  # acquisition noise last: the draws above do not depend on `shape`
        image = ndimage.gaussian_filter(values[name][h.tissue], sigma=0.6) * bias[name]
        sigma = 0.025 * values[name][3]  # Rician noise: magnitude of a complex Gaussian signal
        image = np.hypot(image + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
        images[name] = image.astype(np.float32)
    return images


def insert_unexpected_object(phantom: Phantom, seed: int = 0, radius_mm: float = 8.0) -> Phantom:
    """A copy of `phantom` with a bright sphere somewhere inside the body.

    CT: 2500 HU (metal-like); MRI: 1.6 times each contrast's 99.5th percentile inside the brain.

    The sphere lies wholly inside `extra["body"]` (CT) or `extra["brainmask"]` (MRI); its mask is
    returned in `extra["unexpected"]`. Labels are left unchanged: the object belongs to no class.
    """
    if radius_mm <= 0:
        raise Ar3dInputError(f"insert_unexpected_object: radius_mm must be positive, got {radius_mm}")
    inside = phantom.extra.get("body", phantom.extra.get("brainmask"))
    if inside is None:
        raise Ar3dInputError("insert_unexpected_object: the phantom has no 'body' or 'brainmask' in extra")
    rng = np.random.default_rng(seed)
    spacing = np.array(phantom.spacing)
    half = np.ceil(radius_mm / spacing).astype(int)
    offsets = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    offsets = offsets[np.linalg.norm(offsets * spacing, axis=1) <= radius_mm]  # (M, 3) voxel offsets
    candidates = np.argwhere(inside)
    for index in rng.permutation(len(candidates))[:500]:
        voxels = candidates[index] + offsets
        if np.all((voxels >= 0) & (voxels < inside.shape)) and inside[tuple(voxels.T)].all():
            break
    else:
        raise Ar3dInputError(f"insert_unexpected_object: no place inside the body fits a sphere of {radius_mm} mm")
    mask = np.zeros(inside.shape, bool)
    mask[tuple(voxels.T)] = True
    images = {}
    for name, image in phantom.images.items():
        value = 2500.0 if phantom.modality == "CT" else 1.6 * float(np.percentile(image[inside], 99.5))
        image = image.copy()
        image[mask] = value + rng.normal(0.0, 0.02 * value, int(mask.sum()))
        images[name] = image
    return Phantom(
        images=images,
        labels=phantom.labels.copy(),
        class_names=dict(phantom.class_names),
        affine=phantom.affine.copy(),
        modality=phantom.modality,
        colors=dict(phantom.colors),
        extra={**phantom.extra, "unexpected": mask},
    )


def _check_shape(shape: tuple[int, int, int], where: str) -> tuple[int, int, int]:
    if len(tuple(shape)) != 3 or any(int(n) != n or n < 16 for n in shape):
        raise Ar3dInputError(f"{where}: shape must be three integers >= 16, got {shape!r}")
    return tuple(int(n) for n in shape)


def _check_spacing(spacing: tuple[float, float, float], where: str) -> tuple[float, float, float]:
    if len(tuple(spacing)) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise Ar3dInputError(f"{where}: spacing must be three positive millimetre values, got {spacing!r}")
    return tuple(float(s) for s in spacing)


def _affine(
    shape: tuple[int, ...], spacing: tuple[float, ...], signs: tuple[int, ...], centre: tuple
) -> np.ndarray:
    """Axis-aligned RAS affine whose voxel grid is centred on `centre` (mm)."""
    affine = np.eye(4)
    for axis in range(3):
        affine[axis, axis] = signs[axis] * spacing[axis]
        affine[axis, 3] = centre[axis] - signs[axis] * spacing[axis] * (shape[axis] - 1) / 2.0
    return affine


def _grid_axes(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """RAS world position (mm) of the voxels along each axis of an axis-aligned affine: (I,), (J,), (K,)."""
    return tuple(affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(shape))


def _warped_grid(
    rng: np.random.Generator, axes: tuple[np.ndarray, ...], box: tuple, amplitude_mm: float, scale_mm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 3D grid of `axes` (mm), each coordinate displaced by a smooth random field (I, J, K).

    Shapes evaluated at displaced coordinates give the label map a smooth random warp (what
    nearest-neighbour resampling of a label map would give, without its blockiness).
    """
    grids = np.meshgrid(*axes, indexing="ij")
    return tuple(
        (grid + amplitude_mm * _smooth_noise(rng, axes, box, scale_mm)).astype(np.float32) for grid in grids
    )


def _smooth_noise(
    rng: np.random.Generator, axes: tuple[np.ndarray, ...], box: tuple, scale_mm: float
) -> np.ndarray:
    """Gaussian-filtered white noise with features of about `scale_mm`, zero mean, unit variance (I, J, K).

    The white noise lives on a lattice with one point per `scale_mm` over the fixed physical `box`
    ((lo, hi) mm per axis) and reaches the voxels at positions `axes` through separable Gaussian
    weights, so the field depends on physical position only, not on the voxel grid; the cost is
    one small matrix product per axis.
    """
    weights = []
    for pos, (lo, hi) in zip(axes, box):
        lattice = np.arange(lo - scale_mm, hi + scale_mm + 1e-6, scale_mm)  # (C,)
        pos = np.clip(pos, lo, hi)  # (N,)
        wgt = np.exp(-0.5 * ((pos[:, None] - lattice[None, :]) / (0.8 * scale_mm)) ** 2)  # (N, C)
        weights.append((wgt / np.sqrt((wgt**2).sum(1, keepdims=True))).astype(np.float32))
    lattice_noise = rng.standard_normal(tuple(w.shape[1] for w in weights)).astype(np.float32)
    return np.einsum("ai,bj,ck,ijk->abc", *weights, lattice_noise, optimize=True)


def _ellipsoid(u, v, w, centre, semi, rot_deg: float = 0.0) -> np.ndarray:
    """Normalised squared radius of an ellipsoid (< 1 inside), rotated by `rot_deg` in the u-v plane.

    A semi-axis of `np.inf` makes an infinite cylinder along that axis.
    """
    du, dv = u - centre[0], v - centre[1]
    if rot_deg:
        c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
        du, dv = c * du + s * dv, -s * du + c * dv
    return (du / semi[0]) ** 2 + (dv / semi[1]) ** 2 + ((w - centre[2]) / semi[2]) ** 2


def _superellipse(u, v, centre, semi, power: float = 2.6) -> np.ndarray:
    """The squarish cross-section of a trunk (< 1 inside)."""
    return np.abs((u - centre[0]) / semi[0]) ** power + np.abs((v - centre[1]) / semi[1]) ** power


def _paint_bowel(c: _CTCanvas, free: np.ndarray) -> None:
    """Colon along the flanks and across the front, small-bowel loops below the stomach; gas anteriorly."""
    rng = c.rng
    tubes = [  # (centre, semi, gas fraction of the radius above the centre)
        ((95, 2, 190), (20, 20, 80), rng.uniform(0.0, 0.6)),  # ascending colon
        ((-95, -8, 170), (17, 17, 90), rng.uniform(0.0, 0.6)),  # descending colon
        ((0, 55, 120), (110, 17, 18), rng.uniform(0.0, 0.6)),  # transverse colon
    ]
    for _ in range(rng.integers(10, 16)):
        centre = (rng.uniform(-70, 70), rng.uniform(-10, 60), rng.uniform(130, 240))
        radius = rng.uniform(10, 18)
        gas = rng.uniform(0.2, 0.8) if rng.random() < 0.4 else 1.0
        tubes.append((centre, (radius * rng.uniform(1.0, 1.8), radius, radius * rng.uniform(1.0, 1.5)), gas))
    for centre, semi, gas in tubes:
        loop = free & (c.ellipsoid(centre, semi) < 1)
        c.paint(loop, 30.0 + rng.normal(0, 8), 8)
        c.paint(loop & (c.v > centre[1] + gas * semi[1]), -1000.0)


def _paint_spine(c: _CTCanvas) -> None:
    """Vertebral bodies (cortical shell, cancellous centre) between discs, canal and posterior arch."""
    u, v, t = c.u, c.v, c.t
    period = c.rng.uniform(30.0, 36.0)
    disc = np.mod(t + c.rng.uniform(0, period), period) < 7.0
    body_q = c.ellipsoid((0, -52, 0), (21, 16, np.inf))
    canal_r = np.hypot(u, v + 78)
    arch = (canal_r > 9.0) & (canal_r < 15.0) & (v < -70.0)
    processes = ((np.abs(u) < 4.0) & (v < -86.0) & (v > -104.0)) | (
        (np.abs(v + 74) < 4.0) & (np.abs(u) > 10.0) & (np.abs(u) < 42.0)
    )
    c.paint(~disc & ((body_q < 1) | arch | processes), 720.0 + c.jitter(), 6)
    c.paint(~disc & (body_q < (1 - 3.0 / 17) ** 2), 270.0 + c.jitter(), 6)
    c.paint(disc & (body_q < 1), 90.0 + c.jitter(), 0)
    c.paint(canal_r < 9.0, 15.0 + c.jitter(), 0)
