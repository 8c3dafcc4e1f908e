"""The Run / Cancel / progress row every widget uses, and how job errors reach the user."""

from __future__ import annotations

import time
from typing import Any, Callable

from napari_ar3d.widgets._jobs import Job, JobCall, Notice, Outcome, start_job
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from model_core.errors import Ar3dError


def report_error(exc: BaseException) -> None:
    """Show a job's exception as a napari notification with a sentence the user can act on."""
    from napari.utils.notifications import notification_manager, show_error

    if isinstance(exc, Ar3dError):  # bad input, the machine's limits, a failed training run
        show_error(str(exc))
    elif type(exc).__name__ == "OutOfMemoryError":  # torch's, also on the CPU fallback
        show_error(f"Out of memory ({str(exc).splitlines()[0][:120]}). Close other programs that use this memory "
                   "or crop the volume to the region you need; on a GPU, choose device 'cpu'.")
    elif isinstance(exc, MemoryError):
        show_error("Not enough memory for this volume. Crop it to the region you need or use a machine with more RAM.")
    else:  # a bug: show it with its traceback
        notification_manager.receive_error(type(exc), exc, exc.__traceback__)


class JobPanel(QWidget):
    """A progress bar, a status line and a Cancel button around one job at a time.

    `run(call, on_result)` starts `call` in a worker; `on_result(value)` runs on the GUI thread when
    it succeeds; errors become notifications and change nothing; Cancel drops the result.
    `finished(outcome)` is emitted after every job (tests and chained jobs wait on it).
    """

    finished = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.job: Job | None = None
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status = QLabel("ready")
        self.status.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row = QHBoxLayout()
        row.addWidget(self.progress_bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self._on_result: Callable[[Any], None] | None = None
        self._on_reports: Callable[[list], None] | None = None
        self._on_cancelled: Callable[[Any], None] | None = None
        self._started = 0.0
        self._cancelled_at: float | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    def run(
        self,
        call: JobCall,
        on_result: Callable[[Any], None],
        *,
        what: str,
        on_reports: Callable[[list], None] | None = None,
        on_cancelled: Callable[[Any], None] | None = None,
    ) -> Job:
        """Start `call` (see `napari_ar3d.widgets._jobs`); `what` names it in the status line.

        on_reports: every batch of `Progress` reports; on_cancelled: gets what the job returned
        after Cancel (None if it raised `Cancelled`), to clean up.
        """
        if self.job is not None:
            raise RuntimeError("a job is already running")
        self._on_result, self._on_reports, self._on_cancelled = on_result, on_reports, on_cancelled
        self._what, self._started, self._cancelled_at = what, time.monotonic(), None
        self.progress_bar.setRange(0, 0)  # busy until the first report
        self.status.setText(f"{what}…")
        self.cancel_button.setEnabled(True)
        self.job = start_job(call, on_progress=self._progress, on_outcome=self._outcome)
        self.destroyed.connect(self.job.stop.set)  # the dock went away: let the core stop too
        return self.job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self._cancelled_at = time.monotonic()
            self.cancel_button.setEnabled(False)
            self.status.setText(f"cancelling {self._what}…")

    def _progress(self, items: list) -> None:
        from napari.utils.notifications import show_warning

        reports = [item for item in items if not isinstance(item, Notice)]
        for notice in (item for item in items if isinstance(item, Notice)):
            show_warning(notice.message)
        if not reports:
            return
        last = reports[-1]
        if last.total > 0:
            self.progress_bar.setRange(0, last.total)
            self.progress_bar.setValue(min(last.step, last.total))
        if self._cancelled_at is None:
            metrics = ", ".join(f"{k} {v:.3g}" for k, v in last.metrics.items() if k in ("loss", "dice"))
            step = f" {last.step}/{last.total}" if last.total else ""
            self.status.setText(f"{last.message or self._what}{step}" + (f" — {metrics}" if metrics else ""))
        if self._on_reports is not None:
            self._on_reports(reports)

    def _outcome(self, outcome: Outcome) -> None:
        self.job = None
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        seconds = time.monotonic() - self._started
        try:
            if outcome.error is not None:
                self.progress_bar.setValue(0)
                self.status.setText(f"{self._what} failed: {outcome.error}")
                report_error(outcome.error)
            elif outcome.cancelled:
                self.progress_bar.setValue(0)
                self.status.setText(f"{self._what} cancelled; nothing was changed")
                if self._on_cancelled is not None:
                    self._on_cancelled(outcome.value)
            else:
                self.progress_bar.setValue(1)
                self.status.setText(f"{self._what} done in {seconds:.1f} s")
                if self._on_result is not None:
                    self._on_result(outcome.value)
        finally:
            self.finished.emit(outcome)


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of one type ("image" or "labels"), kept in sync with the layer list."""

    def __init__(self, viewer: Any, kind: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer, self.kind = viewer, kind
        self.setToolTip(f"the {kind} layer to use")
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved, events.reordered):
            event.connect(self.refresh)
        self.destroyed.connect(lambda *_: self._disconnect(viewer))
        self.refresh()

    def _disconnect(self, viewer: Any) -> None:
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved, events.reordered):
            event.disconnect(self.refresh)

    def _matches(self, layer: Any) -> bool:
        if layer.__class__.__name__.lower() != self.kind:
            return False
        return self.kind != "image" or not getattr(layer, "rgb", False)

    @property
    def layer(self) -> Any:
        """The selected layer, or None."""
        name = self.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def refresh(self, *_: Any) -> None:
        current = self.currentText()
        names = [layer.name for layer in self.viewer.layers if self._matches(layer)]
        for layer in self.viewer.layers:
            layer.events.name.disconnect(self.refresh)
            if self._matches(layer):
                layer.events.name.connect(self.refresh)
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())
