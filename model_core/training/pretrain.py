"""A pretraining run: the settings that fix it, the dataset, the objective, and its checkpoint config.

`pretrain(data, out, settings, train_cfg)` is what `ar3d pretrain` (and `torchrun -m model_core.cli
pretrain`) runs. A run's `PretrainSettings` are fixed by its first checkpoint: `resolve_settings`
keeps a resumed run's and refuses options given again that differ.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from model_core.checkpoint.provenance import describe_source
from model_core.checkpoint.store import (
    has_checkpoint,
    load_checkpoint,
    load_into,
    make_config,
    model_record,
    read_config,
    resolve_model,
)
from model_core.data.preprocess import PreprocessConfig
from model_core.data.pretraining import SequenceConfig
from model_core.errors import Ar3dInputError
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.registry import build_objective, make_objective_dataset, objective_entry
from model_core.progress import ProgressFn, StopFn
from model_core.training.loop import TrainConfig, TrainResult, train
from model_core.training.resume import check_pretrain_resume
from model_core.vocabulary import MODALITY_ANY, PRETRAIN_WINDOW, SEQUENCE_KINDS


@dataclass
class PretrainSettings:
    """What a pretraining run is: fixed by its first checkpoint."""

    encoder: dict = field(default_factory=lambda: ViT3DConfig.preset("tiny").to_dict())  # a ViT3DConfig dict
    objective: str = "ar"  # "ar" (next-token prediction), "mae" (masked-autoencoder baseline) or "alice"
    options: dict = field(default_factory=dict)  # the objective's options (the MAE decoder's, Alice's sizes)
    sequence: dict = field(default_factory=lambda: SequenceConfig(
        kinds=SEQUENCE_KINDS, crop=PRETRAIN_WINDOW[0], slab=PRETRAIN_WINDOW[2]).to_dict())
    preprocessing: dict = field(default_factory=lambda: PreprocessConfig().to_dict())
    modality: str = MODALITY_ANY  # recorded in the model card: "CT", "MRI" or "any"

    @classmethod
    def of_checkpoint(cls, out: Path, fallback: "PretrainSettings") -> "PretrainSettings":
        """The settings of the run whose checkpoint is in `out`."""
        config = read_config(out)
        return cls(
            encoder=config["encoder"],
            objective=config["objective"],
            options=_objective_options(config),
            sequence=config["provenance"].get("sequence") or fallback.sequence,
            preprocessing=config["preprocessing"],
            modality=config.get("modality", MODALITY_ANY),
        )


def _objective_options(config: dict) -> dict:
    """The objective's constructor options recorded in a checkpoint's heads."""
    return objective_entry(config["objective"]).options(config.get("heads", {}))


def resolve_settings(out: Path, fresh: PretrainSettings, given: dict[str, bool], resume: bool) -> PretrainSettings:
    """`fresh` for a new run; the checkpoint's for a resumed one (options `given` again must agree)."""
    if out.exists() and not out.is_dir():
        raise Ar3dInputError("--out must be a folder, and this is a file", out)
    if has_checkpoint(out) and not resume:
        raise Ar3dInputError("already holds a checkpoint; pass --resume to continue it or choose another --out folder", out)
    if not (resume and has_checkpoint(out)):
        return fresh
    saved = PretrainSettings.of_checkpoint(out, fresh)
    check_pretrain_resume(out, asdict(fresh), asdict(saved), given)
    return saved


def objective_heads(objective_name: str, objective: torch.nn.Module) -> dict:
    """What the checkpoint holds beside the encoder (and how to rebuild it)."""
    return objective_entry(objective_name).heads(objective)


def init_settings(init: str | os.PathLike, fresh: PretrainSettings) -> PretrainSettings:
    """`fresh` with the encoder (and, unless given, the spacing) of the checkpoint a run starts from."""
    config = read_config(resolve_model(init))
    spacing = PreprocessConfig.from_dict(fresh.preprocessing).spacing
    preprocessing = config["preprocessing"] if spacing == PreprocessConfig().spacing else fresh.preprocessing
    return replace(fresh, encoder=config["encoder"], preprocessing=preprocessing)


def load_init(objective: torch.nn.Module, init: str | os.PathLike) -> str | dict[str, str]:
    """Copy the encoder (and a next-token head's voxel map) of checkpoint `init` into `objective`.

    Returns how provenance names it. The optimizer, schedule and any other head start afresh.
    """
    path = resolve_model(init)
    checkpoint = load_checkpoint(path)
    load_into(objective.encoder, checkpoint, prefix="encoder.")
    head = getattr(objective, "head", None)
    if head is not None and hasattr(head, "proj") and "head.proj.weight" in checkpoint.state_dict:
        load_into(head.proj, checkpoint, prefix="head.proj.")
    reset_teacher = getattr(objective, "reset_teacher", None)  # Alice: the EMA teacher starts as the student
    if callable(reset_teacher):
        reset_teacher()
    return model_record(init, path)


def data_licenses(data: Sequence[str | os.PathLike]) -> list[str]:
    """Licences of the data, as far as the manifests say: one entry per distinct licence."""
    found: list[str] = []
    for item in data:
        text = str(item)
        if text in ("phantoms", "phantom-studies") or text.startswith(("phantom:", "phantom-studies:")):
            found.append("procedural phantoms (generated by napari-ar3d)")
            continue
        path = Path(text)
        manifest = path / "manifest.json" if path.is_dir() else path
        if manifest.suffix == ".json" and manifest.is_file():
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            cases = doc.get("cases", []) if isinstance(doc, dict) else doc
            found += [str(c["license"]) for c in cases if isinstance(c, dict) and c.get("license")
                      and "pretrain" in c.get("use", ["pretrain"])]
        else:
            found.append(f"unknown ({path.name})")
    return list(dict.fromkeys(found))


def pretrain(
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: PretrainSettings,
    train_cfg: TrainConfig,
    *,
    resume: bool = False,
    init: str | os.PathLike | None = None,
    n_phantoms: int = 8,
    cache_dir: str | os.PathLike | None = None,
    provenance: dict | None = None,
    data_progress: ProgressFn = None,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> TrainResult:
    """Pretrain an encoder with `settings.objective` on `data` and checkpoint it in `out`.

    data: image files, folders, JSON manifests, or "phantoms" / "phantom:ct" / "phantom:mri".
    provenance: extra entries for config.json's provenance (e.g. the command line).
    data_progress: reports while the scans are preprocessed; progress / should_stop: of training.
    resume: continue the run whose checkpoint is in `out` (see `resolve_settings`).
    init: a checkpoint (folder or shipped name) whose encoder a new run starts from (`init_settings` gives
        the matching settings); ignored when resuming, whose weights come from `out`.
    """
    dataset = make_objective_dataset(
        settings.objective, data, SequenceConfig.from_dict(settings.sequence),
        PreprocessConfig.from_dict(settings.preprocessing),
        seed=train_cfg.seed, cache_dir=cache_dir, n_phantoms=n_phantoms, progress=data_progress,
    )
    torch.manual_seed(train_cfg.seed)
    encoder = ViT3D(ViT3DConfig.from_dict(settings.encoder))
    prepare = objective_entry(settings.objective).prepare  # e.g. HLIP's tokenizer, from the dataset's reports
    options = settings.options if prepare is None else prepare(
        dataset, settings.options, Path(out), resume and has_checkpoint(out))
    objective = build_objective(settings.objective, encoder, steps=train_cfg.steps, **options)
    started_from = load_init(objective, init) if init is not None and not (resume and has_checkpoint(out)) else None
    config = make_config(
        settings.encoder,
        objective=settings.objective,
        heads=objective_heads(settings.objective, objective),
        preprocessing=settings.preprocessing,
        modality=settings.modality,
        provenance={
            "data": [describe_source(d) for d in data],
            "licenses": data_licenses(data),
            "sequence": settings.sequence,
            **({"init": started_from} if started_from else {}),
            **(provenance or {}),
        },
    )
    return train(objective, dataset, train_cfg, out, checkpoint_config=config, resume=resume,
                 progress=progress, should_stop=should_stop)

