"""Pretraining throughput and memory of the AR objective against MONAI's 3D ViT.

For each encoder size, one training step (forward + backward, no optimizer step) of:
- ours: `AutoregressiveObjective` on `ViT3D` (random prefix mask, next-token head, per-patch
  normalised MSE) on a batch of B sequences of 4 sub-volumes of crop x crop x 32 voxels;
- baseline: `monai.networks.nets.ViT` (3D, conv patch embedding, patch 16, same width, depth,
  heads and MLP width, no classification token) on B volumes of crop x crop x 128 voxels
  (the four slabs stacked), i.e. the same number of patch tokens, with an MSE loss on its tokens.

Both run in the same process on the same device: one untimed step each, then each model's
warm-up steps alone (for memory), then timed steps alternating between the two models so that
both see the same load on a shared machine. Reported: the median time per step,
patch tokens per second, the speed ratio ours / MONAI (> 1: ours faster), and peak memory of the
step above what was allocated before it (CUDA: `torch.cuda.max_memory_allocated`; CPU: the
process's peak resident set, VmHWM, reset through /proc/self/clear_refs after glibc's
malloc_trim, so no psutil is needed; elsewhere the `resource` high-water mark, which only grows).

FLOPs per step are counted analytically, and on CUDA turned into model FLOPs utilisation:

    FLOPs = 6 * P_matmul * B * T  +  12 * L * C * B * T^2

where P_matmul is the number of weights in Linear and Conv3d layers (biases, norms and tokens
excluded), T the tokens per sequence (including our start token), L the depth and C the width:
6 = 2 (multiply-add) x 3 (forward + two backward matmuls); the second term is QK^T and AV in
every layer (2 * 2 * T^2 * C forward, times 3). Masked attention is counted in full.
MFU = FLOPs / step time / peak, with `--peak-tflops` (default 989, H100 SXM dense bf16).

    python benchmarks/pretrain_throughput.py                      # CPU, tiny and small, under a minute
    python benchmarks/pretrain_throughput.py --device cuda --bf16 --crop 128 --batch-size 64 --configs tiny,small,base
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads that spin while they wait slow every step down many times over on a machine
# shared with other processes; waiting passively costs nothing measurable on an idle one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_core.device import resolve_device  # noqa: E402
from model_core.models.vit import ViT3D, ViT3DConfig  # noqa: E402
from model_core.objectives.registry import build_objective  # noqa: E402

SUB_VOLUMES, SLAB = 4, 32


@dataclass
class Result:
    config: str
    model: str
    tokens: int  # patch tokens per step
    step_s: float
    peak_mb: float
    flops: float  # analytic FLOPs per step

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


def matmul_params(model: nn.Module) -> int:
    """Weights of the Linear and Conv3d layers (what the 6 * P * T rule counts)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv3d)))


def step_flops(model: nn.Module, batch: int, tokens: int, depth: int, width: int) -> float:
    return 6.0 * matmul_params(model) * batch * tokens + 12.0 * depth * width * batch * tokens**2


class MonaiStep(nn.Module):
    """MONAI's ViT with an MSE on its output tokens, so that it has a loss to backpropagate."""

    def __init__(self, cfg: ViT3DConfig, crop: int):
        super().__init__()
        from monai.networks.nets import ViT

        try:
            import einops  # noqa: F401  (MONAI's ViT needs it and imports it lazily)
        except ImportError:
            sys.exit("MONAI's ViT needs einops: pip install einops")
        self.vit = ViT(
            in_channels=1,
            img_size=(crop, crop, SUB_VOLUMES * SLAB),
            patch_size=cfg.patch_size,
            hidden_size=cfg.width,
            mlp_dim=int(cfg.width * cfg.mlp_ratio),
            num_layers=cfg.depth,
            num_heads=cfg.heads,
            proj_type="conv",
            classification=False,
            spatial_dims=3,
        )

    def forward(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, _ = self.vit(volume)  # (B, N, C)
        return {"loss": (tokens.float() ** 2).mean()}


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that the next peak shows in the RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block above what was in use when it started, in MB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.hwm = Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif self.hwm:
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = self._status("VmRSS")
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.hwm:
            peak = self._status("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mb = max(0, peak - self.start) / 2**20

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")


def make_step(model: nn.Module, inputs: torch.Tensor, device: torch.device, bf16: bool):
    """A function running one forward + backward step of `model` and returning its seconds."""

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = model(inputs)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def run_config(name: str, args: argparse.Namespace, device: torch.device) -> list[Result]:
    """Warm up (and measure memory of) each model alone, then time them in alternation."""
    cfg = ViT3DConfig.preset(name)
    B, crop, p = args.batch_size, args.crop, cfg.patch_size
    n_tokens = SUB_VOLUMES * (crop // p) ** 2 * (SLAB // p)  # patch tokens per sequence
    torch.manual_seed(0)
    ours = build_objective("ar", ViT3D(cfg)).to(device)
    monai = MonaiStep(cfg, crop).to(device)
    runs = {
        "ours (AR objective)": (ours, torch.rand(B, SUB_VOLUMES, crop, crop, SLAB, device=device), n_tokens + 1),
        "MONAI ViT": (monai, torch.rand(B, 1, crop, crop, SUB_VOLUMES * SLAB, device=device), n_tokens),
    }
    steps = {label: make_step(torch.compile(m) if args.compile else m, x, device, args.bf16) for label, (m, x, _) in runs.items()}
    for step in steps.values():  # one-time costs (thread pools, kernel selection, compilation) first
        step()
    peaks = {}
    for label, (model, inputs, _) in runs.items():
        with PeakMemory(device) as memory:
            for _ in range(args.warmup):
                steps[label]()
        peaks[label] = memory.mb
    times = {label: [] for label in runs}
    for _ in range(args.steps):  # alternating, so that both see the same load on a shared machine
        for label in runs:
            times[label].append(steps[label]())
    results = []
    for label, (model, _, seq_len) in runs.items():
        median = sorted(times[label])[len(times[label]) // 2]
        flops = step_flops(model, B, seq_len, cfg.depth, cfg.width)
        results.append(Result(name, label, B * n_tokens, median, peaks[label], flops))
    return results


def table(results: list[Result], device: torch.device, peak_tflops: float) -> str:
    cuda = device.type == "cuda"
    head = ["config", "model", "tokens/step", "GFLOP/step", "ms/step", "tokens/s", "speed vs MONAI", "peak MB", "memory vs MONAI"]
    if cuda:
        head += ["MFU"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baseline = {r.config: r for r in results if r.model == "MONAI ViT"}
    for r in results:
        base = baseline[r.config]
        row = [
            r.config, r.model, str(r.tokens), f"{r.flops / 1e9:,.1f}", f"{r.step_s * 1e3:.0f}", f"{r.tokens_per_s:,.0f}",
            f"{r.tokens_per_s / base.tokens_per_s:.2f}x", f"{r.peak_mb:,.0f}",
            f"{r.peak_mb / base.peak_mb:.2f}x" if base.peak_mb > 0 else "n/a",
        ]
        if cuda:
            row += [f"{r.flops / r.step_s / (peak_tflops * 1e12):.1%}"]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both models")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--configs", default="tiny,small", help="comma-separated ViT3D presets")
    parser.add_argument("--crop", type=int, default=64, help="in-plane size of each sub-volume (multiple of 16)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (memory is measured on them)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM bf16: 989)")
    args = parser.parse_args(argv)
    if args.crop % 16 or args.crop < 16:
        parser.error(f"--crop {args.crop} must be a positive multiple of 16")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for name in args.configs.split(","):
        results += run_config(name.strip(), args, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"device {device} ({gpu}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch_size} x {SUB_VOLUMES} x ({args.crop}x{args.crop}x{SLAB}), patch 16, "
        f"bf16 {args.bf16}, compile {args.compile}, median of {args.steps} steps\n"
    )
    print(table(results, device, args.peak_tflops))


if __name__ == "__main__":
    main()
