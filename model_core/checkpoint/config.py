"""The typed config.json of a checkpoint, its format version, and the migration of older versions.

config.json, version 2:

    format, version, architecture   "napari-ar3d", 2, "vit3d"
    encoder         the ViT encoder (`ViT3DConfig`)
    heads           what the weights hold beside the encoder: "next_token" (AR pretraining),
                    "mae_decoder" (MAE pretraining), "alice" (Alice's options; kept as JSON),
                    "segmentation" (a decoder and its window)
    objective       what trained the weights: null, "ar", "mae", "alice", "hlip" or "segmentation"
    preprocessing   the model's input convention (`PreprocessConfig`: spacing, intensity)
    modality        what it was trained on: "CT", "MRI" or "any"
    classes         K class names; label value k is classes[k-1]
    provenance      where the weights come from: data by file name and sha256, never by path

`CheckpointConfig.from_json` reads any supported version: it checks the format and version,
brings an older document to the current version (`migrate`), and refuses anything else with a
`CheckpointError` naming config.json and the setting. `to_json` writes the current version.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, get_args, get_type_hints

from model_core.checkpoint.provenance import file_name, strip_paths
from model_core.data.preprocess import PreprocessConfig
from model_core.errors import Ar3dInputError, CheckpointError
from model_core.models.vit import ViT3DConfig
from model_core.vocabulary import MODALITIES, MODALITY_ANY, WINDOW_PATCHES

FORMAT = "napari-ar3d"
VERSION = 2  # 2: the segmentation "window" (was "roi"), annotation "dense" (was "full"), no paths in provenance
CONFIG_FILE = "config.json"
ARCHITECTURES = ("vit3d",)
OBJECTIVES = (None, "ar", "mae", "alice", "hlip", "segmentation")  # what trained the weights: pretraining or fine-tuning
CHECKPOINT_MODALITIES = (*MODALITIES, MODALITY_ANY)

Where = str | os.PathLike


def _fail(message: str, where: Where) -> NoReturn:
    raise CheckpointError(message, where)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- migration


def migrate(doc: dict) -> dict:
    """A config.json document of any supported version in the current one (a new dict; `doc` is untouched).

    Version 1 -> 2: the segmentation head's "roi" is named "window" (and a head without one gets
    the default WINDOW_PATCHES patches); a light decoder saved before the mid-resolution branch
    existed gets "mid": 0; in the provenance, annotation "full" is named "dense", the fine-tuning
    setting "roi" is named "window", and every absolute path is reduced to its file name (a
    starting encoder given as a folder becomes {"name": its folder name}).
    """
    doc = copy.deepcopy(doc)
    version = doc.get("version")
    while isinstance(version, int) and version in _MIGRATIONS:
        _MIGRATIONS[version](doc)
        version = doc["version"] = version + 1
    return doc


def _v1_to_v2(doc: dict) -> None:
    heads = doc.get("heads")
    seg = heads.get("segmentation") if isinstance(heads, dict) else None
    if isinstance(seg, dict):
        _rename(seg, "roi", "window")
        patch = _patch_size(doc.get("encoder"))
        if "window" not in seg and patch is not None:
            seg["window"] = [WINDOW_PATCHES * patch] * 3
        decoder = seg.get("decoder")
        if isinstance(decoder, dict) and decoder.get("kind") == "light" and "mid" not in decoder:
            decoder["mid"] = 0
    prov = doc.get("provenance")
    if isinstance(prov, dict):
        doc["provenance"] = _v1_provenance(prov)


def _v1_provenance(prov: dict) -> dict:
    settings = prov.get("finetune")
    for record in (prov, settings if isinstance(settings, dict) else {}):
        if record.get("annotation") == "full":
            record["annotation"] = "dense"
    if isinstance(settings, dict):
        _rename(settings, "roi", "window")
    encoder = prov.get("encoder")
    if isinstance(encoder, str) and ("/" in encoder or "\\" in encoder):
        prov["encoder"] = {"name": file_name(encoder)}
    if isinstance(prov.get("data"), str):
        prov["data"] = [prov["data"]]
    return strip_paths(prov)


def _rename(doc: dict, old: str, new: str) -> None:
    """Rename the key `old` of `doc` to `new` in place, where it stood (unless `new` is there already)."""
    if old in doc and new not in doc:
        items = [(new if k == old else k, v) for k, v in doc.items()]
        doc.clear()
        doc.update(items)


def _patch_size(encoder: Any) -> int | None:
    try:
        return ViT3DConfig.from_dict(encoder).patch_size if isinstance(encoder, dict) else None
    except (Ar3dInputError, TypeError, ValueError):
        return None


_MIGRATIONS = {1: _v1_to_v2}  # version -> the step that brings a document of that version to the next


# ----------------------------------------------------------------------------- heads


@dataclass
class NextTokenHeadConfig:
    """The AR objective's next-token head: a linear map from a token to the next patch's voxels."""

    type: str  # "linear"
    out_features: int  # voxels of a patch: patch_size^3 * in_channels
    stats_weight: float = 0.0  # > 0: the head also predicts the next patch's brightness (`patch_stats`), so weighted

    @classmethod
    def from_json(cls, doc: dict, where: Where) -> NextTokenHeadConfig:
        _known(doc, cls, "the next_token head", where)
        out, kind = doc.get("out_features"), doc.get("type", "linear")
        if type(out) is not int or out < 1 or not isinstance(kind, str):
            _fail(f"the next_token head needs a positive 'out_features' and a 'type', got {_short(doc)}", where)
        stats_weight = doc.get("stats_weight", 0.0)
        if type(stats_weight) not in (int, float) or stats_weight < 0:
            _fail(f"the next_token head's 'stats_weight' must be a number >= 0, got {stats_weight!r}", where)
        return cls(type=kind, out_features=out, stats_weight=float(stats_weight))

    def to_json(self) -> dict[str, Any]:
        """Without "stats_weight" when it is 0 (off), as configs without it were written."""
        doc = asdict(self)
        if not self.stats_weight:
            del doc["stats_weight"]
        return doc


@dataclass
class MaeDecoderConfig:
    """The MAE baseline's decoder: the options of `MaskedAutoencoderObjective` (None: its default)."""

    mask_ratio: float = 0.75
    decoder_width: int | None = None
    decoder_depth: int = 4
    decoder_heads: int | None = None

    @classmethod
    def from_json(cls, doc: dict, where: Where) -> MaeDecoderConfig:
        _known(doc, cls, "the mae_decoder head", where)
        out = cls(**doc)
        ints = (out.decoder_width, out.decoder_depth, out.decoder_heads)
        if not (_is_number(out.mask_ratio) and all(v is None or type(v) is int for v in ints)):
            _fail(f"the mae_decoder head needs a number 'mask_ratio' and whole decoder sizes, got {_short(doc)}", where)
        return out

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `build_objective("mae", ...)`."""
        return asdict(self)


@dataclass
class SegmentationHeadConfig:
    """A segmentation model's decoder and the window it segments at a time."""

    decoder: dict[str, Any]  # {"kind": "light" | "unetr", "num_classes": K + 1, ...}: `decoder_from_config`
    window: tuple[int, int, int]  # voxels of the model grid

    @classmethod
    def from_json(cls, doc: dict, where: Where) -> SegmentationHeadConfig:
        decoder, window = doc.get("decoder"), doc.get("window")
        if not isinstance(decoder, dict) or not isinstance(decoder.get("kind"), str):
            _fail(f"the segmentation head has no decoder settings with a 'kind', got {doc}", where)
        if not (isinstance(window, list) and len(window) == 3 and all(type(r) is int and r > 0 for r in window)):
            _fail(f"the segmentation window must be three positive voxel counts, got {window!r}", where)
        return cls(dict(decoder), tuple(window))

    def to_json(self) -> dict[str, Any]:
        return {"decoder": dict(self.decoder), "window": list(self.window)}


@dataclass
class HeadsConfig:
    """The heads of a checkpoint; each None when the weights do not hold it."""

    next_token: NextTokenHeadConfig | None = None
    mae_decoder: MaeDecoderConfig | None = None
    segmentation: SegmentationHeadConfig | None = None
    other: dict[str, dict] = field(default_factory=dict)  # heads this version does not know, kept as they are

    @classmethod
    def from_json(cls, doc: dict, where: Where) -> HeadsConfig:
        for name, head in doc.items():
            if not isinstance(head, dict):
                _fail(f"head {name!r} must be a JSON object, got {head!r}", where)
        heads = cls(other={k: v for k, v in doc.items() if k not in _HEAD_TYPES})
        for name, head_type in _HEAD_TYPES.items():
            if name in doc:
                setattr(heads, name, head_type.from_json(doc[name], where))
        return heads

    def to_json(self) -> dict[str, dict]:
        known = {name: getattr(self, name) for name in _HEAD_TYPES if getattr(self, name) is not None}
        return {**{k: _head_json(v) for k, v in known.items()}, **copy.deepcopy(self.other)}

    def names(self) -> list[str]:
        return list(self.to_json())


_HEAD_TYPES = {"next_token": NextTokenHeadConfig, "mae_decoder": MaeDecoderConfig, "segmentation": SegmentationHeadConfig}


def _head_json(head: Any) -> dict:
    return head.to_json() if hasattr(head, "to_json") else asdict(head)


def _known(doc: dict, cls: type, what: str, where: Where) -> None:
    unknown = sorted(set(doc) - {f.name for f in fields(cls)})
    if unknown:
        _fail(f"unknown setting(s) of {what}: {', '.join(unknown)}", where)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- provenance


@dataclass
class Provenance:
    """Where the weights come from. Every field may be absent (None); keys this version does not
    know (a benchmark's "heldout" scores, "hardware", ...) are kept in `extra`.

    Files are recorded by name and sha256 (`model_core.checkpoint.provenance.describe_file`), never
    by path; `to_json` reduces any absolute path left in a text to its file name. A field's type
    says which JSON values `from_json` accepts for it.
    """

    data: list | None = None  # file records, fine-tuning pairs {"image", "segmentation"}, or texts
    licenses: list | None = None  # of the pretraining data, one per distinct licence
    sequence: dict | None = None  # pretraining: `SequenceConfig.to_dict()`
    command: str | None = None  # the command line, paths reduced to file names
    encoder: str | dict | None = None  # fine-tuning's start: a shipped name, "scratch", a folder record
    encoder_provenance: dict | None = None  # the starting encoder's provenance
    data_fingerprint: str | None = None  # fine-tuning: of every training voxel
    mode: str | None = None  # fine-tuning's training mode: "head" or "full"
    annotation: str | None = None  # "dense" or "sparse"
    label_map: dict | None = None  # `ClassMap.to_dict()`
    finetune: dict | None = None  # the `FinetuneConfig` settings
    steps: int | None = None  # optimizer steps done
    wall_time_s: float | None = None
    seed: int | None = None
    world_size: int | None = None
    train: dict | None = None  # the training loop's `TrainConfig`
    metrics: dict | None = None  # the last loss (and Dice)
    created: str | None = None  # ISO 8601 time of the checkpoint
    cancelled: bool | None = None
    timing_s: dict | None = None  # fine-tuning: seconds per stage
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict, where: Where) -> Provenance:
        known = _provenance_kinds()
        for key, kinds in known.items():
            value = doc.get(key)
            if value is not None and not any(_is_kind(value, kind) for kind in kinds):
                names = " or ".join(_KIND_NAMES[kind] for kind in kinds)
                _fail(f"the provenance {key!r} must be {names}, got {_short(value)}", where)
        _check_sequence(doc.get("sequence") or {}, where)
        return cls(**{k: copy.deepcopy(doc.get(k)) for k in known},
                   extra={k: copy.deepcopy(v) for k, v in doc.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        recorded = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return strip_paths({**{k: v for k, v in recorded.items() if v is not None}, **self.extra})

    def sequence_window(self, default: tuple[int, int, int]) -> tuple[int, int, int]:
        """The pretraining sub-volume (crop, crop, slab), or `default` when none is recorded."""
        sequence = self.sequence or {}
        crop, slab = sequence.get("crop", default[0]), sequence.get("slab", default[2])
        return (crop, crop, slab)


@functools.cache
def _provenance_kinds() -> dict[str, tuple[type, ...]]:
    """Provenance field -> the JSON types it accepts, from its type ("str | dict | None" -> (str, dict))."""
    hints = get_type_hints(Provenance)
    return {f.name: tuple(t for t in get_args(hints[f.name]) if t is not type(None))
            for f in fields(Provenance) if f.name != "extra"}


_KIND_NAMES = {list: "a JSON list", dict: "a JSON object", str: "a text", int: "a whole number",
               float: "a number", bool: "true or false"}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int
    if kind is float:
        return _is_number(value)
    return isinstance(value, kind)


def _check_sequence(sequence: Any, where: Where) -> None:
    if not isinstance(sequence, dict) or not all(type(sequence.get(k, 1)) is int and sequence.get(k, 1) > 0
                                                 for k in ("crop", "slab")):
        _fail(f"the pretraining 'sequence' needs whole positive 'crop' and 'slab', got {sequence!r}", where)


# ----------------------------------------------------------------------------- the whole config


@dataclass
class CheckpointConfig:
    """A checkpoint's config.json, typed (see the module docstring)."""

    encoder: ViT3DConfig
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    objective: str | None = None
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    modality: str = MODALITY_ANY
    classes: list[str] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)
    architecture: str = "vit3d"

    @classmethod
    def from_json(cls, doc: dict | str | os.PathLike, where: Where | None = None) -> CheckpointConfig:
        """The config in `doc` (a config.json document, or the path of one), of any supported version.

        Raises `CheckpointError` naming `where` (default: the path, else "config") and the problem.
        """
        if isinstance(doc, (str, os.PathLike)):
            where, doc = where or doc, _read_json(Path(doc))
        where = "config" if where is None else where
        _check_header(doc, where)
        doc = migrate(doc)
        encoder = _encoder(doc, where)
        if doc.get("objective") not in OBJECTIVES:
            known = ", ".join(o for o in OBJECTIVES if o)
            _fail(f"unknown objective {doc.get('objective')!r}; known: {known}", where)
        for key, kind in (("heads", dict), ("preprocessing", dict), ("provenance", dict), ("classes", list)):
            if not isinstance(doc.get(key, kind()), kind):
                _fail(f"{key!r} must be a JSON {'object' if kind is dict else 'list'}", where)
        provenance = Provenance.from_json(doc.get("provenance", {}), where)
        classes = doc.get("classes", [])
        if not all(isinstance(c, str) for c in classes):
            _fail(f"'classes' must be a list of names, got {classes!r}", where)
        if doc.get("modality", MODALITY_ANY) not in CHECKPOINT_MODALITIES:
            _fail(f"modality {doc.get('modality')!r} is not one of {', '.join(CHECKPOINT_MODALITIES)}", where)
        return cls(
            encoder=encoder,
            heads=HeadsConfig.from_json(doc.get("heads", {}), where),
            objective=doc.get("objective"),
            preprocessing=_preprocessing(doc.get("preprocessing", {}), where),
            modality=doc.get("modality", MODALITY_ANY),
            classes=list(classes),
            provenance=provenance,
            architecture=doc["architecture"],
        )

    def to_json(self) -> dict[str, Any]:
        """The config.json document, in the current version."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "architecture": self.architecture,
            "encoder": self.encoder.to_dict(),
            "heads": self.heads.to_json(),
            "objective": self.objective,
            "preprocessing": self.preprocessing.to_dict(),
            "modality": self.modality,
            "classes": list(self.classes),
            "provenance": self.provenance.to_json(),
        }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _fail(f"is not valid JSON ({exc})", path)
    except OSError as exc:
        _fail(f"cannot be read ({exc.strerror or exc})", path)


def _check_header(doc: Any, where: Where) -> None:
    """The format, version and architecture: what says this is a napari-ar3d checkpoint it can read."""
    if not isinstance(doc, dict):
        _fail("config must be a JSON object", where)
    if doc.get("format") != FORMAT:
        _fail(f"format is {doc.get('format')!r}, expected {FORMAT!r}", where)
    version = doc.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        _fail(f"version {version!r} is not supported (this napari-ar3d reads versions 1 to {VERSION})", where)
    if doc.get("architecture") not in ARCHITECTURES:
        _fail(f"unknown architecture {doc.get('architecture')!r}; known: {', '.join(ARCHITECTURES)}", where)


def _encoder(doc: dict, where: Where) -> ViT3DConfig:
    if not isinstance(doc.get("encoder"), dict):
        _fail("config has no 'encoder' settings", where)
    try:
        return ViT3DConfig.from_dict(doc["encoder"])
    except (Ar3dInputError, TypeError, ValueError) as exc:
        _fail(f"bad encoder settings ({_first_line(exc)})", where)


def _preprocessing(doc: dict, where: Where) -> PreprocessConfig:
    intensity = doc.get("intensity")
    try:
        if intensity is not None and not isinstance(intensity, dict):
            raise Ar3dInputError(f"intensity must be a JSON object or null, got {_short(intensity)}")
        return PreprocessConfig.from_dict(doc)
    except (Ar3dInputError, TypeError, ValueError, IndexError, KeyError) as exc:
        _fail(f"bad preprocessing settings ({_first_line(exc)})", where)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
