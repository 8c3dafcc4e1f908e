"""Heavy work off the GUI thread: a napari thread worker that yields progress, with Cancel.

A job is a plain function `call(progress, should_stop, notify)` that calls `model_core` (the same
functions the CLI calls). It runs in a helper thread started by a napari `thread_worker`
generator; the generator polls the helper every `POLL_S`, yields the `Progress` reports (and
`Notice`s) that came in since, and returns an `Outcome`. Nothing in a job touches Qt: the widgets
connect to the worker's `yielded` / `returned` signals, which napari delivers on the GUI thread.

Cancel sets a `threading.Event` that the core's `should_stop` reads; the core raises `Cancelled`
(or, for training, stops and returns), the helper thread ends and the worker returns.
"""

from __future__ import annotations

import gc
import importlib
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from napari.qt.threading import create_worker

POLL_S = 0.05  # how often the worker forwards progress to the GUI thread


@dataclass
class Notice:
    """A warning for the user raised inside a job (e.g. a fallback to the CPU)."""

    message: str


@dataclass
class Outcome:
    """How a job ended: its return value, the exception it raised, or cancelled."""

    value: Any = None
    error: BaseException | None = None
    cancelled: bool = False


JobCall = Callable[[Callable, Callable[[], bool], Callable[[str], None]], Any]


def preload(*modules: str) -> None:
    """Import the core modules a widget's jobs use, on the GUI thread when the widget opens.

    Importing torch / MONAI code inside a worker holds the GIL for long stretches (over 100 ms) and
    would freeze the viewer at the start of the first job; napari itself still starts without them.
    """
    for name in modules:
        importlib.import_module(name)


def job_generator(call: JobCall, stop: threading.Event, poll_s: float = POLL_S) -> Iterator[list]:
    """Run `call` in a helper thread; yield lists of `Progress` / `Notice`; return an `Outcome`."""
    from model_core.progress import Cancelled

    reports: queue.SimpleQueue = queue.SimpleQueue()
    outcome = Outcome()

    def target() -> None:
        try:
            outcome.value = call(reports.put, stop.is_set, lambda message: reports.put(Notice(message)))
        except Cancelled:
            outcome.cancelled = True
        except BaseException as exc:  # handed to the GUI thread, which tells the user
            outcome.error = exc

    thread = threading.Thread(target=target, name="ar3d-job", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(poll_s)
            batch = _drain(reports)
            if batch:
                yield batch
        batch = _drain(reports)
        if batch:
            yield batch
    except GeneratorExit:  # the worker was dropped (viewer closing): let the core stop too
        stop.set()
        raise
    if stop.is_set() and outcome.error is None:
        outcome.cancelled = True  # a result that arrives after Cancel is not applied
    return outcome


def _drain(reports: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(reports.get_nowait())
        except queue.Empty:
            return items


@dataclass
class Job:
    """A running job: its napari worker and its stop flag."""

    worker: Any
    stop: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.stop.set()


_running: set[int] = set()  # ids of the jobs under way, for `_gc_during_jobs`


def _gc_during_jobs(job_id: int, running: bool) -> None:
    """While jobs run, keep the objects that existed before out of the garbage collector's full passes.

    A full pass walks every object napari holds, with the GIL held: 100-300 ms in which the GUI
    cannot react. `gc.freeze()` moves the existing objects aside (a job's own garbage is still
    collected); when the last job ends they are handed back (`gc.unfreeze()`).
    """
    if running:
        if not _running:
            gc.freeze()
        _running.add(job_id)
    else:
        _running.discard(job_id)
        if not _running:
            gc.unfreeze()


def start_job(
    call: JobCall,
    *,
    on_progress: Callable[[list], None],
    on_outcome: Callable[[Outcome], None],
) -> Job:
    """Start `call` in a napari thread worker. Both callbacks run on the GUI thread."""
    stop = threading.Event()

    def finished(outcome: Outcome) -> None:
        _gc_during_jobs(id(stop), False)
        on_outcome(outcome)

    def failed(exc: BaseException) -> None:
        _gc_during_jobs(id(stop), False)
        _unexpected(exc)

    worker = create_worker(
        job_generator, call, stop,
        _connect={"yielded": on_progress, "returned": finished, "errored": failed, "warned": _warned},
        _start_thread=False,
    )
    job = Job(worker, stop)
    _gc_during_jobs(id(stop), True)
    worker.start()
    return job


def _warned(show_warning_args: tuple) -> None:
    """A `warnings.warn` inside the job (e.g. a model trained on another modality): a notification.

    The worker catches the job's warnings; napari shows each distinct one once.
    """
    from napari.utils.notifications import notification_manager

    notification_manager.receive_warning(*show_warning_args)


def _unexpected(exc: BaseException) -> None:
    """The generator itself failed (a bug, not a job error): show it with its traceback."""
    from napari.utils.notifications import notification_manager

    notification_manager.receive_error(type(exc), exc, exc.__traceback__)


def run_on_device(run: Callable[[Any], Any], device: str, notify: Callable[[str], None]) -> Any:
    """`run(torch device)` inside a job, leaving one CPU core to the GUI thread.

    torch gets one intra-op thread fewer than the cores (at least one): with every core busy the
    GUI thread waits for the scheduler, and on a loaded machine torch's threads also wait for each
    other (on two busy cores, a ViT forward pass ran 14 times slower with two threads than with one).
    When a GPU runs out of memory the user is told and `run` goes again on the CPU.
    """
    import torch

    from model_core.device import resolve_device

    torch.set_num_threads(max(1, _cores() - 1))
    resolved = resolve_device(device)
    try:
        return run(resolved)
    except torch.OutOfMemoryError:
        if resolved.type == "cpu":
            raise
        if resolved.type == "cuda":
            torch.cuda.empty_cache()
        notify(
            f"The GPU ({resolved}) ran out of memory, so napari-ar3d is running this on the CPU instead "
            "(slower). To use the GPU, close other programs that use it or crop the volume."
        )
        return run(torch.device("cpu"))


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
