"""Zero-shot findings on a study: "is there X?" for a vision-language (HLIP) model.

For each prompt "X" the model reads the pair ("<prefix>X.", "<prefix>no X."), the prefix being
the one it was trained with ("This CT study shows: "); the probability of X is the softmax over
the pair of the logit-scaled similarities with the study embedding (HLIP's zero-shot protocol).

The similarity map of a prompt (`FindingsResult.maps`) says where the answer comes from: each
patch token of the *first* scan, through the image projection, scored as logit_scale * (cos(token,
"X") - cos(token, "no X")), constant over its patch, on the first scan's own grid (outside the
model's window: 0).

Every scan of the study is preprocessed on its own (scans need not be co-registered) and cut to
the model's window around its centre, as in training.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model_core.checkpoint.store import load_checkpoint, load_config, load_into, read_config, resolve_model
from model_core.data.preprocess import PreprocessConfig
from model_core.data.reports import prompt_pair
from model_core.data.studies import PreparedScan, cut_window, prepare_scans, window_start
from model_core.device import resolve_device
from model_core.errors import Ar3dInputError, CheckpointError
from model_core.io.volume import Volume, write_volume
from model_core.models.text import TOKENIZER_FILE, ReportTokenizer
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.hlip import HEAD, HLIP_WINDOW, HLIPObjective, hlip_options


@dataclass
class VisionLanguageModel:
    """A loaded HLIP checkpoint: both towers, the tokenizer and the input convention."""

    objective: HLIPObjective
    tokenizer: ReportTokenizer
    preprocessing: PreprocessConfig
    window: tuple[int, int, int]
    path: Path


@dataclass
class FindingsResult:
    prompts: list[str]
    probabilities: list[float]  # of "X" against "no X", one per prompt
    maps: list[np.ndarray]  # per prompt, on the first scan's grid (I, J, K) float32
    first_scan: Volume  # whose geometry the maps have


def load_vision_language_model(name_or_dir: str | os.PathLike) -> VisionLanguageModel:
    """Load a checkpoint with a text tower; any other raises `CheckpointError` saying what it is."""
    path = resolve_model(name_or_dir)
    config = read_config(path)
    heads = config.get("heads", {})
    if HEAD not in heads:
        raise CheckpointError(
            f"has no text tower (a model pretrained with objective {config.get('objective')!r}); "
            "findings need a vision-language model (ar3d pretrain --objective hlip)", path)
    options = hlip_options(heads)
    tokenizer = ReportTokenizer.load(path / heads[HEAD].get("tokenizer", TOKENIZER_FILE), options.get("max_length", 128))
    objective = HLIPObjective(ViT3D(ViT3DConfig.from_dict(config["encoder"])), **options)
    load_into(objective, load_checkpoint(path))
    window = load_config(path).provenance.sequence_window(HLIP_WINDOW)
    return VisionLanguageModel(objective.eval(), tokenizer, PreprocessConfig.from_dict(config["preprocessing"]),
                               tuple(int(w) for w in window), path)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts stripped; none given, or an empty one, raises `Ar3dInputError`."""
    if not prompts:
        raise Ar3dInputError("no prompt: give at least one finding to look for, e.g. --prompt 'enlarged spleen'")
    cleaned = [p.strip().rstrip(".").strip() for p in prompts]
    if not all(cleaned):
        raise Ar3dInputError("empty prompt: every --prompt must name a finding, e.g. 'liver lesion'")
    return cleaned


@torch.no_grad()
def find_findings(model: VisionLanguageModel, scans: Sequence[Volume], prompts: Sequence[str], *,
                  modality: str | None = None, device: str = "auto") -> FindingsResult:
    """The probability of each prompt's finding in the study made of `scans`, and its map on the first scan."""
    prompts = check_prompts(prompts)
    if not scans:
        raise Ar3dInputError("no scans: give the scans of one study (any number, any contrasts)")
    most = model.objective.encoder.cfg.max_subvolumes
    if len(scans) > most:
        raise Ar3dInputError(f"{len(scans)} scans; this model reads at most {most} scans of one study")
    prepared = prepare_scans(scans, model.preprocessing, modality)
    dev = resolve_device(device)
    objective = model.objective.to(dev)
    volumes = torch.from_numpy(np.stack([cut_window(p.array, model.window) for p in prepared]))[None].to(dev)
    tokens = objective.study_tokens(volumes)[0]  # (1 + S*n, C)
    study = F.normalize(objective.image_proj(tokens[:1]), dim=-1)  # (1, D)
    words = {"ct": "CT", "mri": "MRI"}.get(prepared[0].preprocessed.modality, "")
    pairs = [text for prompt in prompts for text in prompt_pair(prompt, words)]  # X, no X, X, no X, ...
    ids, mask = model.tokenizer(pairs)
    text = objective.text_embedding(ids.to(dev), mask.to(dev)).reshape(len(prompts), 2, -1)  # (P, 2, D)
    scale = objective.logit_scale.exp()
    probabilities = (scale * text @ study[0]).softmax(dim=-1)[:, 0]  # (P,)
    grid = objective.encoder.grid(model.window)
    patches = F.normalize(objective.image_proj(tokens[1:1 + int(np.prod(grid))]), dim=-1)  # (n, D): scan 0
    contrast = scale * (patches @ (text[:, 0] - text[:, 1]).T)  # (n, P)
    maps = [_to_first_scan(contrast[:, k].reshape(grid).float().cpu().numpy(), prepared[0], model)
            for k in range(len(prompts))]
    return FindingsResult(prompts, probabilities.float().cpu().tolist(), maps, scans[0])


def _to_first_scan(tokens: np.ndarray, scan: PreparedScan, model: VisionLanguageModel) -> np.ndarray:
    """A (gx, gy, gz) token map -> the first scan's own grid: each patch's value over its voxels."""
    p = model.objective.encoder.cfg.patch_size
    window_map = np.kron(tokens, np.ones((p, p, p), np.float32))  # (X, Y, Z) of the window
    full = np.zeros(scan.array.shape, np.float32)
    start = window_start(scan.array.shape, model.window)
    src = tuple(slice(max(0, -s), min(w, n - s)) for s, w, n in zip(start, model.window, full.shape))
    dst = tuple(slice(max(0, s), min(n, s + w)) for s, w, n in zip(start, model.window, full.shape))
    full[dst] = window_map[src]
    return scan.preprocessed.to_source(full, order=1).astype(np.float32)


def map_file_name(prompt: str) -> str:
    """The file name of a prompt's map: findings_<words>.nii.gz."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"
    return f"findings_{slug}.nii.gz"


def write_maps(result: FindingsResult, out: str | os.PathLike) -> list[Path]:
    """Write each prompt's map into folder `out` in the first scan's geometry (created if missing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Ar3dInputError("--out must be a folder, and this is a file", out)
    out.mkdir(parents=True, exist_ok=True)
    names = [map_file_name(p) for p in result.prompts]
    if len(set(names)) != len(names):
        raise Ar3dInputError("two prompts give the same map file name; make them differ in letters or digits")
    like = result.first_scan if str(result.first_scan.path or "").endswith((".nii", ".nii.gz")) else None
    return [write_volume(out / name, m, result.first_scan.affine, kind="float", like=like)
            for name, m in zip(names, result.maps)]
