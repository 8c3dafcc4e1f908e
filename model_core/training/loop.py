"""One training loop for pretraining and fine-tuning.

`train(objective, dataset, cfg, out_dir, ...)` runs AdamW with a linear-warmup cosine schedule,
gradient clipping and bf16 autocast where supported, and writes into `out_dir`:

- a checkpoint (`model_core.checkpoint.store`: config.json, model.safetensors, train_state/) every
  `ckpt_every` steps, at the end and on cancel;
- `loss_log.csv`: step, loss, lr, tokens_per_s, time_s every `log_every` steps, then one column
  per other scalar the objective returns whose name contains "loss" (its terms, e.g. loss_cls).

`objective` is an `nn.Module` mapping a batch to a dict with a scalar "loss" (see
`model_core.objectives.autoregressive`); its whole state dict (encoder and head) is what the checkpoint holds.
An objective with an `after_step()` method (Alice's EMA teacher) has it called after every optimizer step.
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
import itertools
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator, Sized
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from model_core.checkpoint.store import (
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
from model_core.device import autocast_dtype, resolve_device
from model_core.errors import Ar3dInputError, CheckpointError, TrainingError
from model_core.io.volume import write_error
from model_core.progress import Cancelled, ProgressFn, StopFn, report
from model_core.vocabulary import AMP_MODES

LOSS_LOG = "loss_log.csv"
LOSS_LOG_COLUMNS = ("step", "loss", "lr", "tokens_per_s", "time_s")


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
    compile: bool = False  # torch.compile the forward and backward (the optimizer step stays eager)

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
        if self.amp not in AMP_MODES:
            raise Ar3dInputError(f"TrainConfig.amp {self.amp!r} is not one of {', '.join(AMP_MODES)}")


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


def _append_log(path: Path, rows: list[tuple], columns: tuple[str, ...] = LOSS_LOG_COLUMNS) -> None:
    """Append rows to the loss log, headed by `columns` while it has no row yet; a failed write (a full
    disk) leaves the file as it was and says why."""
    new = not path.exists()
    rewrite = not new and not _has_rows(path)  # a header alone: rewrite it, it may name fewer loss terms
    size = 0 if new else path.stat().st_size
    try:
        with open(path, "w" if rewrite else "a", newline="") as f:
            writer = csv.writer(f)
            if new or rewrite:
                writer.writerow(columns)
            writer.writerows(rows)
    except OSError as exc:
        with suppress(OSError):
            path.unlink() if new or rewrite else os.truncate(path, size)
        raise write_error("could not write the loss log", exc, path) from exc


def _has_rows(path: Path) -> bool:
    """Whether the loss log holds a row below its header (reads two lines at most)."""
    with open(path, newline="") as f:
        return sum(1 for _ in itertools.islice(f, 2)) > 1


def _truncate_log(path: Path, after_step: int) -> None:
    """Drop log rows past `after_step` (written by a run killed after its last checkpoint), and a row a kill cut short."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    whole = bool(rows) and tuple(rows[0][: len(LOSS_LOG_COLUMNS)]) == LOSS_LOG_COLUMNS  # a header a kill left whole
    header = rows[0] if whole else list(LOSS_LOG_COLUMNS)
    kept = [header] + [r for r in rows if len(r) == len(header) and r[0].isdigit() and int(r[0]) <= after_step]
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
    ranks, device = _init_distributed(cfg.device)
    try:
        model = objective.to(device)
        optimizer, scheduler = _optimizer(model, cfg, param_groups)
        run = _Run(
            model, dataset, cfg, out, checkpoint_config, ranks, device, optimizer, scheduler, progress, should_stop
        )
        result = _train(run, resume=resume and has_checkpoint(out))
        if ranks.owns_group:
            dist.barrier()  # rank 0 may still be writing the last checkpoint
        return result
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


@dataclass
class _Run:
    """What one call of `train` works with."""

    model: nn.Module  # the objective, on `device`: what the checkpoint holds
    dataset: Dataset
    cfg: TrainConfig
    out: Path
    checkpoint_config: dict
    ranks: _Dist
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: ProgressFn
    should_stop: StopFn


@dataclass
class _Position:
    """How far a run is: steps done (resumed ones included), the last loss, the last checkpoint."""

    step: int
    loss: float  # nan before the first step
    wall_before: float  # training seconds of the runs before a resume
    saved: bool  # a checkpoint exists (the resumed one, or one this run wrote)
    saved_at: int  # the step of the last checkpoint
    checkpoint: Path | None = None  # the checkpoint folder (rank 0 only)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this run's steps


@dataclass
class _Clock:
    """Training time, and the tokens read since the last loss-log row (for tokens/s)."""

    wall_before: float
    start: float = field(default_factory=time.perf_counter)
    tick: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def wall(self, now: float) -> float:
        return self.wall_before + now - self.start


def _optimizer(
    model: nn.Module, cfg: TrainConfig, param_groups: list[dict] | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` (default: `default_param_groups`) and its warmup-cosine schedule."""
    groups = param_groups if param_groups is not None else default_param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _train(run: _Run, resume: bool) -> TrainResult:
    """Resume or seed, then step until `cfg.steps` or a stop; a checkpoint holds the last step."""
    at = _restore(run) if resume else _seed(run)
    if run.ranks.main:
        _truncate_log(run.out / LOSS_LOG, at.step)
    net = run.model
    if run.ranks.world > 1:
        net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    if run.cfg.compile:
        net = torch.compile(net)  # the first step compiles (minutes on a CPU); a cancel waits for the step's end
    loader = _loader(run, at.step)
    run.model.train()
    clock = _Clock(at.wall_before)
    if run.ranks.main:
        run.out.mkdir(parents=True, exist_ok=True)
    inside = run.ranks.world == 1 and not run.cfg.compile  # a hook in a compiled graph would be traced, not polled
    stop_hooks = _stop_inside_steps(run.model, run.should_stop) if inside else []
    try:
        cancelled = _steps(run, net, loader, at, clock)
    finally:
        for hook in stop_hooks:
            hook.remove()
    wall = clock.wall(time.perf_counter())
    if at.step != at.saved_at or not at.saved:
        at.checkpoint = _save(run, at.step, at.loss, wall)
    return TrainResult(at.step, at.loss, at.checkpoint, cancelled, wall, at.history)


def _restore(run: _Run) -> _Position:
    """Load the weights, optimizer, schedule and this rank's RNG of the checkpoint in `run.out`."""
    state = load_train_state(run.out)
    if state is None:
        raise CheckpointError("has no train_state/ to resume from (it is a final or exported checkpoint)", run.out)
    load_into(run.model, load_checkpoint(run.out))
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    if len(state.rng) != run.ranks.world:
        saved_by, world = len(state.rng), run.ranks.world
        raise CheckpointError(
            f"was saved by {saved_by} process(es) and is resumed by {world}; resume with the same number", run.out
        )
    restore_rng(state.rng[run.ranks.rank])
    loss = float(read_config(run.out)["provenance"].get("metrics", {}).get("loss", math.nan))
    wall_before = float(state.extra.get("wall_time_s", 0.0))
    checkpoint = run.out if run.ranks.main else None
    return _Position(state.step, loss, wall_before, saved=True, saved_at=state.step, checkpoint=checkpoint)


def _seed(run: _Run) -> _Position:
    """Seed torch, numpy and random for a fresh run (per rank); the position of step 0."""
    seed = run.cfg.seed + run.ranks.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return _Position(0, math.nan, 0.0, saved=False, saved_at=0)


def _loader(run: _Run, start: int) -> DataLoader:
    """This rank's batches of steps `start .. cfg.steps-1` (`StepBatchSampler`), with seeded workers."""
    cfg, ranks, dataset = run.cfg, run.ranks, run.dataset
    length = len(dataset) if isinstance(dataset, Sized) else None
    sampler = StepBatchSampler(length, cfg.batch_size, start, cfg.steps, ranks.rank, ranks.world)
    loader_seed = cfg.seed * 1_000_003 + start * 101 + ranks.rank
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=run.device.type == "cuda",
        worker_init_fn=partial(_seed_worker, base_seed=loader_seed),
        generator=torch.Generator().manual_seed(loader_seed),  # keeps the global RNG untouched
    )


def _steps(run: _Run, net: nn.Module, loader: DataLoader, at: _Position, clock: _Clock) -> bool:
    """Step through `loader`, advancing `at`; True when `should_stop` ended the run early."""
    amp = {"auto": autocast_dtype(run.device), "bf16": torch.bfloat16, "off": None}[run.cfg.amp]
    for batch in loader:
        if run.should_stop is not None and _any_rank(run.should_stop(), run.ranks, run.device):
            return True
        batch = _to_device(batch, run.device)
        tokens = _tokens(run.model, _volumes(batch)) * run.ranks.world
        done = _step(run, net, batch, amp)
        if done is None:
            return True
        at.step += 1
        _after_step(run, at, clock, *done, tokens)
    return False


def _step(
    run: _Run, net: nn.Module, batch: torch.Tensor | dict, amp: torch.dtype | None
) -> tuple[float, float, dict[str, float]] | None:
    """One optimization step: autocast forward, backward, clip, AdamW, schedule, the objective's `after_step`.

    Returns (loss, the lr it stepped with, the other loss terms by name), or None when cancelled
    inside the step (`Cancelled` from the hooks of `_stop_inside_steps`): the weights are then those
    of the last complete step.
    """
    try:
        with torch.autocast(run.device.type, dtype=amp) if amp is not None else nullcontext():
            result = net(batch) if isinstance(batch, torch.Tensor) else net(**_tensors(batch))
        loss = result["loss"]
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    except Cancelled:
        run.optimizer.zero_grad(set_to_none=True)
        return None
    if run.cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    after_step = getattr(run.model, "after_step", None)
    if callable(after_step):
        after_step()
    terms = {k: v.item() for k, v in result.items()
             if "loss" in k and k != "loss" and torch.is_tensor(v) and v.ndim == 0}
    return loss.item(), lr, terms


def _after_step(
    run: _Run, at: _Position, clock: _Clock, loss: float, lr: float, terms: dict[str, float], tokens: int
) -> None:
    """After step `at.step`: stop on divergence, record the loss, report, log and checkpoint when due."""
    cfg = run.cfg
    if not math.isfinite(loss):
        raise TrainingError(f"training diverged: the loss is {loss} at step {at.step}; lower the learning rate")
    at.loss = loss
    at.history.append((at.step, loss))
    clock.tokens += tokens
    now = time.perf_counter()
    tokens_per_s = clock.tokens / max(now - clock.tick, 1e-9)
    wall = clock.wall(now)
    if run.ranks.main:
        report(run.progress, at.step, cfg.steps, "training", loss=loss, lr=lr, tokens_per_s=tokens_per_s)
    if at.step % cfg.log_every == 0 or at.step == cfg.steps:
        if run.ranks.main:
            row = (at.step, f"{loss:.6g}", f"{lr:.6g}", f"{tokens_per_s:.1f}", f"{wall:.2f}")
            row += tuple(f"{v:.6g}" for v in terms.values())
            _append_log(run.out / LOSS_LOG, [row], LOSS_LOG_COLUMNS + tuple(terms))
        clock.tick, clock.tokens = now, 0
    if at.step % cfg.ckpt_every == 0 or at.step == cfg.steps:
        at.checkpoint = _save(run, at.step, loss, wall)
        at.saved, at.saved_at = True, at.step


def _save(run: _Run, step: int, loss: float, wall: float) -> Path | None:
    """Checkpoint weights, config and train state into `run.out`; the folder on rank 0, None elsewhere.

    A collective (every rank's RNG goes into the train state): every rank must call it.
    """
    rng = _gather_rng(run.ranks, run.device)
    if not run.ranks.main:
        return None
    base = run.checkpoint_config
    config = dict(base)
    config["provenance"] = {
        **base.get("provenance", {}),
        "steps": step,
        "wall_time_s": round(wall, 3),
        "seed": run.cfg.seed,
        "world_size": run.ranks.world,
        "train": asdict(run.cfg),
        "metrics": {"loss": loss},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    state = TrainState(step, run.optimizer.state_dict(), run.scheduler.state_dict(), rng, {"wall_time_s": wall})
    return save_checkpoint(run.out, run.model.state_dict(), config, state)


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
