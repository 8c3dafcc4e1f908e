"""Studies: several scans of one patient and visit (contrasts, series) with one report.

The scans of a study need not be co-registered: each is preprocessed on its own (RAS, model
spacing, intensity) and cut to the model's window around its centre. Where studies come from
(`studies_from_paths`):

- a studies manifest (JSON), for users with real reports:

      {"studies": [{"id": "s1", "modality": "MRI", "report": "Free text ...",
                    "scans": ["t1c.nii.gz", {"name": "t2f", "image": "flair.nii.gz",
                                             "seg": "mask.nii.gz", "labels": {"1": "tumour"}}],
                    "use": ["pretrain"]}, ...]}

  paths relative to the manifest's folder; a scan is a path or {"image", "name", "seg", "labels"};
  a study without "report" gets a *generated report* from its scans' label maps (structures
  present, volume, side: `model_core.data.reports.describe_structures`);
- the project's case manifest ({"cases": [...]}, as in ../shared/data): each case is a study of
  its image and extra images, with a generated report from its segmentation;
- "phantom-studies" (CT and MRI), "phantom-studies:ct", "phantom-studies:mri": procedural studies
  with random findings (`phantom_study`), `n_phantoms` of each kind, seeds 0..n-1.

`StudyDataset` serves training samples: {"volumes": (S, X, Y, Z), "input_ids", "attention_mask"}.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from model_core.data import reports
from model_core.data.preprocess import PreprocessConfig, preprocess_volume, voxel_spacing
from model_core.data.pretraining import _window as window_of
from model_core.data.pretraining import cases_from_manifest, contrast_name
from model_core.errors import Ar3dInputError
from model_core.io.volume import Volume, read_volume
from model_core.progress import ProgressFn, report
from model_core.vocabulary import CONTRASTS

PHANTOM_STUDIES = "phantom-studies"
PHANTOM_STUDY_KINDS = ("ct", "mri")
CT_STUDY_SHAPE = (96, 96, 48)  # voxels of a phantom CT study's scans (the spacing follows the patient's size)
MRI_STUDY_SHAPE = (64, 72, 64)
FINDING_PROBABILITY = {"liver_lesion": 0.35, "spleen_lesion": 0.35, "kidney_lesion": 0.35, "splenomegaly": 0.35,
                       "metal_implant": 0.35, "brain_tumour": 0.5}
VENOUS_HU = {1: 55.0, 2: 70.0, 3: 140.0, 4: 140.0, 5: 160.0}  # portal-venous enhancement by CT label
SIDE_MARGIN_MM = 10.0  # a structure's centroid within this of the scan's centre (x) is "midline"


@dataclass
class Scan:
    """One scan of a study: its name (contrast or series) and image (a file, or a phantom study's scan)."""

    name: str
    image: str
    seg: str | None = None  # a label map on the scan's grid (real studies: for generated reports)
    labels: dict[int, str] = field(default_factory=dict)  # label value -> structure name


@dataclass
class Study:
    """Scans of one visit and the report; `findings` are what a phantom study is known to show."""

    id: str
    scans: list[Scan]
    report: str
    modality: str | None = None  # "CT", "MRI" or a free-text hint
    findings: dict[str, bool] = field(default_factory=dict)  # finding kind -> present (phantoms only)
    generated: bool = False  # the report was written by `model_core.data.reports`


# ---------------------------------------------------------------- manifests


def studies_from_manifest(path: str | os.PathLike, use: str | None = "pretrain") -> list[Study]:
    """The studies of a studies manifest, or of a case manifest (see the module docstring)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Ar3dInputError(f"cannot read the manifest ({exc})", path) from None
    if isinstance(doc, dict) and "cases" in doc and "studies" not in doc:
        return [_case_study(case) for case in cases_from_manifest(path, use)]
    entries = doc.get("studies") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise Ar3dInputError('a studies manifest is an object with a "studies" list', path)
    studies = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise Ar3dInputError(f"study {n} is not a JSON object", path)
        if use is not None and "use" in entry and use not in entry["use"]:
            continue
        studies.append(_manifest_study(entry, n, path))
    if not studies:
        raise Ar3dInputError("holds no study" + (f" for use {use!r}" if use else ""), path)
    return studies


def _manifest_study(entry: dict, n: int, path: Path) -> Study:
    study_id = str(entry.get("id", n))
    items = entry.get("scans")
    if not isinstance(items, list) or not items:
        raise Ar3dInputError(f"study {study_id} has no scans", path)
    scans = [_manifest_scan(item, k, study_id, path) for k, item in enumerate(items)]
    text = entry.get("report")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise Ar3dInputError(f"study {study_id}: the report must be non-empty text", path)
    modality = entry.get("modality")
    if text is None:
        if not any(s.seg for s in scans):
            raise Ar3dInputError(f'study {study_id} has no "report" and no scan with a "seg" to write one from', path)
        return Study(study_id, scans, generated_report(scans, study_id), modality, generated=True)
    return Study(study_id, scans, text.strip(), modality)


def _manifest_scan(item: Any, k: int, study_id: str, path: Path) -> Scan:
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or not isinstance(item.get("image"), str):
        raise Ar3dInputError(f'study {study_id}: scan {k} must be a path or an object with an "image"', path)

    def resolve(rel: str, what: str) -> str:
        full = (path.parent / rel).resolve()
        if not full.exists():
            raise Ar3dInputError(f"study {study_id}: {what} {rel} not found", path)
        return str(full)

    image = resolve(item["image"], "scan")
    name = str(item.get("name") or _scan_name(image))
    seg = resolve(item["seg"], "seg") if item.get("seg") else None
    labels = {int(v): str(name_) for v, name_ in (item.get("labels") or {}).items()}
    return Scan(name, image, seg, labels)


def _scan_name(path: str) -> str:
    stem = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    return re.sub(r"\.(nii\.gz|nii|nrrd|nhdr|mha|mhd|dcm)$", "", stem, flags=re.IGNORECASE)


def _case_study(case) -> Study:
    """A case of the project's manifest as a study: its image and extra images, a generated report."""
    scans = [Scan(case.image_name, case.image, case.seg, dict(case.labels))]
    scans += [Scan(contrast_name(name), image) for name, image in case.extra_images.items()]
    text = generated_report(scans, case.id) if case.seg else ""
    return Study(case.id, scans, text, case.modality, generated=bool(case.seg))


def studies_from_paths(
    items: Sequence[str | os.PathLike], *, use: str | None = "pretrain", n_phantoms: int = 8
) -> list[Study]:
    """Studies from studies or case manifests (.json) and phantom-study names (see the module docstring)."""
    studies: list[Study] = []
    for item in items:
        text = str(item)
        if text == PHANTOM_STUDIES or text.startswith(PHANTOM_STUDIES + ":"):
            kinds = PHANTOM_STUDY_KINDS if text == PHANTOM_STUDIES else (text.split(":", 1)[1],)
            for kind in kinds:
                studies += [phantom_study(kind, seed) for seed in range(_count(n_phantoms))]
            continue
        path = Path(text)
        if path.is_dir() and (path / "manifest.json").is_file():
            path = path / "manifest.json"
        if not path.exists():
            raise Ar3dInputError("file or folder not found", path)
        if path.suffix.lower() != ".json":
            raise Ar3dInputError(f"not a studies manifest (.json) or {PHANTOM_STUDIES}[:ct|:mri]", path)
        studies += studies_from_manifest(path, use)
    studies = [s for s in studies if s.report]
    if not studies:
        raise Ar3dInputError("no study with a report to train on")
    return studies


def _count(n: int) -> int:
    if n < 1:
        raise Ar3dInputError(f"n_phantoms must be at least 1, got {n}")
    return n


# ---------------------------------------------------------------- generated reports of real studies


def label_structures(labels: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> list[reports.Structure]:
    """The structures of a label map: name, volume (ml) and side of the centroid (RAS x vs the grid's centre)."""
    labels = np.asarray(labels)
    voxel_ml = float(np.prod(voxel_spacing(affine))) / 1000.0
    centre_x = (affine @ np.append((np.array(labels.shape) - 1) / 2.0, 1.0))[0]
    values = [int(v) for v in np.unique(labels) if v != 0]
    centroids = ndimage.center_of_mass(np.ones(labels.shape), labels, values) if values else []
    counts = ndimage.sum_labels(np.ones(labels.shape), labels, values) if values else []
    out = []
    for value, centroid, count in zip(values, centroids, counts):
        dx = (affine @ np.append(centroid, 1.0))[0] - centre_x
        side = "midline" if abs(dx) < SIDE_MARGIN_MM else ("right" if dx > 0 else "left")
        out.append(reports.Structure(names.get(value, f"structure {value}"), float(count) * voxel_ml, side))
    return out


def generated_report(scans: Sequence[Scan], study_id: str) -> str:
    """A generated report from the label maps of `scans` (each structure once, wording seeded by the id)."""
    rng = np.random.default_rng(list(study_id.encode()) or [0])
    structures: dict[str, reports.Structure] = {}
    for scan in scans:
        if scan.seg:
            seg = read_volume(scan.seg)
            for s in label_structures(np.rint(seg.array).astype(np.int64), seg.affine, scan.labels):
                structures.setdefault(s.name, s)
    return " ".join(reports.describe_structures(list(structures.values()), rng))


# ---------------------------------------------------------------- phantom studies


@dataclass
class PhantomStudy:
    """A phantom study's scans (name -> Volume), its findings and generated report."""

    volumes: dict[str, Volume]
    findings: list[reports.Finding]
    report: str
    modality: str


def phantom_study(kind: str, seed: int) -> Study:
    """The `Study` record of phantom study (`kind`, `seed`); its scans read through `load_scan`."""
    made = make_phantom_study(kind, seed)
    prefix = f"{PHANTOM_STUDIES}:{kind}:{seed}"
    scans = [Scan(name, f"{prefix}/{name}") for name in made.volumes]
    present = {f.kind for f in made.findings}
    known = {k: k in present for k, w in reports.FINDINGS.items() if w.modality == made.modality}
    return Study(f"phantom_study_{kind}_{seed}", scans, made.report, made.modality, known, generated=True)


@lru_cache(maxsize=4)
def make_phantom_study(kind: str, seed: int) -> PhantomStudy:
    """A phantom study with random findings: "ct" (plain and portal-venous CT) or "mri" (3-4 brain contrasts)."""
    if kind not in PHANTOM_STUDY_KINDS:
        raise Ar3dInputError(f"unknown phantom study kind {kind!r}; use {PHANTOM_STUDIES}, :ct or :mri")
    rng = np.random.default_rng([seed, 7])
    return _ct_study(seed, rng) if kind == "ct" else _mri_study(seed, rng)


def _ct_study(seed: int, rng: np.random.Generator) -> PhantomStudy:
    from model_core.data.phantoms import insert_unexpected_object, make_ct_abdomen

    phantom = make_ct_abdomen(seed, shape=CT_STUDY_SHAPE)
    findings: list[reports.Finding] = []
    drawn = {k: rng.random() < FINDING_PROBABILITY[k] for k in reports.FINDINGS if reports.FINDINGS[k].modality == "CT"}
    if drawn["metal_implant"]:
        phantom = insert_unexpected_object(phantom, seed=seed, radius_mm=rng.uniform(5.0, 9.0))
        mask = phantom.extra["unexpected"]
        findings.append(reports.Finding("metal_implant", _extent_mm(mask, phantom.affine),
                                        _side(mask, phantom.affine), 0.0))
    hu, labels = phantom.images["ct"].copy(), phantom.labels.copy()
    if drawn["splenomegaly"]:
        findings.append(_enlarge_spleen(hu, labels, phantom, rng))
    lesions = np.zeros(labels.shape, bool)
    for kind, organ in (("liver_lesion", (1,)), ("spleen_lesion", (2,)), ("kidney_lesion", (3, 4))):
        if drawn[kind]:
            found = _add_lesion(hu, labels, lesions, phantom.affine, kind, organ, rng)
            findings += [found] if found else []
    enhancement = np.zeros(256, np.float32)
    enhancement[list(VENOUS_HU)] = list(VENOUS_HU.values())
    venous = hu + enhancement[labels] * ~lesions
    if drawn["metal_implant"]:
        venous[phantom.extra["unexpected"]] = hu[phantom.extra["unexpected"]]
    venous += rng.normal(0.0, 8.0, venous.shape).astype(np.float32)
    volumes = {"ct_plain": Volume(hu, phantom.affine.copy(), None, {"modality": "CT"}),
               "ct_venous": _shifted(venous, phantom.affine, rng, "CT")}
    return PhantomStudy(volumes, findings, " ".join(reports.describe_findings(findings, "CT", rng)), "CT")


def _mri_study(seed: int, rng: np.random.Generator) -> PhantomStudy:
    from model_core.data.phantoms import make_brain_mri

    tumour = rng.random() < FINDING_PROBABILITY["brain_tumour"]
    phantom = make_brain_mri(seed, shape=MRI_STUDY_SHAPE, tumour=tumour)
    findings = []
    if tumour:
        core = np.isin(phantom.labels, (5, 6))
        whole = np.isin(phantom.labels, (4, 5, 6))
        findings.append(reports.Finding("brain_tumour", _extent_mm(core, phantom.affine), _side(core, phantom.affine),
                                        float(whole.sum() * np.prod(phantom.spacing) / 1000.0)))
    names = [n for n in CONTRASTS if rng.random() > 0.15] or list(CONTRASTS)
    volumes = {name: _shifted(phantom.images[name], phantom.affine, rng, "MRI") for name in names}
    return PhantomStudy(volumes, findings, " ".join(reports.describe_findings(findings, "MRI", rng)), "MRI")


def _shifted(array: np.ndarray, affine: np.ndarray, rng: np.random.Generator, modality: str) -> Volume:
    """A scan cut from `array` with a few slices and columns dropped at random ends (not co-registered)."""
    start = rng.integers(0, 4, 3)
    stop = np.array(array.shape) - rng.integers(0, 4, 3)
    cut = array[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]].astype(np.float32)
    moved = affine.copy()
    moved[:3, 3] = (affine @ np.append(start, 1.0))[:3]
    return Volume(np.ascontiguousarray(cut), moved, None, {"modality": modality})


def _enlarge_spleen(hu: np.ndarray, labels: np.ndarray, phantom, rng: np.random.Generator) -> reports.Finding:
    """Grow the spleen by 12-25 mm into fat and bowel inside the body; the finding with its volume and length."""
    spacing = np.array(phantom.spacing)
    spleen = labels == 2
    mean = float(hu[spleen].mean()) if spleen.any() else 45.0
    distance = ndimage.distance_transform_edt(~spleen, sampling=spacing)
    room = phantom.extra["body"] & np.isin(labels, (0, 8)) & (hu > -300)
    grow = room & (distance <= rng.uniform(12.0, 25.0))
    hu[grow] = mean + rng.normal(0.0, 12.0, int(grow.sum()))
    labels[grow] = 2
    spleen = labels == 2
    length = float(np.ptp(np.nonzero(spleen.any((0, 1)))[0]) + 1) * spacing[2] if spleen.any() else 0.0
    return reports.Finding("splenomegaly", length, "left", float(spleen.sum() * np.prod(spacing) / 1000.0))


def _add_lesion(hu, labels, lesions, affine, kind: str, organ: tuple[int, ...],
                rng: np.random.Generator) -> reports.Finding | None:
    """A hypodense sphere (10-40 mm) inside one organ; None when the organ is too small for it."""
    spacing = voxel_spacing(affine)
    value = int(rng.choice(organ))
    inside = labels == value
    radius = rng.uniform(5.0, 20.0 if kind == "liver_lesion" else 14.0)
    fits = ndimage.distance_transform_edt(inside, sampling=spacing) >= 0.6 * radius
    candidates = np.argwhere(fits)
    if not len(candidates):
        return None
    centre = candidates[rng.integers(len(candidates))]
    grid = np.ogrid[tuple(slice(0, n) for n in labels.shape)]
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    sphere = (dist2 <= radius**2) & inside
    hu[sphere] = rng.uniform(0.0, 20.0) + rng.normal(0.0, 10.0, int(sphere.sum()))
    lesions |= sphere
    return reports.Finding(kind, _extent_mm(sphere, affine), _side(sphere, affine), 0.0)


def _extent_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """The largest extent of a mask along the voxel axes, in mm."""
    if not mask.any():
        return 0.0
    idx = np.nonzero(mask)
    return float(max((np.ptp(i) + 1) * s for i, s in zip(idx, voxel_spacing(affine))))


def _side(mask: np.ndarray, affine: np.ndarray) -> str:
    """The patient's side of a mask's centroid: RAS x > 0 is the patient's right (the phantoms are centred)."""
    centroid = np.argwhere(mask).mean(0)
    return "right" if (affine @ np.append(centroid, 1.0))[0] > 0 else "left"


# ---------------------------------------------------------------- reading and windows


def load_scan(scan: Scan | str) -> Volume:
    """A scan's volume: a file (`read_volume`) or a phantom study's scan ("phantom-studies:<kind>:<seed>/<name>")."""
    image = scan.image if isinstance(scan, Scan) else str(scan)
    if not image.startswith(PHANTOM_STUDIES + ":"):
        return read_volume(image)
    match = re.fullmatch(rf"{PHANTOM_STUDIES}:(ct|mri):(\d+)/(\w+)", image)
    if match is None:
        raise Ar3dInputError(f"not a phantom study scan ({PHANTOM_STUDIES}:<ct|mri>:<seed>/<scan>)", image)
    made = make_phantom_study(match.group(1), int(match.group(2)))
    if match.group(3) not in made.volumes:
        raise Ar3dInputError(f"the phantom study has no scan {match.group(3)!r}; it has {', '.join(made.volumes)}", image)
    volume = made.volumes[match.group(3)]
    return Volume(volume.array, volume.affine, image, dict(volume.meta))


def window_start(shape: Sequence[int], window: Sequence[int], shift: Sequence[int] = (0, 0, 0)) -> tuple[int, ...]:
    """The first voxel of a window centred on the array (moved by `shift`); negative where it is padded."""
    return tuple((n - w) // 2 + int(s) for n, w, s in zip(shape, window, shift))


def cut_window(array: np.ndarray, window: Sequence[int], shift: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """The window (X, Y, Z) around the array's centre (moved by `shift`), padded with its minimum outside."""
    return window_of(array, window_start(array.shape, window, shift), tuple(window))


@dataclass
class PreparedScan:
    """A scan as the model sees it: the whole preprocessed array (RAS, model spacing, [0, 1])."""

    name: str
    array: np.ndarray  # (X, Y, Z) float32
    preprocessed: Any  # model_core.data.preprocess.Preprocessed: maps outputs back to the scan's grid


def prepare_scans(volumes: Sequence[Volume], pre_cfg: PreprocessConfig, modality: str | None = None,
                  names: Sequence[str] | None = None) -> list[PreparedScan]:
    """Preprocess each scan of a study on its own (its own grid: scans need not be co-registered)."""
    out = []
    for n, volume in enumerate(volumes):
        hint = modality or (volume.meta or {}).get("modality")
        pre = preprocess_volume(volume, pre_cfg, modality=hint, source=volume.path)
        out.append(PreparedScan(names[n] if names else str(n), pre.array, pre))
    return out


# ---------------------------------------------------------------- the dataset


class StudyDataset(Dataset):
    """Map-style dataset of (study, report) pairs; item `i` depends only on (seed, i).

    Item i draws from `np.random.default_rng([seed, i])`: a study, `scans` of its scans in random
    order (all of them, or with repeats when it has fewer), each scan's window (its centre moved
    by up to 1/8 of the window), and the report's sentences in random order behind the fixed
    prefix. Returns {"volumes": (scans, X, Y, Z) float32, "input_ids" and "attention_mask":
    (max_length,) long, "study": the id}. The tokenizer is set after the dataset is built
    (`set_tokenizer`): it may be trained on the dataset's own reports (`corpus`).
    """

    def __init__(self, studies: Sequence[Study], pre_cfg: PreprocessConfig, window: Sequence[int], scans: int,
                 seed: int = 0, *, length: int = 10**9, progress: ProgressFn = None):
        if not studies:
            raise Ar3dInputError("no study to pretrain on")
        if scans < 1:
            raise Ar3dInputError(f"scans per sample must be at least 1, got {scans}")
        self.studies, self.window, self.scans = list(studies), tuple(int(w) for w in window), int(scans)
        self.seed, self.length = int(seed), int(length)
        self.tokenizer = None
        self.arrays: list[list[np.ndarray]] = []
        for n, study in enumerate(self.studies):
            report(progress, n, len(self.studies), f"preprocessing {study.id}")
            volumes = [load_scan(scan) for scan in study.scans]
            self.arrays.append([p.array for p in prepare_scans(volumes, pre_cfg, study.modality)])
        report(progress, len(self.studies), len(self.studies), "preprocessed")

    def corpus(self) -> list[str]:
        """Every report as the model reads it (prefix included): what a tokenizer is trained on."""
        return [reports.compose_report(s.report, _modality_word(s)) for s in self.studies]

    def set_tokenizer(self, tokenizer) -> None:
        """The `model_core.models.text.ReportTokenizer` that turns reports into ids."""
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        if self.tokenizer is None:
            raise RuntimeError("StudyDataset.set_tokenizer was not called")
        rng = np.random.default_rng([self.seed, int(i)])
        n = int(rng.integers(len(self.studies)))
        arrays = self.arrays[n]
        order = rng.permutation(len(arrays))
        if len(order) < self.scans:
            order = np.concatenate([order, rng.integers(0, len(arrays), self.scans - len(order))])
        jitter = [max(1, w // 8) for w in self.window]
        volumes = [cut_window(arrays[k], self.window, [rng.integers(-j, j + 1) for j in jitter])
                   for k in order[: self.scans]]
        study = self.studies[n]
        ids, mask = self.tokenizer([reports.compose_report(study.report, _modality_word(study), rng)])
        return {"volumes": torch.from_numpy(np.stack(volumes)), "input_ids": ids[0], "attention_mask": mask[0],
                "study": study.id}


def _modality_word(study: Study) -> str:
    """"CT" or "MRI" from a study's modality hint (free text), else "" (a neutral prefix)."""
    text = study.modality or ""
    if re.search(r"\bct\b", text, re.IGNORECASE):
        return "CT"
    return "MRI" if re.search(r"\bmri?\b", text, re.IGNORECASE) else ""


def make_study_dataset(data: Sequence[str | os.PathLike], pre_cfg: PreprocessConfig, window: Sequence[int],
                       scans: int, seed: int = 0, *, n_phantoms: int = 8, progress: ProgressFn = None) -> StudyDataset:
    """`StudyDataset` over `studies_from_paths(data)` (manifests filtered to use "pretrain")."""
    return StudyDataset(studies_from_paths(data, n_phantoms=n_phantoms), pre_cfg, window, scans, seed,
                        progress=progress)
