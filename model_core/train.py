"""One training loop for pretraining and fine-tuning.

`train(objective, dataset, cfg, out_dir, ...)` runs AdamW with a linear-warmup cosine schedule,
gradient clipping and bf16 autocast where supported, and writes into `out_dir`:

- a checkpoint (`model_core.checkpoint`: config.json, model.safetensors, train_state/) every
  `ckpt_every` steps, at the end and on cancel;
- `loss_log.csv`: step, loss, lr, tokens_per_s, time_s every `log_every` steps.

`objective` is an `nn.Module` mapping a batch to a dict with a scalar "loss" (see
`model_core.objectives`); its whole state dict (encoder and head) is what the checkpoint holds.
Dataset items are tensors (the objective gets the batch) or dicts with a "volumes" tensor (the
objective gets the dict's tensor entries as keyword arguments; other entries are dropped).

Data order is a pure function of the step: step `s` on rank `r` of `w` reads dataset items
`(s*w + r)*B ... (s*w + r)*B + B - 1` (modulo the dataset length). With the RNG states saved in
the train state this makes 20 steps equal to 10 steps + resume + 10 steps.

Launched by `torchrun` (WORLD_SIZE > 1) the loop runs PyTorch DDP: one process per device, each
rank its own indices, gradients averaged; only rank 0 writes checkpoints and logs (its own loss;
tokens/s counts all ranks) and calls `progress`. The train state keeps every rank's RNG, so a
resume needs the same number of processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import (
    TrainState,
    capture_rng,
    has_checkpoint,
    load_checkpoint,
    load_into,
    load_train_state,
    read_config,
    restore_rng,
    save_checkpoint,
)
from .device import autocast_dtype, resolve_device
from .errors import Ar3dInputError, CheckpointError
from .io import describe_write_error
from .progress import Cancelled, ProgressFn, StopFn, report

LOSS_LOG = "loss_log.csv"
LOSS_LOG_COLUMNS = ("step", "loss", "lr", "tokens_per_s", "time_s")
AMP_CHOICES = ("auto", "bf16", "off")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in all (a resumed run continues up to this)
    batch_size: int = 2  # samples per step and per rank
    lr: float = 1e-4  # peak learning rate (AdamW, as in AR-SSL4M)
    weight_decay: float = 0.01  # on weights with >= 2 dims; biases, norms and 1-dim params get none
    warmup_steps: int = 100  # linear warmup to `lr`
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    ckpt_every: int = 500  # save a checkpoint every this many steps (and always at the end)
    log_every: int = 10  # write a loss_log.csv row every this many steps
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes
    amp: str = "auto"  # "auto": bf16 autocast where supported; "bf16": force it; "off"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise Ar3dInputError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise Ar3dInputError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise Ar3dInputError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise Ar3dInputError(
                f"weight_decay ({self.weight_decay}) and grad_clip ({self.grad_clip}) must not be negative"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise Ar3dInputError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.amp not in AMP_CHOICES:
            raise Ar3dInputError(f"TrainConfig.amp {self.amp!r} is not one of {', '.join(AMP_CHOICES)}")


@dataclass
class TrainResult:
    step: int  # steps done (including those before a resume)
    loss: float  # loss of the last step (a resume with no step left: the checkpoint's; else nan if none ran)
    checkpoint: Path | None  # the checkpoint folder (None on ranks other than 0)
    cancelled: bool  # True when should_stop() ended the run early
    wall_time_s: float  # training time, summed over resumes
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this run's steps


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based `step`: linear warmup, then cosine down to `min_lr_ratio`.

    Warmup: (step + 1) / warmup_steps for step < warmup_steps. Then, with
    t = (step - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1]:
    min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t)) / 2.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class StepBatchSampler(Sampler[list[int]]):
    """Yields the dataset indices of steps `start .. steps-1` for one rank (see the module docstring)."""

    def __init__(self, dataset_len: int | None, batch_size: int, start: int, steps: int, rank: int = 0, world: int = 1):
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.start, self.steps, self.rank, self.world = start, steps, rank, world

    def indices(self, step: int) -> list[int]:
        first = (step * self.world + self.rank) * self.batch_size
        idx = range(first, first + self.batch_size)
        return [i % self.dataset_len for i in idx] if self.dataset_len else list(idx)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights with >= 2 dims (linear, conv, tokens), none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when `train` started the process group and must end it

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Start DDP when launched by torchrun (WORLD_SIZE > 1); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _seed_worker(worker_id: int, base_seed: int) -> None:
    """DataLoader worker set-up: seeds from (base_seed, worker id); Ctrl-C and SIGTERM are left to the main process.

    `timeout`, a scheduler or Ctrl-C signal the whole process group; a worker that died of it would
    make the main process fail instead of stopping cleanly and saving (it stops the workers itself).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = (base_seed + 1000003 * worker_id) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _tensors(batch: dict) -> dict[str, torch.Tensor]:
    """The tensor entries of a collated dict batch (strings such as case ids are dropped)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _volumes(batch) -> torch.Tensor:
    """The volumes tensor of a collated batch: the batch itself or its "volumes" entry."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict) and isinstance(batch.get("volumes"), torch.Tensor):
        return batch["volumes"]
    raise Ar3dInputError(
        f"dataset items must be tensors or dicts with a 'volumes' tensor, got {type(batch).__name__}"
    )


def _tokens(model: nn.Module, volumes: torch.Tensor) -> int:
    """Patch tokens in a batch of volumes (voxels when the model has no ViT3D encoder)."""
    cfg = getattr(getattr(model, "encoder", None), "cfg", None)
    per_token = cfg.patch_size**3 * cfg.in_channels if cfg is not None else 1
    return volumes.numel() // per_token


def _gather_rng(d: _Dist, device: torch.device) -> list[dict]:
    """Every rank's `capture_rng()`, on rank 0 (tensors gathered; JSON parts sent as bytes)."""
    mine = capture_rng()
    if d.world == 1:
        return [mine]
    comm = device if device.type == "cuda" else torch.device("cpu")
    blob = json.dumps({k: v for k, v in mine.items() if not isinstance(v, torch.Tensor)}).encode()
    parts = {k: v for k, v in mine.items() if isinstance(v, torch.Tensor)}
    out: list[dict] = [{} for _ in range(d.world)]
    payloads = [("json", torch.frombuffer(bytearray(blob), dtype=torch.uint8))] + sorted(parts.items())
    for key, tensor in payloads:
        size = torch.tensor([tensor.numel()], device=comm)
        sizes = [torch.zeros_like(size) for _ in range(d.world)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=comm)
        padded[: tensor.numel()] = tensor.to(comm)
        gathered = [torch.zeros_like(padded) for _ in range(d.world)]
        dist.all_gather(gathered, padded)
        for rank, (g, s) in enumerate(zip(gathered, sizes)):
            value = g[: int(s.item())].cpu()
            if key == "json":
                out[rank].update(json.loads(bytes(value.numpy().tobytes())))
            else:
                out[rank][key] = value
    return out


def _append_log(path: Path, rows: list[tuple]) -> None:
    """Append rows to the loss log; a failed write (a full disk) leaves the file as it was and says why."""
    new = not path.exists()
    size = 0 if new else path.stat().st_size
    try:
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(LOSS_LOG_COLUMNS)
            writer.writerows(rows)
    except OSError as exc:
        with suppress(OSError):
            path.unlink() if new else os.truncate(path, size)
        raise Ar3dInputError(f"could not write the loss log ({describe_write_error(exc, path.parent)})", path) from exc


def _truncate_log(path: Path, after_step: int) -> None:
    """Drop log rows past `after_step` (written by a run killed after its last checkpoint), and a row a kill cut short."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [list(LOSS_LOG_COLUMNS)] + [
        r for r in rows if len(r) == len(LOSS_LOG_COLUMNS) and r[0].isdigit() and int(r[0]) <= after_step
    ]
    if kept != rows:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)  # a kill now leaves the old log or the new one


def train(
    objective: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    checkpoint_config: dict,
    param_groups: list[dict] | None = None,
    resume: bool = False,
    progress: ProgressFn = None,
    should_stop: StopFn = None,
) -> TrainResult:
    """Train `objective` on `dataset` and checkpoint it into `out_dir` (see the module docstring).

    checkpoint_config: the config.json to save (`checkpoint.make_config`); the loop fills in
        provenance steps, wall_time_s, seed, metrics and created.
    param_groups: AdamW parameter groups (e.g. layer-wise lr decay; a group's "lr" is its peak);
        default: weight decay on >= 2-dim weights only.
    resume: continue from the checkpoint in `out_dir` (weights, optimizer, schedule, RNG, data
        position); a folder without one starts from step 0. Without `resume`, a folder that already
        holds a checkpoint is an error.
    progress: called after every step with `Progress(step, total, "training", {loss, lr, tokens_per_s})`.
    should_stop: polled before every step; when it returns True the loop saves a checkpoint and
        returns with `cancelled=True`.
    """
    out = Path(out_dir)
    if has_checkpoint(out) and not resume:
        raise Ar3dInputError(
            "already holds a checkpoint; resume it (--resume / resume=True) or choose another folder", out
        )
    d, device = _init_distributed(cfg.device)
    try:
        result = _train(objective, dataset, cfg, out, checkpoint_config, param_groups, resume, progress, should_stop, d, device)
        if d.owns_group:
            dist.barrier()  # rank 0 may still be writing the last checkpoint
        return result
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(objective, dataset, cfg, out, checkpoint_config, param_groups, resume, progress, should_stop, d, device):
    model = objective.to(device)
    groups = param_groups if param_groups is not None else default_param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
    )

    start, wall_before, resumed_loss = 0, 0.0, math.nan
    state = load_train_state(out) if resume and has_checkpoint(out) else None
    if resume and has_checkpoint(out) and state is None:
        raise CheckpointError("has no train_state/ to resume from (it is a final or exported checkpoint)", out)
    if state is not None:
        load_into(model, load_checkpoint(out))
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if len(state.rng) != d.world:
            raise CheckpointError(
                f"was saved by {len(state.rng)} process(es) and is resumed by {d.world}; resume with the same number", out
            )
        restore_rng(state.rng[d.rank])
        start, wall_before = state.step, float(state.extra.get("wall_time_s", 0.0))
        resumed_loss = float(read_config(out)["provenance"].get("metrics", {}).get("loss", math.nan))
    else:
        torch.manual_seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
    if d.main:
        _truncate_log(out / LOSS_LOG, start)

    net = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = {"auto": autocast_dtype(device), "bf16": torch.bfloat16, "off": None}[cfg.amp]

    sampler = StepBatchSampler(
        len(dataset) if isinstance(dataset, Sized) else None, cfg.batch_size, start, cfg.steps, d.rank, d.world
    )
    loader_seed = cfg.seed * 1_000_003 + start * 101 + d.rank
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=partial(_seed_worker, base_seed=loader_seed),
        generator=torch.Generator().manual_seed(loader_seed),  # keeps the global RNG untouched
    )

    def save(step: int, last_loss: float, wall: float) -> Path | None:
        rng = _gather_rng(d, device)  # a collective: every rank takes part
        if not d.main:
            return None
        config = dict(checkpoint_config)
        config["provenance"] = {
            **checkpoint_config.get("provenance", {}),
            "steps": step,
            "wall_time_s": round(wall, 3),
            "seed": cfg.seed,
            "world_size": d.world,
            "train": asdict(cfg),
            "metrics": {"loss": last_loss},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        ts = TrainState(step, optimizer.state_dict(), scheduler.state_dict(), rng, {"wall_time_s": wall})
        return save_checkpoint(out, model.state_dict(), config, ts)

    model.train()
    t0 = time.perf_counter()
    step, last_loss, cancelled, saved_at, saved_any = start, resumed_loss, False, start, state is not None
    history: list[tuple[int, float]] = []
    checkpoint = out if d.main and saved_any else None
    tick, tick_tokens = time.perf_counter(), 0
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    stop_hooks = _stop_inside_steps(model, should_stop) if d.world == 1 else []
    try:
        for batch in loader:
            if should_stop is not None and _any_rank(should_stop(), d, device):
                cancelled = True
                break
            batch = _to_device(batch, device)
            volumes = _volumes(batch)
            try:
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
                    result = net(batch) if isinstance(batch, torch.Tensor) else net(**_tensors(batch))
                loss = result["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            except Cancelled:  # mid-step: the weights are still those of the last complete step
                optimizer.zero_grad(set_to_none=True)
                cancelled = True
                break
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1

            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise Ar3dInputError(f"training diverged: the loss is {last_loss} at step {step}; lower the learning rate")
            history.append((step, last_loss))
            tick_tokens += _tokens(model, volumes) * d.world
            now = time.perf_counter()
            tokens_per_s = tick_tokens / max(now - tick, 1e-9)
            wall = wall_before + now - t0
            if d.main:
                report(progress, step, cfg.steps, "training", loss=last_loss, lr=lr, tokens_per_s=tokens_per_s)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if d.main:
                    row = (step, f"{last_loss:.6g}", f"{lr:.6g}", f"{tokens_per_s:.1f}", f"{wall:.2f}")
                    _append_log(out / LOSS_LOG, [row])
                tick, tick_tokens = now, 0
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint = save(step, last_loss, wall)
                saved_at, saved_any = step, True
    finally:
        for hook in stop_hooks:
            hook.remove()
    wall = wall_before + time.perf_counter() - t0
    if step != saved_at or not saved_any:
        checkpoint = save(step, last_loss, wall)
    return TrainResult(step, last_loss, checkpoint, cancelled, wall, history)


def _stop_inside_steps(model: nn.Module, should_stop: StopFn) -> list:
    """Hooks that raise `Cancelled` inside a step's forward and backward once `should_stop()` is True.

    A full fine-tuning step takes seconds on a CPU; checking only between steps would keep Cancel
    waiting that long. Single-process only: one rank leaving a step would hang the others.
    """
    if should_stop is None:
        return []

    def check(*_args: object) -> None:
        if should_stop():
            raise Cancelled()

    hooks = [m.register_forward_pre_hook(check) for m in model.modules()]
    hooks += [p.register_hook(check) for p in model.parameters() if p.requires_grad]
    return hooks


def _any_rank(flag: bool, d: _Dist, device: torch.device) -> bool:
    """True when `flag` is True on any rank (so every rank stops at the same step)."""
    if d.world == 1:
        return bool(flag)
    t = torch.tensor([int(flag)], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
