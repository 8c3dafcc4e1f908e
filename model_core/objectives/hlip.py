"""HLIP: language-image pretraining on studies (seed: "Towards Scalable Language-Image Pre-training
for 3D Medical Imaging"; official code Zch0414/hlip).

- Image tower: the `ViT3D` encoder run with HLIP's per-block attention scopes
  (`model_core.models.hlip`: slice / scan / study, the class token copied into each partition and
  averaged back, a fixed sin-cos scan index); the final class token, linearly projected.
- Text tower: BERT-style (`model_core.models.text.TextTower`), [CLS] pooling, linear projection.
- Loss: OpenCLIP's `ClipLoss` (symmetric InfoNCE; the learnable logit scale starts at 1/0.07 and
  is clamped at 100 after every step) or `SigLipLoss` (scale 10, bias -10 to start). Under DDP the
  loss gathers the features of every rank, as OpenCLIP does.
- Reports: sentences shuffled at every step behind a fixed prefix (`model_core.data.studies`).

The checkpoint holds both towers (model.safetensors: "encoder.*", "image_proj.*", "text.*",
"logit_scale"), the text tower's architecture and the options in config.json ("heads": {"hlip":
...}) and the tokenizer as `tokenizer.json` beside them. Training needs the `[vlp]` extra and
`open-clip-torch` (see `openclip_losses`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from model_core.data.preprocess import PreprocessConfig
from model_core.errors import Ar3dEnvironmentError, Ar3dInputError, CheckpointError, TrainingError
from model_core.models.hlip import block_scopes, study_features
from model_core.models.text import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_VOCAB,
    TOKENIZER_FILE,
    ReportTokenizer,
    TextTower,
    load_pretrained_tokenizer,
    pretrained_text_config,
    small_text_config,
    train_tokenizer,
)
from model_core.models.vit import ViT3D
from model_core.progress import ProgressFn

LOSSES = ("clip", "siglip")
HEAD = "hlip"  # the checkpoint's head entry
HLIP_WINDOW = (96, 96, 64)  # default window of every scan (crop, crop, slab)
MAX_LOGIT_SCALE = 100.0
RANDOM_TEXT = "random init; WordPiece tokenizer trained on the reports"
TOKENIZER_WAIT_S = 3600  # how long DDP ranks other than 0 wait for rank 0's tokenizer
PROCESS_START = time.time()  # (about) when this process started: a tokenizer.json older than it is stale


@lru_cache(maxsize=1)
def openclip_losses() -> Any:
    """OpenCLIP's loss module (`open_clip/loss.py`: ClipLoss, SigLipLoss), loaded on its own.

    `import open_clip` runs the package's `__init__`, which imports torchvision and timm for image
    models we do not use (and fails where the torchvision build does not match torch, as with a
    CPU-only torch and PyPI's torchvision). The loss module needs torch alone, so it is executed
    from the installed package's file; `pip install --no-deps open-clip-torch` is enough.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise Ar3dEnvironmentError("HLIP's loss needs OpenCLIP: pip install --no-deps open-clip-torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    loader_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    if loader_spec is None or loader_spec.loader is None or not path.is_file():
        raise Ar3dEnvironmentError(f"OpenCLIP is installed without its loss module ({path})")
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


class HLIPObjective(nn.Module):
    """Contrastive study-report pretraining; see the module docstring.

    text: the text tower's transformers config dict; text_init: a local pretrained model folder
    its weights start from (None: random); scopes: a layout or pattern for `block_scopes`.
    """

    def __init__(self, encoder: ViT3D, *, text: dict, scopes: str | Sequence[str] = "two-level",
                 embed_dim: int = 512, loss: str = "clip", max_length: int = DEFAULT_MAX_LENGTH,
                 text_source: str = RANDOM_TEXT, text_init: str | os.PathLike | None = None):
        super().__init__()
        if loss not in LOSSES:
            raise Ar3dInputError(f"unknown contrastive loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.encoder = encoder
        self.scopes = block_scopes(scopes, encoder.cfg.depth)
        self.loss_name, self.max_length, self.text_source = loss, int(max_length), text_source
        self.image_proj = nn.Linear(encoder.cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=encoder.cfg.width**-0.5)
        self.text = TextTower(text, embed_dim, pretrained=text_init)
        start_scale, start_bias = (math.log(1 / 0.07), None) if loss == "clip" else (math.log(10.0), -10.0)
        self.logit_scale = nn.Parameter(torch.tensor(start_scale))
        self.logit_bias = nn.Parameter(torch.tensor(start_bias)) if start_bias is not None else None

    @property
    def embed_dim(self) -> int:
        return self.image_proj.out_features

    def study_tokens(self, volumes: Tensor) -> Tensor:
        """(B, S, X, Y, Z) -> the encoder's tokens (B, 1 + S*n, C) under the HLIP scopes."""
        return study_features(self.encoder, volumes, self.scopes)[0]

    def image_embedding(self, volumes: Tensor) -> Tensor:
        """(B, S, X, Y, Z) -> unit-norm study embeddings (B, D) from the class token."""
        return F.normalize(self.image_proj(self.study_tokens(volumes)[:, 0]), dim=-1)

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) -> unit-norm report embeddings (B, D)."""
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def forward(self, volumes: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        image = self.image_embedding(volumes)  # (B, D)
        text = self.text_embedding(input_ids, attention_mask)  # (B, D)
        loss = _loss(self.loss_name)(image.float(), text.float(), self.logit_scale.exp(),
                                     *(() if self.logit_bias is None else (self.logit_bias,)))
        return {"loss": loss, "logit_scale": self.logit_scale.exp().detach()}

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the logit scale at 100 (OpenCLIP's training does it after every step)."""
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def heads(self) -> dict:
        """The checkpoint's "heads" entry: what rebuilds this objective (not the weights)."""
        return {HEAD: {"scopes": list(self.scopes), "embed_dim": self.embed_dim, "loss": self.loss_name,
                       "max_length": self.max_length, "text": self.text.config_dict, "text_source": self.text_source,
                       "tokenizer": TOKENIZER_FILE}}


def _loss(name: str) -> nn.Module:
    """OpenCLIP's loss for this process (every rank's features when DDP runs)."""
    module = openclip_losses()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if name == "siglip":
        return module.SigLipLoss(rank=rank, world_size=world)
    # Under DDP: OpenCLIP's recommended pair (each rank's rows against every rank's features, gradients through
    # the gather), which DDP's gradient averaging makes the loss of the whole global batch.
    return module.ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world)


# ---------------------------------------------------------------- the registry's hooks


def hlip_options(heads: dict) -> dict:
    """The constructor options recorded in a checkpoint's heads."""
    doc = dict(heads.get(HEAD, {}))
    doc.pop("tokenizer", None)
    return doc


def hlip_dataset(data, seq_cfg, pre_cfg: PreprocessConfig, seed: int = 0, cache_dir=None, *,
                 n_phantoms: int = 8, progress: ProgressFn = None):
    """The studies of `data`: windows of (crop, crop, slab), `seq_cfg.n_sub` scans per sample."""
    from model_core.data.studies import make_study_dataset

    window = (seq_cfg.crop, seq_cfg.crop, seq_cfg.slab)
    return make_study_dataset(data, pre_cfg, window, seq_cfg.n_sub, seed, n_phantoms=n_phantoms, progress=progress)


def prepare_hlip(dataset, options: dict, out: Path, resumed: bool) -> dict:
    """Settle the tokenizer before the objective is built; returns the constructor options.

    A resumed run reads `out`/tokenizer.json; a new one takes the tokenizer of `text_model` (a local
    pretrained folder, whose weights the text tower then starts from) or trains a WordPiece
    tokenizer on the dataset's reports, and writes it into `out` (rank 0). The dataset gets it too.
    """
    options = dict(options)
    text_model = options.pop("text_model", None)
    vocab = int(options.pop("vocab_size", DEFAULT_VOCAB))
    text_overrides = options.pop("text_overrides", {})
    max_length = int(options.get("max_length", DEFAULT_MAX_LENGTH))
    if resumed:
        if "text" not in options:
            raise CheckpointError("has no text tower config (heads.hlip.text) to resume", out)
        tokenizer = ReportTokenizer.load(out / TOKENIZER_FILE, max_length)
    elif text_model:
        tokenizer = load_pretrained_tokenizer(text_model, max_length)
        options.update(text={**pretrained_text_config(text_model), **text_overrides}, text_init=str(text_model),
                       text_source=f"pretrained: {Path(text_model).name}")
    else:
        tokenizer = shared_tokenizer(out / TOKENIZER_FILE, lambda: train_tokenizer(dataset.corpus(), vocab, max_length),
                                     max_length)
        options["text"] = small_text_config(tokenizer.vocab_size, max_length, **text_overrides)
    if not resumed and _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out / TOKENIZER_FILE)
    dataset.set_tokenizer(tokenizer)
    return options


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def shared_tokenizer(path: Path, train: Callable[[], ReportTokenizer], max_length: int) -> ReportTokenizer:
    """The tokenizer `train` makes, on rank 0; under DDP the other ranks read rank 0's from `path`.

    WordPiece training is not reproducible across processes (ties between equally frequent pairs
    fall by hash order), so only rank 0 trains; the others wait for a tokenizer.json written after
    their own start (an older one is a previous run's).
    """
    if _rank() == 0:
        return train()
    deadline = time.monotonic() + TOKENIZER_WAIT_S
    while not (path.is_file() and path.stat().st_mtime >= PROCESS_START - 1.0):
        if time.monotonic() > deadline:
            raise TrainingError(f"rank 0 wrote no tokenizer in {TOKENIZER_WAIT_S} s; see its error", path)
        time.sleep(0.5)
    return ReportTokenizer.load(path, max_length)
