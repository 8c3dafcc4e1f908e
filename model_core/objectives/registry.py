"""The pretraining objectives by name: each one's class, dataset, checkpoint heads and default window.

`ar3d pretrain --objective NAME` and `model_core.training.pretrain` look objectives up here, so
adding one is one `Objective` entry in OBJECTIVES:
- "ar": autoregressive next-token prediction (AR-SSL4M) on sequences of sub-volumes;
- "mae": the masked-autoencoder baseline on the same sequences;
- "alice": Alice on cross-patient views (`model_core.objectives.alice`, `model_core.data.anatomy`);
- "hlip": HLIP language-image pretraining on studies and reports (`model_core.objectives.hlip`,
  `model_core.data.studies`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from model_core.data.preprocess import PreprocessConfig
from model_core.data.pretraining import SequenceConfig, make_pretrain_dataset
from model_core.errors import Ar3dInputError
from model_core.models.vit import ViT3D
from model_core.objectives.alice import AliceObjective, AliceOptions
from model_core.objectives.autoregressive import AutoregressiveObjective, MaskedAutoencoderObjective
from model_core.objectives.hlip import HLIP_WINDOW, HLIPObjective, hlip_dataset, hlip_options, prepare_hlip
from model_core.progress import ProgressFn
from model_core.vocabulary import PRETRAIN_WINDOW

ALICE_WINDOW = (64, 64, 64)  # the query and anchor crops of the official Alice code


def _ar_heads(objective: AutoregressiveObjective) -> dict:
    head = {"type": "linear", "out_features": objective.head.proj.out_features}
    return {"next_token": {**head, "stats_weight": objective.stats_weight} if objective.stats_weight else head}


def _ar_options(heads: dict) -> dict:
    weight = heads.get("next_token", {}).get("stats_weight", 0.0)
    return {"stats_weight": weight} if weight else {}


def _mae_heads(objective: MaskedAutoencoderObjective) -> dict:
    return {"mae_decoder": {
        "mask_ratio": objective.mask_ratio,
        "decoder_width": objective.decoder_embed.out_features,
        "decoder_depth": len(objective.decoder_blocks),
        "decoder_heads": objective.decoder_blocks[0].attn.heads,
    }}


def _alice_dataset(data, seq_cfg: SequenceConfig, pre_cfg: PreprocessConfig, seed: int = 0, cache_dir=None, *,
                   n_phantoms: int = 8, progress: ProgressFn = None) -> Dataset:
    from model_core.data.anatomy import make_views_dataset

    window = (seq_cfg.crop, seq_cfg.crop, seq_cfg.slab)
    return make_views_dataset(data, pre_cfg, window, seed, cache_dir, n_phantoms=n_phantoms, progress=progress)


@dataclass(frozen=True)
class Objective:
    """One pretraining objective."""

    cls: type[nn.Module]  # built as cls(encoder, **options) (+ schedule_steps when `scheduled`)
    heads: Callable[[nn.Module], dict]  # the checkpoint's "heads": what the weights hold beside the encoder
    options: Callable[[dict], dict]  # the constructor options, from a checkpoint's "heads"
    dataset: Callable[..., Dataset]  # (data, SequenceConfig, PreprocessConfig, seed, cache_dir, *, n_phantoms,
    #                                     progress): what it trains on
    window: tuple[int, int, int]  # default (crop, crop, slab) of a sample's sub-volume or view
    scheduled: bool = False  # the objective takes `schedule_steps` (the run's length) for its own schedules
    # (dataset, options, out, resumed) -> the constructor options, once the dataset is built (HLIP: its tokenizer)
    prepare: Callable[[Dataset, dict, Path, bool], dict] | None = None


OBJECTIVES: dict[str, Objective] = {
    "ar": Objective(AutoregressiveObjective, _ar_heads, _ar_options, make_pretrain_dataset, PRETRAIN_WINDOW),
    "mae": Objective(MaskedAutoencoderObjective, _mae_heads, lambda heads: dict(heads.get("mae_decoder", {})),
                     make_pretrain_dataset, PRETRAIN_WINDOW),
    "alice": Objective(AliceObjective, lambda objective: {"alice": objective.options.to_dict()},
                       lambda heads: AliceOptions.from_dict(heads.get("alice", {})).to_dict(),
                       _alice_dataset, ALICE_WINDOW, scheduled=True),
    "hlip": Objective(HLIPObjective, lambda objective: objective.heads(), hlip_options, hlip_dataset, HLIP_WINDOW,
                      prepare=prepare_hlip),
}


def objective_entry(name: str) -> Objective:
    """The registry entry of `name`; an unknown name raises Ar3dInputError listing the known ones."""
    if name not in OBJECTIVES:
        raise Ar3dInputError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(name: str, encoder: ViT3D, *, steps: int | None = None, **options) -> nn.Module:
    """The pretraining objective `name` on `encoder`; `options` go to its constructor (e.g. mask_ratio).

    steps: the run's length, for objectives with their own schedules (Alice's EMA momentum and
    teacher temperature); ignored by the others.
    """
    entry = objective_entry(name)
    if entry.scheduled and steps is not None:
        options = {**options, "schedule_steps": steps}
    return entry.cls(encoder, **options)


def make_objective_dataset(
    name: str,
    data: Sequence[str | os.PathLike],
    seq_cfg: SequenceConfig,
    pre_cfg: PreprocessConfig,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    n_phantoms: int = 8,
    progress: ProgressFn = None,
) -> Dataset:
    """The pretraining dataset that objective `name` trains on."""
    return objective_entry(name).dataset(data, seq_cfg, pre_cfg, seed, cache_dir, n_phantoms=n_phantoms,
                                         progress=progress)
