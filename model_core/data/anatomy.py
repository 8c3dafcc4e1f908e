"""Anatomical matching across patients, and the cross-patient views of Alice pretraining.

A matcher answers: for a voxel of one preprocessed scan, which voxel of another patient's scan
shows the same anatomy? The official Alice code asks a learned anatomical embedding (SAM of
Yan et al.); we have none, so three swappable matchers stand in (`make_matcher`):

- "registration": each scan is registered once to a common template (affine, Mattes mutual
  information, SimpleITK; MNI152 for brain MRI) and points travel scan -> template -> scan. A
  registration whose warped template foreground overlaps the scan's foreground with Dice < 0.7
  is refused (the scan does not look like the template: a crop, another body part).
- "labels": the centroids of the structures both scans label (by class name) fix a map: affine
  with >= 6 well-spread structures, else scale + translation, a translation with one.
- "body": coordinates normalised to the bounding box of each scan's foreground (the body).
- "auto": the first of registration (when a template is given), labels, body that answers.

Every matcher works on `CaseData` grids (RAS voxel order at the model spacing) and returns voxel
coordinates of the destination grid. `benchmarks/alice_matcher.py` measures them.

`CrossPatientViews` is the Alice dataset: item i is a query crop around a random foreground
voxel of one scan and the anchor crop, in a scan of a *different patient* of the same modality,
around the matched voxel: {"volumes": (2, X, Y, Z) float32, "case": "query_id>anchor_id"}.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from model_core.data.preprocess import PreprocessConfig
from model_core.data.pretraining import Case, CaseData, PreprocessCache, _window, cases_from_paths
from model_core.errors import Ar3dInputError
from model_core.io.volume import simpleitk
from model_core.progress import ProgressFn, report

MATCHERS = ("auto", "registration", "labels", "body")
CT_BODY_HU = -500.0  # CT foreground: denser than this (air and lungs are not "body" to centre a view on)
MRI_FOREGROUND = 0.05  # MRI foreground: above this on the normalised [0, 1] scale
MAX_FOREGROUND_POINTS = 20000  # foreground voxels kept per scan to draw query centres from
MIN_REGISTRATION_DICE = 0.7
AFFINE_MIN_STRUCTURES = 6
_STUDY_DATE = re.compile(r"([_-](19|20)\d\d-?\d\d-?\d\d)$")


@dataclass
class Anatomy:
    """What the matchers know of one preprocessed scan (small, picklable)."""

    case_id: str
    patient: str
    modality: str  # "ct" | "mri"
    shape: tuple[int, int, int]
    spacing: np.ndarray  # (3,) mm per voxel of the RAS grid
    body_lo: np.ndarray  # (3,) voxel corner of the foreground box (1st percentile per axis)
    body_hi: np.ndarray  # (3,) opposite corner (99th percentile)
    centroids: dict[str, np.ndarray] = field(default_factory=dict)  # class name -> (3,) voxel centroid


def patient_of(case: Case) -> str:
    """The patient a case belongs to: its id without a trailing study date or "#n" repeat suffix."""
    return _STUDY_DATE.sub("", case.id.split("#")[0])


def foreground_threshold(modality: str, pre_cfg: PreprocessConfig) -> float:
    """Intensity (on the normalised scale) above which a voxel is foreground."""
    if modality != "ct":
        return MRI_FOREGROUND
    low, high = pre_cfg.intensity_for("ct").window
    return float(np.clip((CT_BODY_HU - low) / (high - low), 0.0, 1.0))


def foreground_points(image: np.ndarray, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """(K, 3) int32 voxels above `threshold` (at most MAX_FOREGROUND_POINTS, drawn at random); K may be 0."""
    flat = np.flatnonzero(np.asarray(image) > threshold)
    if flat.size > MAX_FOREGROUND_POINTS:
        flat = np.sort(rng.choice(flat, MAX_FOREGROUND_POINTS, replace=False))
    return np.stack(np.unravel_index(flat, image.shape), axis=1).astype(np.int32)


def describe(case: Case, data: CaseData, points: np.ndarray, patient: str | None = None) -> Anatomy:
    """The `Anatomy` of a preprocessed case whose foreground voxels are `points` (K >= 1, 3)."""
    spacing = np.sqrt((data.affine[:3, :3] ** 2).sum(axis=0))
    centroids = {}
    if data.labels is not None:
        named = [v for v in data.present if v in case.labels]
        found = ndimage.center_of_mass(np.ones(data.labels.shape, np.uint8), data.labels, named)
        centroids = {case.labels[v]: np.asarray(c, float) for v, c in zip(named, found)}
    return Anatomy(case.id, patient or patient_of(case), data.modality, tuple(data.image.shape), spacing,
                   np.percentile(points, 1, axis=0), np.percentile(points, 99, axis=0), centroids)


# ----------------------------------------------------------------------------- matchers


class Matcher:
    """Base of the matchers: `prepare` each scan once, then `match` points between scans."""

    name = "matcher"

    def prepare(self, anatomy: Anatomy, data: CaseData) -> None:
        """Precompute what `match` needs for one scan (nothing by default)."""

    def match(self, src: Anatomy, point: np.ndarray, dst: Anatomy) -> np.ndarray | None:
        """The voxel (3,) float of `dst` matching voxel `point` of `src`, or None when this matcher cannot tell."""
        raise NotImplementedError


class BodyMatcher(Matcher):
    """Coordinates relative to each scan's foreground box."""

    name = "body"

    def match(self, src: Anatomy, point: np.ndarray, dst: Anatomy) -> np.ndarray:
        u = (np.asarray(point, float) - src.body_lo) / np.maximum(src.body_hi - src.body_lo, 1.0)
        return dst.body_lo + u * np.maximum(dst.body_hi - dst.body_lo, 1.0)


class LabelMatcher(Matcher):
    """A map fitted on the centroids (mm) of the structures both scans label; `exclude` leaves names out."""

    name = "labels"

    def __init__(self, exclude: Sequence[str] = ()):
        self.exclude = set(exclude)

    def match(self, src: Anatomy, point: np.ndarray, dst: Anatomy) -> np.ndarray | None:
        names = sorted((set(src.centroids) & set(dst.centroids)) - self.exclude)
        if not names:
            return None
        a = np.stack([src.centroids[n] for n in names]) * src.spacing  # (k, 3) mm
        b = np.stack([dst.centroids[n] for n in names]) * dst.spacing
        p = np.asarray(point, float) * src.spacing
        return fit_points(a, b)(p) / dst.spacing


def fit_points(a: np.ndarray, b: np.ndarray):
    """A map taking points `a` (k, 3) near `b` (k, 3): affine (k >= 6, well spread), scale + shift (k >= 2), shift."""
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    if len(a) >= AFFINE_MIN_STRUCTURES and np.linalg.svd(a - ca, compute_uv=False)[-1] > 10.0:
        coef, *_ = np.linalg.lstsq(np.c_[a - ca, np.ones(len(a))], b, rcond=None)  # (4, 3)
        return lambda p: np.r_[p - ca, 1.0] @ coef
    spread_a, spread_b = np.sqrt(((a - ca) ** 2).sum(1).mean()), np.sqrt(((b - cb) ** 2).sum(1).mean())
    scale = float(np.clip(spread_b / spread_a, 0.5, 2.0)) if len(a) >= 2 and spread_a > 1.0 else 1.0
    return lambda p: cb + scale * (p - ca)


class RegistrationMatcher(Matcher):
    """Affine registration of every scan to `template` (a preprocessed `CaseData` of the same modality)."""

    name = "registration"

    def __init__(self, template: CaseData, pre_cfg: PreprocessConfig, seed: int = 0):
        self.template = template
        self.threshold = foreground_threshold(template.modality, pre_cfg)
        self.seed = seed
        self.to_scan: dict[str, np.ndarray | None] = {}  # case id -> (4, 4) template mm -> scan mm, None if refused
        self.dice: dict[str, float] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "template": None}  # workers only need the fitted maps

    def prepare(self, anatomy: Anatomy, data: CaseData) -> None:
        if data.modality != self.template.modality:
            self.to_scan[anatomy.case_id] = None
            return
        matrix, dice = register_affine(self.template, data, self.threshold, self.seed)
        self.dice[anatomy.case_id] = dice
        self.to_scan[anatomy.case_id] = matrix if dice >= MIN_REGISTRATION_DICE else None

    def match(self, src: Anatomy, point: np.ndarray, dst: Anatomy) -> np.ndarray | None:
        a, b = self.to_scan.get(src.case_id), self.to_scan.get(dst.case_id)
        if a is None or b is None:
            return None
        p = np.r_[np.asarray(point, float) * src.spacing, 1.0]
        return (b @ np.linalg.solve(a, p))[:3] / dst.spacing


class AutoMatcher(Matcher):
    """The first answer of registration (when given a template), labels, body."""

    name = "auto"

    def __init__(self, matchers: Sequence[Matcher]):
        self.matchers = list(matchers)

    def prepare(self, anatomy: Anatomy, data: CaseData) -> None:
        for m in self.matchers:
            m.prepare(anatomy, data)

    def match(self, src: Anatomy, point: np.ndarray, dst: Anatomy) -> np.ndarray | None:
        for m in self.matchers:
            found = m.match(src, point, dst)
            if found is not None:
                return found
        return None


def make_matcher(name: str, template: CaseData | None = None, pre_cfg: PreprocessConfig | None = None,
                 seed: int = 0) -> Matcher:
    """A matcher by name (see MATCHERS); "registration" needs `template`, "auto" uses it when given."""
    pre_cfg = pre_cfg or PreprocessConfig()
    if name not in MATCHERS:
        raise Ar3dInputError(f"unknown matcher {name!r}; choose one of {', '.join(MATCHERS)}")
    if name == "registration" and template is None:
        raise Ar3dInputError("the registration matcher needs a template scan (e.g. MNI152 for brain MRI)")
    registration = [RegistrationMatcher(template, pre_cfg, seed)] if template is not None else []
    if name == "registration":
        return registration[0]
    if name == "labels":
        return LabelMatcher()
    if name == "body":
        return BodyMatcher()
    return AutoMatcher([*registration, LabelMatcher(), BodyMatcher()])


# ----------------------------------------------------------------------------- registration


def _sitk_image(array: np.ndarray, spacing: np.ndarray):
    """A SimpleITK image of a RAS-grid array: x = axis 0, origin 0, identity direction (physical = voxel * spacing)."""
    sitk = simpleitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _register(fixed, moving, initial, seed: int):
    """One multi-resolution Mattes-MI registration of `moving` onto `fixed` from `initial`; the fitted transform."""
    sitk = simpleitk()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed + 1)  # SimpleITK reads a seed of 0 as "seed from the clock"
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=150)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0])
    reg.SetInitialTransform(initial, inPlace=False)
    return sitk.CompositeTransform(reg.Execute(fixed, moving)).GetNthTransform(0)


def register_affine(template: CaseData, scan: CaseData, threshold: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """Affine map (4, 4) from template mm to scan mm, and the Dice of the two foregrounds after it
    (inside the scan's field of view, so that a scan covering part of the template is not refused).

    A similarity (rotation, one scale, shift) from the images' moments first, then the affine from it.
    """
    sitk = simpleitk()
    t_spacing = np.sqrt((template.affine[:3, :3] ** 2).sum(axis=0))
    s_spacing = np.sqrt((scan.affine[:3, :3] ** 2).sum(axis=0))
    fixed, moving = _sitk_image(template.image, t_spacing), _sitk_image(scan.image, s_spacing)
    start = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Similarity3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    similar = sitk.Similarity3DTransform(_register(fixed, moving, start, seed))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similar.GetCenter())
    affine.SetMatrix(similar.GetMatrix())
    affine.SetTranslation(similar.GetTranslation())
    transform = sitk.AffineTransform(_register(fixed, moving, affine, seed))
    A = np.array(transform.GetMatrix()).reshape(3, 3)
    c, t = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = A, c + t - A @ c  # T(p) = A (p - c) + c + t
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1.0)).transpose(2, 1, 0)
    seen = warped >= 0  # inside the scan's field of view
    a, b = (template.image > threshold) & seen, (warped > threshold) & seen
    return matrix, float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


# ----------------------------------------------------------------------------- the views dataset


class CrossPatientViews(Dataset):
    """Alice pretraining pairs (see the module docstring); item `i` depends only on (seed, i).

    Every case is preprocessed and described once when the dataset is built (`cache_dir` as in
    `PretrainDataset`); `patients` maps case ids to patients (default `patient_of`). Raises
    `Ar3dInputError` for a scan without foreground and for data without two patients of one modality.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        pre_cfg: PreprocessConfig,
        matcher: Matcher,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        *,
        window: tuple[int, int, int] = (64, 64, 64),
        patients: dict[str, str] | None = None,
        length: int = 10**9,
        source: str | None = None,
        progress: ProgressFn = None,
    ):
        """`source` names the data in errors (the manifest or paths given)."""
        if not cases:
            raise Ar3dInputError("no cases to pretrain on")
        self.cases, self.pre_cfg, self.matcher = list(cases), pre_cfg, matcher
        self.seed, self.window, self.length = int(seed), tuple(int(w) for w in window), int(length)
        self.cache = PreprocessCache(cache_dir)
        rng = np.random.default_rng([self.seed, 2**31])
        self.points, self.anatomy = [], []
        for n, case in enumerate(self.cases):
            report(progress, n, len(self.cases), f"preprocessing {case.id}")
            data = self.cache.load(case, pre_cfg)
            points = foreground_points(data.image, foreground_threshold(data.modality, pre_cfg), rng)
            if not len(points):
                raise Ar3dInputError("has no foreground (no voxel brighter than the background) to centre a view on",
                                     case.image)
            anatomy = describe(case, data, points, (patients or {}).get(case.id))
            matcher.prepare(anatomy, data)
            self.points.append(points)
            self.anatomy.append(anatomy)
        report(progress, len(self.cases), len(self.cases), "preprocessed")
        self.partners = [[m for m, b in enumerate(self.anatomy) if b.patient != a.patient and b.modality == a.modality]
                         for a in self.anatomy]
        self.queries = [n for n, p in enumerate(self.partners) if p]
        if not self.queries:
            who = sorted({a.patient for a in self.anatomy})
            what = "one patient" if len(who) == 1 else "no two patients with scans of one modality"
            raise Ar3dInputError(f"Alice pairs scans of two different patients of one modality, and the data holds "
                                 f"{what} ({', '.join(who)})", source)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        rng = np.random.default_rng([self.seed, int(i)])
        for _ in range(20):
            n = self.queries[rng.integers(len(self.queries))]
            m = self.partners[n][rng.integers(len(self.partners[n]))]
            point = self.points[n][rng.integers(len(self.points[n]))]
            matched = self.matcher.match(self.anatomy[n], point, self.anatomy[m])
            if matched is not None:
                break
        else:
            raise Ar3dInputError(f"the {self.matcher.name} matcher found no match between the scans in 20 tries; "
                                 "use the auto or body matcher")
        target = np.clip(np.round(matched), 0, np.array(self.anatomy[m].shape) - 1).astype(int)
        views = [self._crop(n, point), self._crop(m, target)]
        return {"volumes": torch.from_numpy(np.stack(views)), "case": f"{self.cases[n].id}>{self.cases[m].id}"}

    def _crop(self, n: int, centre: np.ndarray) -> np.ndarray:
        image = self.cache.load(self.cases[n], self.pre_cfg).image
        return _window(image, tuple(int(c) - w // 2 for c, w in zip(centre, self.window)), self.window)


def make_views_dataset(
    data: Sequence[str | os.PathLike],
    pre_cfg: PreprocessConfig,
    window: tuple[int, int, int],
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    matcher: Matcher | None = None,
    n_phantoms: int = 8,
    progress: ProgressFn = None,
) -> CrossPatientViews:
    """`CrossPatientViews` over `cases_from_paths(data)` (manifests filtered to use "pretrain").

    matcher: default "auto" without a template (labels, then body)."""
    cases = cases_from_paths(data, use="pretrain", n_phantoms=n_phantoms)
    return CrossPatientViews(cases, pre_cfg, matcher or make_matcher("auto"), seed, cache_dir, window=window,
                             source=", ".join(str(d) for d in data), progress=progress)
