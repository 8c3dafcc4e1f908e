"""Checkpoints: a folder with `config.json` and `model.safetensors`, never a pickle.

Layout of a checkpoint folder:

    config.json            format, version, architecture, encoder config, heads, objective,
                           preprocessing, modality, class names, provenance (typed and
                           versioned in `model_core.checkpoint.config`)
    model.safetensors      the weights (for a pretraining run: the objective's encoder + head)
    train_state/           optional, for an exact resume:
        optimizer.safetensors  optimizer state tensors, flattened to `state.<param>.<key>`
        rng.safetensors        torch CPU / CUDA RNG states as uint8 tensors, one per rank
        state.json             step, scheduler, optimizer scalars and groups, numpy and python RNG

`save_checkpoint` is atomic: it writes a hidden sibling folder, fsyncs it, then swaps it into
place, so a kill at any moment leaves the last complete checkpoint. Files in the folder that
are not part of the checkpoint (a loss log) are carried over as hard links.

`load_checkpoint` reads safetensors only. Pickle files (`.pt`, `.pth`, ...; torch's zip
format) are refused before anything is unpickled: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model_core.checkpoint.config import (
    CHECKPOINT_MODALITIES,
    CONFIG_FILE,
    FORMAT,
    VERSION,
    CheckpointConfig,
)
from model_core.checkpoint.provenance import describe_weights
from model_core.errors import Ar3dInputError, CheckpointError
from model_core.io.volume import write_error
from model_core.models.vit import ViT3D
from model_core.vocabulary import DEFAULT_ENCODER, ENCODER_ENV, MODALITY_ANY

WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_DIR = "train_state"
CHECKPOINT_ENTRIES = (CONFIG_FILE, WEIGHTS_FILE, TRAIN_STATE_DIR)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "shipped"

_NEVER_UNPICKLE = (
    "napari-ar3d never unpickles checkpoints (a pickle can run arbitrary code); it needs a folder "
    f"with {CONFIG_FILE} and {WEIGHTS_FILE}"
)


@dataclass
class Checkpoint:
    """A loaded checkpoint: its config.json (as JSON, in the current version), its tensors (on CPU) and its folder."""

    config: dict
    state_dict: dict[str, torch.Tensor]
    path: Path

    @property
    def typed_config(self) -> CheckpointConfig:
        """`config`, typed (read anew from `config` at every call)."""
        return CheckpointConfig.from_json(self.config, self.path / CONFIG_FILE)


@dataclass
class TrainState:
    """What an exact resume needs besides the weights; JSON and tensors only."""

    step: int
    optimizer: dict  # torch optimizer state_dict
    scheduler: dict  # torch LR scheduler state_dict
    rng: list[dict] = field(default_factory=list)  # one `capture_rng()` per rank
    extra: dict = field(default_factory=dict)  # JSON-able, e.g. cumulative wall time


def make_config(
    encoder: dict,
    *,
    objective: str | None = None,
    heads: dict | None = None,
    preprocessing: dict | None = None,
    modality: str = MODALITY_ANY,
    classes: list[str] | tuple[str, ...] = (),
    provenance: dict | None = None,
) -> dict:
    """A config.json document in the current version, from its parts as JSON (checked by `CheckpointConfig`)."""
    if modality not in CHECKPOINT_MODALITIES:
        raise Ar3dInputError(f"modality {modality!r} is not one of {', '.join(CHECKPOINT_MODALITIES)}")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": "vit3d",
        "encoder": dict(encoder),
        "heads": dict(heads or {}),
        "objective": objective,
        "preprocessing": dict(preprocessing or {}),
        "modality": modality,
        "classes": list(classes),
        "provenance": dict(provenance or {}),
    }
    return CheckpointConfig.from_json(doc).to_json()


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a checkpoint (or an interrupted save left one aside)."""
    path = Path(directory)
    return (path / WEIGHTS_FILE).is_file() or (path / CONFIG_FILE).is_file() or _aside(path).is_dir()


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: CheckpointConfig | dict,
    train_state: TrainState | None = None,
) -> Path:
    """Write a checkpoint folder atomically and return its path.

    config: typed, or a config.json document (of any supported version; written in the current one).

    The previous checkpoint in `directory` stays complete and loadable until the new one is in
    place; a failure while writing leaves no temporary folder behind, and a failed write (a full
    disk) raises `Ar3dInputError` naming the folder and the reason.
    """
    if not isinstance(config, CheckpointConfig):
        config = CheckpointConfig.from_json(config, directory)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = _tmp(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _write_json(tmp / CONFIG_FILE, config.to_json())
        save_file(_cpu_tensors(state_dict), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)  # safetensors makes it 0600
        _fsync(tmp / WEIGHTS_FILE)
        if train_state is not None:
            _write_train_state(tmp / TRAIN_STATE_DIR, train_state)
        if target.is_dir():
            _carry_over(target, tmp)
        _fsync(tmp)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        nbytes = sum(t.nbytes for t in state_dict.values())
        raise write_error("could not write the checkpoint", exc, target, target.parent, nbytes) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = _aside(target)
    for attempt in range(3):
        if target.exists():
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
            break
        except OSError:
            # A reader's `_recover` may put the old checkpoint back between our two renames: set it aside again.
            if attempt == 2 or not target.exists():
                raise
    _fsync(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def _tmp(target: Path) -> Path:
    return target.parent / f".{target.name}.saving"


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def _recover(target: Path) -> None:
    """Put back the previous checkpoint if a save was killed between its two renames; remove what is
    left of it if a save was killed while removing it (the next save could not set `target` aside)."""
    aside = _aside(target)
    if not target.exists() and aside.is_dir():
        os.rename(aside, target)
    elif target.exists() and aside.exists():
        shutil.rmtree(aside)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) the files of `old` that are not checkpoint files into `new`."""
    for entry in old.iterdir():
        if entry.name in CHECKPOINT_ENTRIES:
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; shared storage is cloned (safetensors refuses it)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.nbytes and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint folder (or its `model.safetensors`) without ever unpickling.

    Raises `CheckpointError` for pickles, torch zip files, folders without
    `model.safetensors`, a bad `config.json` and unreadable safetensors.
    """
    folder = _checkpoint_folder(Path(path))
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    _require_safetensors(weights)
    try:
        state_dict = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the weights ({_first_line(exc)})", weights) from None
    return Checkpoint(config=config, state_dict=state_dict, path=folder)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def check_model_size(checkpoint: Checkpoint) -> None:
    """Refuse a config that declares a larger model than its `model.safetensors` holds; call before building it.

    The weights must fill the whole model, so a config asking for more values than the file has
    is wrong; checking first keeps a corrupt width or depth from allocating a huge model. The
    encoder's size is a lower bound (patch embedding, attention and MLP weights); a segmentation
    decoder is counted exactly by building it on torch's meta device (no memory).
    """
    config, folder = checkpoint.typed_config, checkpoint.path
    n_values = sum(t.numel() for t in checkpoint.state_dict.values())
    cfg = config.encoder
    w, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    needed = cfg.in_channels * cfg.patch_size**3 * w + cfg.depth * (4 * w * w + 2 * hidden * w)
    if config.heads.segmentation is not None:
        from model_core.models.segmentation import decoder_from_config

        decoder = config.heads.segmentation.decoder
        try:
            with torch.device("meta"):
                module = decoder_from_config(cfg, decoder)
        except (Ar3dInputError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the segmentation decoder {decoder} cannot be built ({_first_line(exc)})",
                                  folder / CONFIG_FILE) from None
        needed += sum(t.numel() for t in module.state_dict().values())
    if needed > n_values:
        raise CheckpointError(
            f"{CONFIG_FILE} describes a model of at least {needed:,} values but {WEIGHTS_FILE} holds {n_values:,}",
            folder,
        )


def count_values(path: str | os.PathLike) -> int:
    """Number of values in a checkpoint's `model.safetensors`, from its header (no tensor is read)."""
    weights = _checkpoint_folder(Path(path)) / WEIGHTS_FILE
    _require_safetensors(weights)
    try:
        with safe_open(weights, framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the weights ({_first_line(exc)})", weights) from None


def read_config(path: str | os.PathLike) -> dict:
    """A checkpoint's config.json as JSON, in the current version (no weights are read); see `load_config`."""
    return load_config(path).to_json()


def load_config(path: str | os.PathLike) -> CheckpointConfig:
    """A checkpoint's config.json, typed: read, brought to the current version and checked (no weights are read).

    Raises `CheckpointError` naming config.json and the problem.
    """
    folder = _checkpoint_folder(Path(path))
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"the checkpoint folder has no {CONFIG_FILE}", folder)
    return CheckpointConfig.from_json(config_path)


def _checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder that `path` names, refusing pickles and other formats up front."""
    if not path.exists():
        _recover(path)
    if not path.exists():
        raise CheckpointError("no such checkpoint folder", path)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"is a pickle file; {_NEVER_UNPICKLE}", path)
        _require_safetensors(path)
        if path.name != WEIGHTS_FILE:
            raise CheckpointError(f"a checkpoint is a folder, not a single file; {_NEVER_UNPICKLE}", path)
        return path.parent
    if not (path / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        found = f" (it holds the pickle file {', '.join(pickles)}; {_NEVER_UNPICKLE})" if pickles else ""
        raise CheckpointError(f"the folder has no {WEIGHTS_FILE}{found}", path)
    return path


def sniff(path: str | os.PathLike) -> str:
    """'safetensors', 'pickle', 'zip' (torch.save's format) or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    return "unknown"


def _require_safetensors(path: Path) -> None:
    kind = sniff(path)
    if kind in ("pickle", "zip"):
        what = "a pickle" if kind == "pickle" else "a torch.save zip archive (pickle inside)"
        raise CheckpointError(f"is {what}, not safetensors; {_NEVER_UNPICKLE}", path)
    if kind != "safetensors":
        raise CheckpointError("is not a safetensors file (corrupt or another format)", path)


def load_into(model: torch.nn.Module, checkpoint: Checkpoint, prefix: str = "", max_listed: int = 5) -> None:
    """Copy the checkpoint's tensors whose names start with `prefix` into `model`, strictly.

    Raises `CheckpointError` listing the first missing, unexpected, wrongly shaped and wrongly
    typed tensors (a float tensor may have another float precision), and those holding NaN or
    infinity.
    """
    ours = model.state_dict()
    theirs = {k[len(prefix):]: v for k, v in checkpoint.state_dict.items() if k.startswith(prefix)}
    common = [k for k in ours if k in theirs]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [
        f"{k} is {tuple(theirs[k].shape)} in the checkpoint, {tuple(ours[k].shape)} in the model"
        for k in common
        if theirs[k].shape != ours[k].shape
    ]
    dtypes = [
        f"{k} is {theirs[k].dtype} in the checkpoint, {ours[k].dtype} in the model"
        for k in common
        if theirs[k].dtype != ours[k].dtype and not (theirs[k].is_floating_point() and ours[k].is_floating_point())
    ]
    non_finite = [k for k in common if theirs[k].is_floating_point() and not torch.isfinite(theirs[k]).all()]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
                         ("wrong type", dtypes), ("NaN or infinite values", non_finite)):
        if items:
            more = f" and {len(items) - max_listed} more" if len(items) > max_listed else ""
            problems.append(f"{label}: {', '.join(items[:max_listed])}{more}")
    if problems:
        raise CheckpointError(
            f"tensors do not match the model built from its config ({'; '.join(problems)})", checkpoint.path
        )
    model.load_state_dict(theirs, strict=True)


def build_encoder(checkpoint: Checkpoint) -> ViT3D:
    """The `ViT3D` encoder that `checkpoint` describes, with its weights loaded.

    Reads the tensors under "encoder." (a pretraining or fine-tuning checkpoint) or, when there
    are none, the unprefixed ones (an exported encoder).
    """
    check_model_size(checkpoint)
    encoder = ViT3D(checkpoint.typed_config.encoder)
    prefixed = any(k.startswith("encoder.") for k in checkpoint.state_dict)
    load_into(encoder, checkpoint, prefix="encoder." if prefixed else "")
    return encoder


# ---------------------------------------------------------------------------------------------
# Train state (optimizer, scheduler, RNG) without pickle


def capture_rng() -> dict:
    """This process's RNG states: torch CPU (and CUDA) as uint8 tensors, numpy and python as JSON."""
    state = np.random.get_state(legacy=False)
    state["state"]["key"] = state["state"]["key"].tolist()
    rng = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": state,
        "python": _to_json(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    state = dict(rng["numpy"])
    state["state"] = dict(state["state"], key=np.asarray(state["state"]["key"], dtype=np.uint32))
    np.random.set_state(state)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def load_train_state(directory: str | os.PathLike) -> TrainState | None:
    """The train state saved in a checkpoint folder, or None when it has none."""
    folder = _checkpoint_folder(Path(directory)) / TRAIN_STATE_DIR
    if not (folder / "state.json").is_file():
        return None
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        for name in ("optimizer.safetensors", "rng.safetensors"):
            _require_safetensors(folder / name)
        opt_tensors = load_file(folder / "optimizer.safetensors", device="cpu")
        rng_tensors = load_file(folder / "rng.safetensors", device="cpu")
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"cannot read the train state ({exc})", folder) from None
    state = {}
    for pid, entries in meta["optimizer"]["state"].items():
        state[int(pid)] = {k: opt_tensors[f"state.{pid}.{k}"] if v is None else v for k, v in entries.items()}
    rng = []
    for rank, r in enumerate(meta["rng"]):
        tensors = {k: rng_tensors[f"{k}.{rank}"] for k in ("torch_cpu", "torch_cuda") if f"{k}.{rank}" in rng_tensors}
        rng.append({**r, **tensors})
    return TrainState(
        step=int(meta["step"]),
        optimizer={"state": state, "param_groups": meta["optimizer"]["param_groups"]},
        scheduler=meta["scheduler"],
        rng=rng,
        extra=meta.get("extra", {}),
    )


def _write_train_state(folder: Path, ts: TrainState) -> None:
    folder.mkdir()
    opt_tensors, opt_state = {}, {}
    for pid, entries in ts.optimizer["state"].items():
        opt_state[str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"state.{pid}.{key}"] = value
                opt_state[str(pid)][key] = None  # the tensor lives in optimizer.safetensors
            else:
                opt_state[str(pid)][key] = value
    rng_tensors, rng_meta = {}, []
    for rank, r in enumerate(ts.rng):
        rng_meta.append({k: v for k, v in r.items() if not isinstance(v, torch.Tensor)})
        rng_tensors.update({f"{k}.{rank}": v for k, v in r.items() if isinstance(v, torch.Tensor)})
    save_file(_cpu_tensors(opt_tensors), folder / "optimizer.safetensors")
    save_file(_cpu_tensors(rng_tensors), folder / "rng.safetensors")
    meta = {
        "step": ts.step,
        "optimizer": {"state": opt_state, "param_groups": _to_json(ts.optimizer["param_groups"])},
        "scheduler": _to_json(ts.scheduler),
        "rng": rng_meta,
        "extra": ts.extra,
    }
    _write_json(folder / "state.json", meta)
    for name in ("optimizer.safetensors", "rng.safetensors"):
        _fsync(folder / name)
    _fsync(folder)


def _to_json(obj: Any) -> Any:
    """Tuples to lists, 0-d tensors to numbers; anything else non-JSON is an error."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.ndim == 0:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a train state without pickle")


# ---------------------------------------------------------------------------------------------
# Named models


def list_shipped() -> list[str]:
    """Names of the models shipped inside the package (folders under model_core/shipped/)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def resolve_model(name_or_dir: str | os.PathLike) -> Path:
    """A checkpoint folder from a path or a shipped model's name.

    `ar3d-encoder` falls back to `$AR3D_ENCODER` while no encoder ships with the package.
    """
    text = os.fspath(name_or_dir)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if os.sep in text or "/" in text or text.startswith(".") or path.suffix:
        raise Ar3dInputError("no such checkpoint folder", text)
    if text in list_shipped():
        return SHIPPED_DIR / text
    if text == DEFAULT_ENCODER:
        env = os.environ.get(ENCODER_ENV)
        if env:
            return Path(env).expanduser()
        raise Ar3dInputError(
            f"model {text!r} is not shipped with this version yet; pass a checkpoint folder or set {ENCODER_ENV}"
        )
    known = sorted(set(list_shipped()) | {DEFAULT_ENCODER})
    raise Ar3dInputError(f"unknown model {text!r}; known names: {', '.join(known)} (or pass a checkpoint folder)")


def model_record(name_or_dir: str | os.PathLike, folder: Path) -> str | dict[str, str]:
    """How provenance names a model that another was trained from: a shipped model (or `DEFAULT_ENCODER`) by
    its name; a checkpoint folder by its name and the sha256 of its weights, never by its path."""
    text = os.fspath(name_or_dir)
    if text == DEFAULT_ENCODER or (text in list_shipped() and not Path(text).exists()):
        return text
    return describe_weights(folder, WEIGHTS_FILE)
