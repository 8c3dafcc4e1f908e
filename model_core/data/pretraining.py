"""Cases, the preprocessing cache, the three sequence builders and the pretraining dataset.

Where the data comes from (`cases_from_paths`): a manifest (JSON, the format of the project's
shared data: relative paths resolve against the manifest's folder), a folder scanned for images,
single image files, and procedural phantoms ("phantoms", "phantom:ct", "phantom:mri").

Each case is preprocessed once (`model_core.data.preprocess.preprocess_volume`: intensities to
[0, 1], axes to RAS, voxels to the model spacing) and stored by `PreprocessCache` as .npy files
that later loads memory-map: an epoch never re-reads or re-resamples a scan.

A pretraining sample is a sequence of `n_sub` = 4 sub-volumes `(S, X, Y, Z)`, float32, in RAS
voxel order, each `crop x crop x slab` (the AR-SSL4M sequence):
- spatial: four overlapping slabs of one crop at z offsets s, s+stride, s+2 stride, s+3 stride;
- contrast: one location in four co-registered contrasts (t1n, t1c, t2w, t2f);
- semantic: crops centred on the same kind of labelled structure in four different cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from model_core.data.preprocess import (
    PreprocessConfig,
    as_label_array,
    normalize_intensity,
    preprocess_volume,
    resample_to_grid,
)
from model_core.errors import Ar3dInputError
from model_core.io.volume import (
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    Volume,
    read_labels_json,
    read_volume,
    simpleitk,
)
from model_core.progress import ProgressFn, report
from model_core.vocabulary import CONTRAST_ALIASES, CONTRASTS, SEQUENCE_KINDS

if TYPE_CHECKING:
    from model_core.data.phantoms import Phantom

log = logging.getLogger(__name__)

PHANTOM_PREFIX = "phantom:"
PHANTOM_KINDS = ("ct", "mri")
CACHE_VERSION = 3  # bump when the cached arrays change meaning (3: canonical contrast names)
_NOT_IMAGE_WORDS = ("seg", "label", "mask")  # file names with these are not images to pretrain on
_SEG_WORDS = ("seg", "label")
_IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    """One scan: an image (file, DICOM folder or phantom), optional labels and co-registered images."""

    id: str
    image: str  # path; "phantom:<ct|mri>:<seed>/<image name>" for a phantom
    seg: str | None = None  # label map on the image's grid
    modality: str | None = None  # free-text hint, e.g. "CT, 3 mm" (see `guess_modality`)
    extra_images: dict[str, str] = field(default_factory=dict)  # name -> co-registered image
    labels: dict[int, str] = field(default_factory=dict)  # label value -> class name

    @property
    def image_name(self) -> str:
        """The main image's name among the contrasts: its file name without suffixes, canonical ("t1c")."""
        return contrast_name(_stem(self.image))

    def contrast_names(self) -> set[str]:
        """Names of every co-registered image: the main image's and the extra images' (canonical)."""
        return {self.image_name, *map(contrast_name, self.extra_images)}


def contrast_name(name: str) -> str:
    """The canonical name of an MRI contrast ("flair" -> "t2f", "t1post" -> "t1c"); other names unchanged."""
    return CONTRAST_ALIASES.get(name.lower(), name)


def cases_from_manifest(path: str | os.PathLike, use: str | None = "pretrain") -> list[Case]:
    """The cases of a JSON manifest whose "use" list holds `use` (every case when `use` is None).

    Format: {"cases": [{"id", "image", "seg", "modality", "labels", "extra_images", "use"}, ...]};
    paths are relative to the manifest's folder; "labels" is a {value: name} dict or the path of a
    JSON file holding one. A case without "use" is kept for any `use`. Missing files raise
    `Ar3dInputError` naming the manifest.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Ar3dInputError(f"cannot read the manifest ({e})", path) from None
    entries = doc.get("cases") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise Ar3dInputError('manifest must be a list of cases or an object with a "cases" list', path)
    root = path.parent
    cases = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise Ar3dInputError(f'case {n} has no "image"', path)
        if use is not None and "use" in entry and use not in entry["use"]:
            continue
        case_id = str(entry.get("id", n))

        def resolve(rel: str, what: str) -> str:
            full = (root / rel).resolve()
            if not full.exists():
                raise Ar3dInputError(f"case {case_id}: {what} {rel} not found", path)
            return str(full)

        labels = entry.get("labels") or {}
        if isinstance(labels, str):
            labels_path = resolve(labels, "labels file")
            try:
                labels = json.loads(Path(labels_path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise Ar3dInputError(f"case {case_id}: cannot read labels file {labels} ({e})", path) from None
        cases.append(
            Case(
                id=case_id,
                image=resolve(entry["image"], "image"),
                seg=resolve(entry["seg"], "seg") if entry.get("seg") else None,
                modality=entry.get("modality"),
                extra_images={k: resolve(v, f"extra image {k}") for k, v in (entry.get("extra_images") or {}).items()},
                labels={int(k): str(v) for k, v in labels.items()},
            )
        )
    return cases


def cases_from_folder(path: str | os.PathLike) -> list[Case]:
    """Every 3D image file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) and DICOM folder under `path`.

    Files whose name contains "seg", "label" or "mask" are not images. A folder holding exactly one
    image and one "seg"/"label" file pairs them, with class names from a labels.json beside them
    ({"1": "liver", ...}) if present. Files whose header is unreadable or not 3D are skipped
    with a logged warning. Case ids are the paths relative to `path`, without suffix.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise Ar3dInputError("not a folder", root)
    cases = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        folder = Path(folder)
        images = [folder / f for f in sorted(files) if _is_image_name(f) and _is_3d_image(folder / f)]
        if _is_dicom_series(folder, files):
            images.append(folder)
        segs = [folder / f for f in sorted(files) if f.lower().endswith(_IMAGE_SUFFIXES) and _is_seg_name(f)]
        pair = len(images) == 1 and len(segs) == 1
        labels = read_labels_json(folder / "labels.json") if pair else {}
        for image in images:
            rel = image.relative_to(root).as_posix()
            case_id = _strip_suffix(rel) if rel != "." else root.name
            cases.append(Case(case_id, str(image), str(segs[0]) if pair else None, labels=labels))
    return cases


def cases_from_paths(
    items: Sequence[str | os.PathLike], *, use: str | None = "pretrain", n_phantoms: int = 8
) -> list[Case]:
    """Cases from a mix of manifests (.json), folders, image files and phantom names.

    This is what `ar3d pretrain --data ...` passes. "phantoms" gives `n_phantoms` CT and
    `n_phantoms` brain MRI phantoms (seeds 0..n-1), "phantom:ct" / "phantom:mri" one kind. A
    folder holding a manifest.json is read as that manifest, filtered by `use`. Repeated case ids
    get a "#2", "#3"... suffix.
    """
    cases: list[Case] = []
    for item in items:
        text = str(item)
        if text == "phantoms" or text.startswith(PHANTOM_PREFIX):
            kinds = PHANTOM_KINDS if text == "phantoms" else (text[len(PHANTOM_PREFIX) :],)
            for kind in kinds:
                cases += phantom_cases(kind, n_phantoms)
            continue
        path = Path(text)
        if not path.exists():
            raise Ar3dInputError("file or folder not found", path)
        if path.is_file() and path.suffix.lower() == ".json":
            cases += cases_from_manifest(path, use)
        elif path.is_dir() and (path / "manifest.json").is_file():
            cases += cases_from_manifest(path / "manifest.json", use)
        elif path.is_dir():
            found = cases_from_folder(path)
            if not found:
                raise Ar3dInputError("folder holds no readable 3D image or DICOM series", path)
            cases += found
        elif path.name.lower().endswith(_IMAGE_SUFFIXES + (".dcm",)):
            cases.append(Case(_strip_suffix(path.name), str(path.resolve())))
        else:
            raise Ar3dInputError("not an image file, DICOM folder, folder of images or .json manifest", path)
    seen: dict[str, int] = {}
    for case in cases:
        seen[case.id] = seen.get(case.id, 0) + 1
        if seen[case.id] > 1:
            case.id = f"{case.id}#{seen[case.id]}"
    return cases


def phantom_cases(kind: str, n: int) -> list[Case]:
    """`n` phantom cases of `kind` ("ct": abdomen CT; "mri": brain MRI in t1n/t1c/t2w/t2f), seeds 0..n-1."""
    if kind not in PHANTOM_KINDS:
        raise Ar3dInputError(f"unknown phantom kind {kind!r}; use phantoms, phantom:ct or phantom:mri")
    if n < 1:
        raise Ar3dInputError(f"n_phantoms must be at least 1, got {n}")
    from model_core.data.phantoms import CT_CLASSES, MRI_CLASSES

    names = {k: v for k, v in (CT_CLASSES if kind == "ct" else MRI_CLASSES).items() if k != 0}
    cases = []
    for seed in range(n):
        base = f"{PHANTOM_PREFIX}{kind}:{seed}"
        if kind == "ct":
            cases.append(Case(f"phantom_ct_{seed}", f"{base}/ct", f"{base}/labels", "CT", {}, names))
        else:
            extra = {name: f"{base}/{name}" for name in CONTRASTS if name != "t1c"}
            cases.append(Case(f"phantom_mri_{seed}", f"{base}/t1c", f"{base}/labels", "MRI", extra, names))
    return cases


def _stem(path: str) -> str:
    return _strip_suffix(re.split(r"[/\\]", path.rstrip("/\\"))[-1])


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(_IMAGE_SUFFIXES + (".dcm",), key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_image_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(_IMAGE_SUFFIXES) and not any(word in lower for word in _NOT_IMAGE_WORDS)


def _is_seg_name(name: str) -> bool:
    return any(word in name.lower() for word in _SEG_WORDS)


def _is_3d_image(path: Path) -> bool:
    """Whether the header describes a scalar 3D volume (trailing size-1 dimensions allowed)."""
    reader = simpleitk().ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        log.warning("skipping %s: its header cannot be read", path)
        return False
    size = list(reader.GetSize())
    while len(size) > 3 and size[-1] == 1:
        size.pop()
    if len(size) != 3 or min(size) < 2 or reader.GetNumberOfComponents() != 1:
        log.warning("skipping %s: not a scalar 3D volume (size %s)", path, reader.GetSize())
        return False
    return True


def _is_dicom_series(folder: Path, files: list[str], max_files: int = 20) -> bool:
    """Whether the folder holds DICOM images (.dcm or the DICM preamble), segmentation objects aside."""
    names = [f for f in sorted(files) if not f.lower().endswith(_IMAGE_SUFFIXES)]
    candidates = [f for f in names if not any(word in f.lower() for word in _NOT_IMAGE_WORDS)]
    for name in candidates[:max_files]:
        if name.lower().endswith(".dcm"):
            return True
        with open(folder / name, "rb") as f:
            if f.read(132)[128:] == b"DICM":
                return True
    return False


# ---------------------------------------------------------------- reading and the cache


@dataclass
class CaseData:
    """A case as the model sees it: every array (X, Y, Z) on one RAS grid at the model spacing."""

    image: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    affine: np.ndarray  # (4, 4) RAS+ affine of the grid
    modality: str  # "ct" | "mri"
    labels: np.ndarray | None  # (X, Y, Z) integer labels or None
    contrasts: dict[str, np.ndarray]  # name -> (X, Y, Z) float32; the main image under its own name
    present: tuple[int, ...]  # non-zero label values present in `labels`


def preprocess_case(case: Case, cfg: PreprocessConfig) -> CaseData:
    """Read a case's files and preprocess them onto one grid (the main image's, at `cfg.spacing`).

    The segmentation and the extra images go onto the main image's preprocessed grid: through the
    same reorientation and resampling when their grid is the image's, else through world space
    (`resample_to_grid`). Extra images are normalised with the main image's modality.
    """
    volume = _read(case.image)
    seg = _read(case.seg) if case.seg else None
    same_grid = seg is not None and _same_grid(seg, volume)
    pre = preprocess_volume(
        volume, cfg, modality=case.modality, labels=seg.array if same_grid else None, source=case.image
    )
    labels = pre.labels
    if seg is not None and not same_grid:
        labels = resample_to_grid(as_label_array(seg.array, case.seg), seg.affine, pre.array.shape, pre.affine, order=0)
    contrasts = {case.image_name: pre.array}
    intensity = cfg.intensity_for(pre.modality)
    for name, path in case.extra_images.items():
        name = contrast_name(name)
        if name in contrasts:
            continue
        extra = _read(path)
        if _same_grid(extra, volume):
            extra_cfg = PreprocessConfig(cfg.spacing, intensity)
            contrasts[name] = preprocess_volume(extra, extra_cfg, source=path).array
        else:
            x = normalize_intensity(extra.array, intensity, source=path)
            contrasts[name] = resample_to_grid(x, extra.affine, pre.array.shape, pre.affine, order=1)
    present = () if labels is None else tuple(int(v) for v in np.unique(labels) if v != 0)
    return CaseData(pre.array, pre.affine, pre.modality, labels, contrasts, present)


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.array.shape == b.array.shape and np.allclose(a.affine, b.affine, atol=1e-3)


def _read(path: str) -> Volume:
    """`read_volume`, or a phantom's image or labels for "phantom:<kind>:<seed>/<name>"."""
    if not path.startswith(PHANTOM_PREFIX):
        return read_volume(path)
    match = re.fullmatch(rf"{PHANTOM_PREFIX}(ct|mri):(\d+)/(\w+)", path)
    if match is None:
        raise Ar3dInputError("not a phantom name of the form phantom:<ct|mri>:<seed>/<image>", path)
    kind, seed, name = match.group(1), int(match.group(2)), match.group(3)
    phantom = _phantom(kind, seed)
    if name != "labels" and name not in phantom.images:
        raise Ar3dInputError(f"phantom has no image {name!r}; it has {', '.join(phantom.images)}", path)
    array = phantom.labels if name == "labels" else phantom.images[name]
    return Volume(array, phantom.affine, path, {"modality": phantom.modality})


@lru_cache(maxsize=2)
def _phantom(kind: str, seed: int) -> Phantom:
    from model_core.data.phantoms import make_brain_mri, make_ct_abdomen

    return make_ct_abdomen(seed) if kind == "ct" else make_brain_mri(seed)


def _fingerprint(path: str) -> list:
    """What identifies a file's content cheaply: absolute path, size, mtime (every file of a folder)."""
    if path.startswith(PHANTOM_PREFIX):
        from model_core.data import phantoms  # phantoms change when their code does

        st = os.stat(phantoms.__file__)
        return [path, st.st_size, st.st_mtime_ns]
    p = Path(path).resolve()
    if p.is_dir():
        return [str(p), sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(p) if e.is_file())]
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


class PreprocessCache:
    """Preprocessed cases on disk (.npy + meta.json, memory-mapped on load) and in an in-process LRU.

    The key is the sha1 of every file's absolute path, size and mtime, the modality hint and the
    `PreprocessConfig`: editing a file or changing the spacing makes a new entry. Entries are
    written to a temporary folder renamed into place, so readers never see half an entry and
    concurrent writers (DataLoader workers, DDP ranks) are safe. With `cache_dir=None` cases are
    kept in memory only (no size limit, so that nothing is preprocessed twice).
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, max_items: int = 64):
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.max_items = max_items
        self._lru: OrderedDict[str, CaseData] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lru": OrderedDict()}  # workers reopen their own memory maps

    def key(self, case: Case, cfg: PreprocessConfig) -> str:
        files = [[role, _fingerprint(path)] for role, path in _case_files(case)]
        text = json.dumps([CACHE_VERSION, files, case.modality, cfg.to_dict()], sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()

    def load(self, case: Case, cfg: PreprocessConfig) -> CaseData:
        """The preprocessed case: from memory, else from disk, else computed (and stored)."""
        key = self.key(case, cfg)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        if self.cache_dir is not None:
            entry = self.cache_dir / key
            if not (entry / "meta.json").is_file():
                self._write(entry, case, preprocess_case(case, cfg))
            data = self._read_entry(entry)
        else:
            data = preprocess_case(case, cfg)
        self._lru[key] = data
        if self.cache_dir is not None and len(self._lru) > self.max_items:
            self._lru.popitem(last=False)
        return data

    def _write(self, entry: Path, case: Case, data: CaseData) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            np.save(tmp / "image.npy", data.image)
            if data.labels is not None:
                np.save(tmp / "labels.npy", data.labels)
            extra = {name: arr for name, arr in data.contrasts.items() if name != case.image_name}
            for n, array in enumerate(extra.values()):
                np.save(tmp / f"contrast{n}.npy", array)
            meta = {
                "case": case.id,
                "image": case.image,
                "affine": data.affine.tolist(),
                "modality": data.modality,
                "present": list(data.present),
                "image_name": case.image_name,
                "contrasts": list(extra),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, entry)
            except OSError:  # another process stored the same entry first
                if not (entry / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _read_entry(entry: Path) -> CaseData:
        meta = json.loads((entry / "meta.json").read_text())
        image = np.load(entry / "image.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy", mmap_mode="r") if (entry / "labels.npy").is_file() else None
        contrasts = {meta["image_name"]: image}
        for n, name in enumerate(meta["contrasts"]):
            contrasts[name] = np.load(entry / f"contrast{n}.npy", mmap_mode="r")
        affine = np.array(meta["affine"], dtype=np.float64)
        return CaseData(image, affine, meta["modality"], labels, contrasts, tuple(meta["present"]))


def _case_files(case: Case) -> list[tuple[str, str]]:
    files = [("image", case.image)] + [(f"extra:{k}", v) for k, v in sorted(case.extra_images.items())]
    return files + ([("seg", case.seg)] if case.seg else [])


# ---------------------------------------------------------------- sequence builders


@dataclass
class SequenceConfig:
    """What a pretraining sample looks like."""

    kinds: tuple[str, ...] = ("spatial",)  # among SEQUENCE_KINDS
    crop: int = 128  # in-plane size (X and Y) of every sub-volume, voxels
    slab: int = 32  # depth (Z) of every sub-volume, voxels
    stride: int = 8  # z offset between consecutive spatial slabs
    n_sub: int = 4  # sub-volumes per sequence
    contrasts: tuple[str, ...] = CONTRASTS  # order of a contrast sequence (n_sub names)

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.contrasts = tuple(self.contrasts)
        unknown = [k for k in self.kinds if k not in SEQUENCE_KINDS]
        if not self.kinds or unknown:
            raise Ar3dInputError(f"sequence kinds must be among {', '.join(SEQUENCE_KINDS)}, got {self.kinds}")
        for name in ("crop", "slab", "n_sub"):
            if int(getattr(self, name)) < 1:
                raise Ar3dInputError(f"sequence {name} must be at least 1, got {getattr(self, name)}")
        if self.stride < 0:
            raise Ar3dInputError(f"sequence stride must be >= 0, got {self.stride}")
        if "contrast" in self.kinds and len(self.contrasts) != self.n_sub:
            raise Ar3dInputError(f"a contrast sequence needs {self.n_sub} contrasts, got {self.contrasts}")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "kinds": list(self.kinds), "contrasts": list(self.contrasts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SequenceConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise Ar3dInputError(f"unknown sequence setting(s) {', '.join(unknown)}")
        return cls(**d)


def spatial_sequence(
    vol: np.ndarray, crop: int, rng: np.random.Generator, slab: int = 32, stride: int = 8, n_sub: int = 4
) -> torch.Tensor:
    """Four overlapping slabs of one random crop: slab t covers z in [s + t*stride, s + t*stride + slab).

    Returns (n_sub, crop, crop, slab) float32. A volume smaller than the extent needed
    (crop, crop, slab + (n_sub-1)*stride) is padded on both sides with its minimum value.
    """
    depth = slab + stride * (n_sub - 1)
    block = _window(vol, _random_start(vol.shape, (crop, crop, depth), rng), (crop, crop, depth))
    return torch.from_numpy(np.stack([block[:, :, t * stride : t * stride + slab] for t in range(n_sub)]))


def contrast_sequence(
    vols: dict[str, np.ndarray],
    rng: np.random.Generator,
    crop: int,
    slab: int = 32,
    order: Sequence[str] = CONTRASTS,
) -> torch.Tensor:
    """The same random crop in each co-registered contrast, in `order`: (len(order), crop, crop, slab)."""
    missing = [name for name in order if name not in vols]
    if missing:
        raise ValueError(f"contrast sequence needs {', '.join(order)}; missing {', '.join(missing)}")
    shapes = {tuple(vols[name].shape) for name in order}
    if len(shapes) != 1:
        raise ValueError(f"contrasts must share one grid, got shapes {sorted(shapes)}")
    start = _random_start(shapes.pop(), (crop, crop, slab), rng)
    return torch.from_numpy(np.stack([_window(vols[name], start, (crop, crop, slab)) for name in order]))


def semantic_sequence(
    crops_source: Sequence[tuple[np.ndarray, np.ndarray, dict[int, str]]],
    structure: str,
    rng: np.random.Generator,
    crop: int,
    slab: int = 32,
    n_sub: int = 4,
) -> torch.Tensor:
    """Crops centred on voxels of the class named `structure`, one per source (patient).

    `crops_source` holds (volume, labels, class_names) per patient; sources without a voxel of the
    structure are ignored. With at least `n_sub` such sources, `n_sub` distinct ones are drawn;
    with fewer, every source appears once and the rest are drawn with replacement. Each crop is
    centred on a random voxel of the structure, which sits at (crop//2, crop//2, slab//2) of its
    sub-volume; crops reaching outside the volume are padded with its minimum.
    Returns (n_sub, crop, crop, slab) float32.
    """
    candidates = []  # (volume, flat indices of the structure)
    for volume, labels, class_names in crops_source:
        values = [value for value, name in class_names.items() if name == structure]
        if values:
            where = np.flatnonzero(np.isin(labels, values))
            if where.size:
                candidates.append((volume, labels.shape, where))
    if not candidates:
        raise ValueError(f"no source has a voxel of the structure {structure!r}")
    if len(candidates) >= n_sub:
        picks = rng.choice(len(candidates), size=n_sub, replace=False)
    else:
        picks = np.concatenate([np.arange(len(candidates)), rng.integers(0, len(candidates), n_sub - len(candidates))])
        rng.shuffle(picks)
    size = (crop, crop, slab)
    subs = []
    for pick in picks:
        volume, shape, where = candidates[pick]
        centre = np.unravel_index(where[rng.integers(where.size)], shape)
        subs.append(_window(volume, tuple(int(c) - n // 2 for c, n in zip(centre, size)), size))
    return torch.from_numpy(np.stack(subs))


def _random_start(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniform window start where the window fits; centred (negative: padded) where it does not."""
    return tuple(int(rng.integers(0, n - s + 1)) if n >= s else (n - s) // 2 for n, s in zip(shape, size))


def _window(vol: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """vol[start : start + size] as float32, padded with vol's minimum where it reaches outside."""
    src = tuple(slice(max(0, s), min(n, s + k)) for s, k, n in zip(start, size, vol.shape))
    if all(sl.start == s and sl.stop == s + k for sl, s, k in zip(src, start, size)):
        return np.array(vol[src], dtype=np.float32)
    out = np.full(tuple(size), float(np.min(vol)), dtype=np.float32)
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    if all(sl.stop > sl.start for sl in src):
        out[dst] = vol[src]
    return out


# ---------------------------------------------------------------- the dataset


class PretrainDataset(Dataset):
    """Map-style dataset of autoregressive pretraining sequences; item `i` depends only on (seed, i).

    Item i draws from `np.random.default_rng([seed, i])`: a sequence kind among `self.kinds` (the
    configured kinds that the cases support), then the case(s), then the crop. It returns
    {"volumes": (n_sub, crop, crop, slab) float32 tensor, "kind": str, "case": case ids joined by "+"}.
    `len()` is huge (`length`): a training loop takes items step*B ... step*B + B - 1, so resuming
    at a step replays the same samples.

    Every case is preprocessed once when the dataset is built (into `cache_dir`, or memory when it
    is None), which also finds what the cases support:
    - contrast: cases whose images include every name of `seq_cfg.contrasts`;
    - semantic: class names present (non-zero label values) in the labels of at least two cases
      of the same modality (a CT liver crop is not followed by an MRI one).
    Workers (DataLoader num_workers > 0) memory-map the cached arrays lazily.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        seq_cfg: SequenceConfig,
        pre_cfg: PreprocessConfig,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        *,
        length: int = 10**9,
        progress: ProgressFn = None,
    ):
        if not cases:
            raise Ar3dInputError("no cases to pretrain on")
        self.cases = list(cases)
        self.seq_cfg, self.pre_cfg, self.seed, self.length = seq_cfg, pre_cfg, int(seed), int(length)
        self.cache = PreprocessCache(cache_dir)
        self._contrast_cases: list[int] = []
        cases_by_structure: dict[tuple[str, str], set[int]] = {}  # (modality, class name) -> cases
        for n, case in enumerate(self.cases):
            report(progress, n, len(self.cases), f"preprocessing {case.id}")
            data = self.cache.load(case, pre_cfg)
            if set(seq_cfg.contrasts) <= set(data.contrasts):
                self._contrast_cases.append(n)
            for value in data.present:
                if value in case.labels:
                    cases_by_structure.setdefault((data.modality, case.labels[value]), set()).add(n)
        report(progress, len(self.cases), len(self.cases), "preprocessed")
        self._structures = {key: sorted(ns) for key, ns in sorted(cases_by_structure.items()) if len(ns) >= 2}
        supported = {"spatial": True, "contrast": bool(self._contrast_cases), "semantic": bool(self._structures)}
        self.kinds = tuple(kind for kind in seq_cfg.kinds if supported[kind])
        if not self.kinds:
            raise Ar3dInputError(
                f"the data supports none of the sequence kinds {', '.join(seq_cfg.kinds)}: contrast needs a case "
                f"with images {', '.join(seq_cfg.contrasts)}; semantic needs a class name labelled in two cases"
            )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        cfg = self.seq_cfg
        rng = np.random.default_rng([self.seed, int(i)])
        kind = self.kinds[rng.integers(len(self.kinds))]
        if kind == "spatial":
            n = int(rng.integers(len(self.cases)))
            volumes = spatial_sequence(self._load(n).image, cfg.crop, rng, cfg.slab, cfg.stride, cfg.n_sub)
            picked = [n]
        elif kind == "contrast":
            n = self._contrast_cases[rng.integers(len(self._contrast_cases))]
            volumes = contrast_sequence(self._load(n).contrasts, rng, cfg.crop, cfg.slab, cfg.contrasts)
            picked = [n]
        else:
            keys = list(self._structures)
            modality, structure = keys[rng.integers(len(keys))]
            pool = self._structures[(modality, structure)]
            picked = [int(n) for n in rng.choice(pool, size=min(cfg.n_sub, len(pool)), replace=False)]
            sources = [(self._load(n).image, self._load(n).labels, self.cases[n].labels) for n in picked]
            volumes = semantic_sequence(sources, structure, rng, cfg.crop, cfg.slab, cfg.n_sub)
        return {"volumes": volumes, "kind": kind, "case": "+".join(self.cases[n].id for n in picked)}

    def _load(self, n: int) -> CaseData:
        return self.cache.load(self.cases[n], self.pre_cfg)


def make_pretrain_dataset(
    data: Sequence[str | os.PathLike],
    seq_cfg: SequenceConfig,
    pre_cfg: PreprocessConfig,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    n_phantoms: int = 8,
    progress: ProgressFn = None,
) -> PretrainDataset:
    """`PretrainDataset` over `cases_from_paths(data)` (manifests filtered to use "pretrain")."""
    cases = cases_from_paths(data, use="pretrain", n_phantoms=n_phantoms)
    return PretrainDataset(cases, seq_cfg, pre_cfg, seed, cache_dir, progress=progress)
