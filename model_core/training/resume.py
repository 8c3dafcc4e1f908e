"""Whether an interrupted run may be resumed with the settings it is given now.

A resumed run must train the same model on the same data with the same options; only where the
run happens (the device) and how often it checkpoints may change. Both checks name what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from model_core.checkpoint.config import CheckpointConfig
from model_core.checkpoint.store import CONFIG_FILE, has_checkpoint, load_config
from model_core.errors import Ar3dInputError

FINETUNE_RESUME_FREE = ("device", "ckpt_every")  # FinetuneConfig fields a resumed fine-tune may change
PRETRAIN_SETTINGS = ("encoder", "objective", "sequence", "preprocessing", "modality")  # fixed for a pretraining run


def work_folder(out: str | os.PathLike) -> Path:
    """The hidden folder beside `out` where `finetune` trains and checkpoints until the model is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.finetuning"


def check_work_folder(work: Path, resume: bool) -> None:
    """Refuse to start afresh over an interrupted fine-tune (it would be lost)."""
    if has_checkpoint(work) and not resume:
        steps = load_config(work).provenance.steps
        steps = "?" if steps is None else steps
        raise Ar3dInputError(
            f"holds a fine-tuning run interrupted at step {steps}; continue it with --resume (resume=True) "
            "and the same options, or delete that folder", work)


def finetune_settings(config: CheckpointConfig) -> dict:
    """What a resumed fine-tune must share with the interrupted one, by name: model, classes, data, options."""
    prov = config.provenance
    settings = {
        "encoder": config.encoder.to_dict(),
        "decoder": config.heads.to_json(),
        "preprocessing": config.preprocessing.to_dict(),
        "classes": config.classes,
        "starting model": prov.encoder,
        "training data": _names(prov.data),  # its contents: the fingerprint of every voxel
        "training data contents": prov.data_fingerprint,
        **{k: v for k, v in (prov.finetune or {}).items() if k not in FINETUNE_RESUME_FREE},
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as read back from config.json


def _names(value: Any) -> Any:
    """A provenance data entry (or a list of them) without its sha256: file records by their names."""
    if isinstance(value, list):
        return [_names(v) for v in value]
    if isinstance(value, dict):
        return value.get("name") if "name" in value else {k: _names(v) for k, v in value.items()}
    return value


def check_finetune_resume(work: Path, config: CheckpointConfig) -> None:
    """Refuse to resume the fine-tune in `work` with other settings than it started with."""
    saved, ours = finetune_settings(load_config(work)), finetune_settings(config)
    changed = [name for name in ours if saved.get(name) != ours[name]]
    if changed:
        raise Ar3dInputError(
            f"the {', '.join(changed)} of this run differ from the interrupted run's; resume with the same options "
            "and data, or delete that folder to start again", work / CONFIG_FILE)


def check_pretrain_resume(out: Path, fresh: dict, saved: dict, given: dict) -> None:
    """Refuse settings given again for a resumed pretraining run that differ from its checkpoint's.

    fresh: the settings the options describe; saved: the checkpoint's; given: which settings the user
    passed explicitly (a setting left out keeps the checkpoint's).
    """
    changed = [key for key in PRETRAIN_SETTINGS if given.get(key) and fresh[key] != saved[key]]
    if changed:
        raise Ar3dInputError(
            f"the {' and '.join(changed)} settings differ from the checkpoint's; a resumed run keeps its "
            "settings (drop those options or choose another --out folder)", out / CONFIG_FILE)
