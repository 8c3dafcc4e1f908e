"""Progress reports passed from long-running core functions to the CLI and the widgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Progress:
    step: int  # steps done so far
    total: int  # steps in all (0 when unknown)
    message: str = ""  # what is happening, for a status line
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"loss": 0.12, "dice": 0.8}


ProgressFn = Optional[Callable[[Progress], None]]
StopFn = Optional[Callable[[], bool]]


class Cancelled(Exception):
    """Raised inside a core function when `should_stop()` returned True."""


def report(progress: ProgressFn, step: int, total: int, message: str = "", **metrics: float) -> None:
    """Call `progress` if given."""
    if progress is not None:
        progress(Progress(step, total, message, dict(metrics)))


def check_stop(should_stop: StopFn) -> None:
    """Raise `Cancelled` if `should_stop()` says so."""
    if should_stop is not None and should_stop():
        raise Cancelled()
