"""What the subcommands share: the `Command` record, progress bars, Ctrl-C handling, option parsers."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from model_core.errors import Ar3dInputError
from model_core.progress import Progress
from model_core.vocabulary import AMP_MODES, DEVICE_HELP


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_device(p: argparse.ArgumentParser, amp: bool = False) -> None:
    """--device (and --amp) with the one device rule."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if amp:
        p.add_argument("--amp", choices=AMP_MODES, default="auto", help="bf16 autocast (auto: where supported)")


def command_line(args: argparse.Namespace) -> str:
    """The command as the user typed it, for a checkpoint's provenance: every path reduced to its file name."""
    from model_core.checkpoint.provenance import command_text

    return command_text(sys.argv[1:] if args.argv is None else args.argv)


class TqdmProgress:
    """A `model_core.progress` callback that drives a tqdm bar (on stderr)."""

    def __init__(self, desc: str, enabled: bool = True, unit: str = "it"):
        self.desc, self.enabled, self.unit = desc, enabled, unit
        self.bar = None

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.total or None, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        if p.total and p.total != self.bar.total:  # e.g. a retry with fewer windows per batch
            self.bar.reset(total=p.total)
        self.bar.update(p.step - self.bar.n)
        if p.metrics:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in p.metrics.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PhaseProgress:
    """One tqdm bar per phase of a job (the `Progress.message`: reading, caching, training...)."""

    def __init__(self):
        self.message, self.bar = None, None

    def __call__(self, p: Progress) -> None:
        if p.message != self.message:
            self.close()
            self.message, self.bar = p.message, TqdmProgress(p.message, unit="step")
        self.bar(p)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnSignal:
    """`should_stop` for Ctrl-C / SIGTERM: the first signal stops training cleanly, a second kills."""

    def __init__(self):
        self.stop = False
        self.previous = {}

    def __enter__(self) -> Callable[[], bool]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return lambda: self.stop

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step (saving a checkpoint); press Ctrl-C again to kill", file=sys.stderr)


# ----------------------------------------------------------------------------- option values


def overrides(items: Sequence[str]) -> dict:
    """--set KEY=VALUE items as a dict (values parsed as JSON where they are JSON)."""
    import json

    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise Ar3dInputError(f"--set {item!r} is not KEY=VALUE")
        try:
            values[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            values[key.strip()] = text
    return values


def spacing(text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or min(values) <= 0:
        raise Ar3dInputError(f"--spacing {text!r} must be one positive number or three, comma-separated")
    return tuple(values * 3 if len(values) == 1 else values)


def three(text: str, kind: type, option: str) -> tuple:
    """Three comma-separated numbers of `kind` (int or float)."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        what = "whole numbers" if kind is int else "numbers"
        raise Ar3dInputError(f"{option} {text!r} must be three comma-separated {what}")
    return values


def label_values(text: str, option: str = "--labels") -> str | list[int]:
    if text.strip() == "all":
        return "all"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise Ar3dInputError(f"{option} {text!r} must be 'all' or positive label values, comma-separated")
    return values


def merge(item: str) -> tuple[str, list[int]]:
    name, sep, values = item.partition("=")
    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not sep or not name.strip() or not numbers or min(numbers) < 1:
        raise Ar3dInputError(f"--merge {item!r} is not NAME=VALUE,VALUE,... with positive label values")
    return name.strip(), numbers


def ct_window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise Ar3dInputError(f"--ct-window {text!r} must be two numbers LOW,HIGH in HU") from None
    return low, high
