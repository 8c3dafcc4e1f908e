"""What a checkpoint is, in words: the rows of `ar3d info` and the card of the widgets' model picker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_core.checkpoint.config import CheckpointConfig
from model_core.checkpoint.store import TRAIN_STATE_DIR, WEIGHTS_FILE, count_values

ConfigLike = CheckpointConfig | dict  # typed, or config.json as JSON (`read_config`)


def _typed(config: ConfigLike) -> CheckpointConfig:
    return config if isinstance(config, CheckpointConfig) else CheckpointConfig.from_json(config)


def summary(config: ConfigLike) -> str:
    """One line: architecture, width, depth, objective, steps."""
    config = _typed(config)
    steps = config.provenance.steps
    return (f"{config.architecture} width {config.encoder.width} depth {config.encoder.depth}, "
            f"objective {config.objective}{'' if steps is None else f', {steps} steps'}")


def kind(config: ConfigLike) -> str:
    """What the model does: a segmentation model, an autoregressive encoder, another encoder."""
    config = _typed(config)
    if config.heads.segmentation is not None:
        return f"segmentation model ({config.provenance.mode or 'fine-tuned'} fine-tuning)"
    if config.heads.next_token is not None:
        return "autoregressive encoder (explain; fine-tune it to segment)"
    return f"encoder ({config.objective or 'no head'}; fine-tune it to segment)"


def card_rows(path: Path, config: ConfigLike) -> list[tuple[str, str]]:
    """The model card of the checkpoint in `path` as (field, text) rows."""
    config = _typed(config)
    prov = config.provenance.to_json()
    prov.pop("train", None)
    rows = [
        ("model", str(path)),
        ("what", kind(config)),
        ("architecture", summary(config)),
        ("encoder", ", ".join(f"{k}={v}" for k, v in config.encoder.to_dict().items())),
        ("parameters", f"{count_values(path) / 1e6:.2f} M (all tensors in {WEIGHTS_FILE})"),
        ("heads", ", ".join(config.heads.names()) or "none"),
        *_decoder_rows(config),
        ("modality", config.modality),
        ("preprocessing", json.dumps(config.preprocessing.to_dict())),
        ("classes", ", ".join(f"{k}={name}" for k, name in enumerate(config.classes, 1)) or "none (an encoder)"),
        ("resumable", "yes" if (path / TRAIN_STATE_DIR / "state.json").is_file() else "no"),
    ]
    for key, value in prov.items():
        rows.append((key, ", ".join(map(_data_name, value)) if isinstance(value, list) else
                     json.dumps(value) if isinstance(value, dict) else str(value)))
    return rows


def _decoder_rows(config: CheckpointConfig) -> list[tuple[str, str]]:
    """The decoder and window of a segmentation model (none for an encoder)."""
    head = config.heads.segmentation
    if head is None:
        return []
    decoder = dict(head.decoder)
    name = decoder.pop("kind")
    options = ", ".join(f"{k}={v}" for k, v in decoder.items())
    return [("decoder", f"{name} ({options}), window {'x'.join(map(str, head.window))} voxels")]


def picker_lines(config: ConfigLike) -> list[str]:
    """A few lines for a model picker: what it does, classes, spacing, modality, encoder, data, steps, metrics."""
    config = _typed(config)
    provenance, encoder = config.provenance, config.encoder
    data = provenance.data or []
    lines = [
        kind(config),
        f"classes: {', '.join(config.classes) or '—'}",
        f"spacing: {' × '.join(f'{s:g}' for s in config.preprocessing.spacing)} mm",
        f"modality: {config.modality}",
        f"encoder: ViT, {encoder.depth} blocks, width {encoder.width}, patch {encoder.patch_size}³",
        f"training data: {'; '.join(_shorten(_data_name(d)) for d in data[:3]) or 'not recorded'}"
        + (f" (+{len(data) - 3} more)" if len(data) > 3 else ""),
        f"steps: {'not recorded' if provenance.steps is None else provenance.steps}",
    ]
    metrics = provenance.metrics or {}
    if metrics:
        lines.append("final " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float))))
    return lines


def _data_name(item: Any) -> str:
    """A provenance data entry: a file record {"name", "sha256"}, a fine-tuning pair {"image", "segmentation"}
    of them, or a text."""
    if isinstance(item, dict) and isinstance(item.get("image"), dict) and isinstance(item.get("segmentation"), dict):
        return f"{_data_name(item['image'])} + {_data_name(item['segmentation'])}"
    return str(item.get("name", item)) if isinstance(item, dict) else str(item)


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
