"""Fine-tune: train a segmentation model on (image, labels) layer pairs painted in napari.

It calls `model_core.training.finetune.finetune` (the same function as `ar3d finetune`) on copies of the
layers, shows the loss and Dice live, and on success adds the model to this viewer's model list,
selected in the Segment widget. Cancel stops training within a step and drops the partial model:
the model in use does not change. The user's labels layers are only read, never modified.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari_ar3d.widgets._jobs import preload, run_on_device
from napari_ar3d.widgets._layers import (
    check_volume_layer,
    label_names,
    label_values,
    layer_volume,
    real_viewer,
    same_grid,
)
from napari_ar3d.widgets._models import ModelEntry, ModelPicker
from napari_ar3d.widgets._panel import JobPanel, LayerCombo
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from model_core.errors import Ar3dInputError
from model_core.vocabulary import ANNOTATIONS, DEFAULT_STEPS, TRAINING_MODES

_RUNS = count(1)


@dataclass
class TrainingRequest:
    """Everything a fine-tuning job needs, copied off the layers on the GUI thread."""

    source: str  # the starting model (shipped name or folder)
    pairs: list  # [(image Volume, labels Volume)]; the labels are copies of the layers' data
    out: Path  # a new folder in the session folder
    names: dict[int, str]  # label value -> class name
    options: dict = field(default_factory=dict)  # FinetuneConfig fields


def finetune_job(request: TrainingRequest, device: str, progress: Any, should_stop: Any, notify: Any) -> Any:
    """`model_core.training.finetune.finetune` in a worker (on the CPU if the GPU runs out of memory); touches no Qt."""
    from model_core.training.finetune import FinetuneConfig, finetune

    def run(dev: Any) -> Any:
        cfg = FinetuneConfig(**request.options, device=str(dev))
        return finetune(request.source, request.pairs, request.out, cfg, class_names=request.names,
                        provenance={"created_by": "napari-ar3d Fine-tune widget"},
                        progress=progress, should_stop=should_stop)

    return run_on_device(run, device, notify)


class LossPlot(QWidget):
    """Live training loss (left axis, blue) and Dice (right axis, 0 to 1, orange) against the step.

    Painted with QPainter: a redraw takes well under a millisecond, so the plot never holds up the
    event loop the way a matplotlib canvas (100-200 ms a draw on a busy CPU) would.
    """

    LOSS, DICE, GRID = QColor("#4fa3ff"), QColor("#ffa040"), QColor("#5a5f69")
    MARGIN = (44, 10, 40, 24)  # left, top, right, bottom pixels around the plot area

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.dice: list[float] = []
        self.setMinimumHeight(160)
        self.setToolTip("training loss (blue, left axis) and Dice of the last batch (orange, right axis)")

    def clear(self) -> None:
        self.steps, self.loss, self.dice = [], [], []
        self.update()

    def add(self, reports: list) -> None:
        """Append the training reports (message "training", metrics loss and dice) and repaint."""
        for r in reports:
            if r.message == "training" and "loss" in r.metrics:
                self.steps.append(r.step)
                self.loss.append(float(r.metrics["loss"]))
                self.dice.append(float(r.metrics.get("dice", np.nan)))
        self.update()

    def paintEvent(self, event: Any) -> None:
        left, top, right, bottom = self.MARGIN
        area = QRectF(left, top, self.width() - left - right, self.height() - top - bottom)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setPen(QPen(self.GRID))
        painter.drawRect(area)
        text = self.palette().color(self.foregroundRole())
        painter.setPen(text)
        painter.drawText(QRectF(area.left(), area.bottom() + 4, area.width(), 18),
                         int(Qt.AlignmentFlag.AlignHCenter), "step")
        if not self.steps:
            painter.drawText(area, int(Qt.AlignmentFlag.AlignCenter), "loss and Dice appear here while training")
            return
        x_max = max(self.steps[-1], 1)
        loss = np.asarray(self.loss)
        finite = loss[np.isfinite(loss)]
        l_max = float(finite.max()) if finite.size else 1.0
        l_max = l_max if l_max > 0 else 1.0
        for value, axis_x, align in ((f"{l_max:.3g}", 0, Qt.AlignmentFlag.AlignRight),
                                     ("1", area.right() + 4, Qt.AlignmentFlag.AlignLeft)):
            width = left - 4 if axis_x == 0 else right - 4
            painter.drawText(QRectF(axis_x, area.top() - 2, width, 14), int(align), value)
            painter.drawText(QRectF(axis_x, area.bottom() - 12, width, 14), int(align), "0")
        painter.drawText(QRectF(area.right() - 60, area.bottom() + 4, 60, 18), int(Qt.AlignmentFlag.AlignRight),
                         str(x_max))
        for values, top_value, color, label, row in ((loss, l_max, self.LOSS, "loss", 0),
                                                     (np.asarray(self.dice), 1.0, self.DICE, "Dice", 1)):
            points = [QPointF(area.left() + area.width() * s / x_max, area.bottom() - area.height() * v / top_value)
                      for s, v in zip(self.steps, values) if np.isfinite(v)]
            painter.setPen(QPen(color, 1.5))
            painter.drawPolyline(QPolygonF(points))
            if len(values) and np.isfinite(values[-1]):
                label = f"{label} {values[-1]:.3g}"
            painter.drawText(QRectF(area.left() + 6, area.top() + 2 + 14 * row, area.width() - 12, 14),
                             int(Qt.AlignmentFlag.AlignLeft), label)
        painter.end()


class FinetuneWidget(QWidget):
    """(image, labels) pairs, classes, mode and steps; Train, Cancel and Save."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer = real_viewer(napari_viewer)
        preload("model_core.training.finetune", "model_core.inference.segment")
        self.options: dict = {}  # extra FinetuneConfig fields for scripts (e.g. window, crops_per_scan)
        self.last_model: Path | None = None

        self.picker = ModelPicker(napari_viewer, "finetune")
        self.pairs_table = QTableWidget(0, 2)
        self.pairs_table.setHorizontalHeaderLabels(["image", "labels"])
        self.pairs_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.pairs_table.verticalHeader().setVisible(False)
        self.pairs_table.setMaximumHeight(110)
        add_pair, remove_pair = QPushButton("+ pair"), QPushButton("− pair")
        self.annotation_combo = QComboBox()
        self.annotation_combo.addItems(list(ANNOTATIONS))
        self.annotation_combo.setToolTip("dense: every voxel labelled, 0 = background; "
                                         "sparse: scribbles, 0 = not annotated, one label is the background")
        self.background_combo = QComboBox()
        self.background_combo.setToolTip("sparse annotation: the label value painted on background")
        self.classes_table = QTableWidget(0, 3)
        self.classes_table.setHorizontalHeaderLabels(["learn", "value", "class name"])
        self.classes_table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.classes_table.verticalHeader().setVisible(False)
        self.classes_table.setMaximumHeight(150)
        refresh = QPushButton("Find classes in the labels")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(TRAINING_MODES))
        self.mode_combo.setToolTip("head: frozen encoder, fast on a CPU; full: the whole network (a GPU helps)")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(DEFAULT_STEPS["head"])
        self.train_button = QPushButton("Train")
        self.save_button = QPushButton("Save model…")
        self.save_button.setEnabled(False)
        self.panel = JobPanel()
        self.plot = LossPlot()

        model_box = QGroupBox("Start from")
        QVBoxLayout(model_box).addWidget(self.picker)
        pair_buttons = QHBoxLayout()
        pair_buttons.addWidget(add_pair)
        pair_buttons.addWidget(remove_pair)
        form = QFormLayout()
        form.addRow("annotation", self.annotation_combo)
        form.addRow("background label", self.background_combo)
        form.addRow("mode", self.mode_combo)
        form.addRow("steps", self.steps_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addWidget(model_box)
        layout.addWidget(QLabel("training pairs (labels painted on the image's grid)"))
        layout.addWidget(self.pairs_table)
        layout.addLayout(pair_buttons)
        layout.addWidget(QLabel("classes to learn"))
        layout.addWidget(self.classes_table)
        layout.addWidget(refresh)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.panel)
        layout.addWidget(self.plot)
        layout.addStretch(1)

        add_pair.clicked.connect(self.add_pair)
        remove_pair.clicked.connect(self._remove_pair)
        refresh.clicked.connect(self.refresh_classes)
        self.annotation_combo.currentTextChanged.connect(self._annotation_changed)
        self.background_combo.currentTextChanged.connect(self._background_changed)
        self.mode_combo.currentTextChanged.connect(lambda mode: self.steps_spin.setValue(DEFAULT_STEPS[mode]))
        self.train_button.clicked.connect(self.train)
        self.save_button.clicked.connect(self._choose_save_folder)
        self.panel.finished.connect(self._job_finished)
        self.add_pair()
        self._annotation_changed(self.annotation_combo.currentText())

    # ------------------------------------------------------------------ pairs and classes

    def add_pair(self) -> None:
        """A new row of (image, labels) layer choices."""
        row = self.pairs_table.rowCount()
        self.pairs_table.insertRow(row)
        for column, kind in enumerate(("image", "labels")):
            combo = LayerCombo(self.viewer, kind)
            combo.currentIndexChanged.connect(lambda *_: self.refresh_classes())
            self.pairs_table.setCellWidget(row, column, combo)
        self.refresh_classes()

    def _remove_pair(self) -> None:
        if self.pairs_table.rowCount() > 1:
            self.pairs_table.removeRow(self.pairs_table.rowCount() - 1)
            self.refresh_classes()

    def pair_combos(self) -> list[tuple[LayerCombo, LayerCombo]]:
        return [(self.pairs_table.cellWidget(r, 0), self.pairs_table.cellWidget(r, 1))
                for r in range(self.pairs_table.rowCount())]

    def refresh_classes(self) -> None:
        """List the label values painted in the chosen labels layers (ticked, with their names)."""
        old = self.class_selection(all_rows=True)
        names: dict[int, str] = {}
        for _, labels_combo in self.pair_combos():
            layer = labels_combo.layer
            if layer is not None:
                found = label_names(layer)
                for value in label_values(layer.data):
                    names.setdefault(value, found.get(value, f"label_{value}"))
        self.classes_table.setRowCount(0)
        for value in sorted(names):
            row = self.classes_table.rowCount()
            self.classes_table.insertRow(row)
            learn = QTableWidgetItem()
            learn.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
            learn.setCheckState(Qt.CheckState.Checked if old.get(value, (True,))[0] else Qt.CheckState.Unchecked)
            number = QTableWidgetItem(str(value))
            number.setFlags(Qt.ItemFlag.ItemIsEnabled)
            name = QTableWidgetItem(old.get(value, (True, names[value]))[1])
            self.classes_table.setItem(row, 0, learn)
            self.classes_table.setItem(row, 1, number)
            self.classes_table.setItem(row, 2, name)
        current = self.background_combo.currentText()
        self.background_combo.blockSignals(True)
        self.background_combo.clear()
        self.background_combo.addItems([f"{v}: {n}" for v, n in sorted(names.items())])
        guess = next((f"{v}: {n}" for v, n in names.items() if n == "background"), current)
        self.background_combo.setCurrentText(guess)
        self.background_combo.blockSignals(False)
        self._background_changed(self.background_combo.currentText())

    def class_selection(self, all_rows: bool = False) -> dict[int, tuple[bool, str]]:
        """{label value: (ticked, class name)} from the classes table (only enabled rows unless `all_rows`)."""
        out = {}
        for row in range(self.classes_table.rowCount()):
            learn = self.classes_table.item(row, 0)
            if not all_rows and not learn.flags() & Qt.ItemFlag.ItemIsEnabled:
                continue
            value = int(self.classes_table.item(row, 1).text())
            out[value] = (learn.checkState() == Qt.CheckState.Checked, self.classes_table.item(row, 2).text().strip())
        return out

    def set_classes(self, learn: dict[int, str]) -> None:
        """Tick exactly the values in `learn` and give them these names (for scripts and tests)."""
        for row in range(self.classes_table.rowCount()):
            value = int(self.classes_table.item(row, 1).text())
            state = Qt.CheckState.Checked if value in learn else Qt.CheckState.Unchecked
            self.classes_table.item(row, 0).setCheckState(state)
            if value in learn:
                self.classes_table.item(row, 2).setText(learn[value])

    def _background_value(self) -> int | None:
        text = self.background_combo.currentText()
        return int(text.split(":")[0]) if self.annotation_combo.currentText() == "sparse" and text else None

    def _annotation_changed(self, annotation: str) -> None:
        self.background_combo.setEnabled(annotation == "sparse")
        self._background_changed(self.background_combo.currentText())

    def _background_changed(self, _text: str) -> None:
        """In sparse annotation the background label is not a class to learn: its row is greyed out."""
        background = self._background_value()
        for row in range(self.classes_table.rowCount()):
            value = int(self.classes_table.item(row, 1).text())
            flags = Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled
            self.classes_table.item(row, 0).setFlags(Qt.ItemFlag.NoItemFlags if value == background else flags)

    # ------------------------------------------------------------------ training

    def request(self) -> TrainingRequest:
        """Check the setup and copy the layers into a `TrainingRequest`; `Ar3dInputError` says what is wrong."""
        if not any(layer.__class__.__name__ == "Image" for layer in self.viewer.layers):
            check_volume_layer(None)
        pairs = []
        for image_combo, labels_combo in self.pair_combos():
            image, labels = image_combo.layer, labels_combo.layer
            check_volume_layer(image)
            if labels is None:
                raise Ar3dInputError(
                    "no labels layer: select the image, add a labels layer (Layers > New Labels Layer) and paint "
                    "the structures to learn, then pick it in the training pairs"
                )
            check_volume_layer(labels, "labels")
            if tuple(labels.data.shape) != tuple(image.data.shape):
                raise Ar3dInputError(
                    f"labels layer {labels.name!r} has shape {tuple(labels.data.shape)} but image {image.name!r} has "
                    f"shape {tuple(image.data.shape)}; paint the labels on the image's grid (select the image, then "
                    "Layers > New Labels Layer)"
                )
            if not same_grid(image, labels):
                raise Ar3dInputError(
                    f"labels layer {labels.name!r} is not aligned with image {image.name!r} (different scale, "
                    "translate or affine); paint the labels on a layer created from the image"
                )
            if not label_values(labels.data):
                raise Ar3dInputError(
                    f"labels layer {labels.name!r} is empty; paint at least one structure with the brush first"
                )
            pairs.append((image, labels))
        self.refresh_classes()
        selection = self.class_selection()
        learn = sorted(v for v, (ticked, _) in selection.items() if ticked)
        if not learn:
            raise Ar3dInputError("no class to learn: tick at least one label value in the classes table")
        names = {v: name or f"label_{v}" for v, (_, name) in self.class_selection(all_rows=True).items()}
        options = {"mode": self.mode_combo.currentText(), "steps": self.steps_spin.value(),
                   "annotation": self.annotation_combo.currentText(), "labels": learn, **self.options}
        if options["annotation"] == "sparse":
            background = self._background_value()
            if background is None:
                raise Ar3dInputError("sparse annotation needs a background label: paint some background with its "
                                     "own label value and choose it as the background label")
            options["background_label"] = background
        source = self.picker.source
        if source is None or self.picker.config is None:
            raise Ar3dInputError("choose the model to start from (e.g. ar3d-encoder) in the model list first")
        volumes = [(layer_volume(image), layer_volume(labels, copy=True)) for image, labels in pairs]
        out = self.picker.registry.session_dir / f"finetuned-{next(_RUNS)}"
        return TrainingRequest(source, volumes, out, names, options)

    def train(self) -> None:
        """Start fine-tuning; problems become notifications and change nothing."""
        from napari.utils.notifications import show_error

        if self.panel.busy:
            return
        try:
            request = self.request()
        except Ar3dInputError as exc:
            show_error(str(exc))
            return
        self.plot.clear()
        self.train_button.setEnabled(False)
        device = self.picker.device
        self.panel.run(lambda *callbacks: finetune_job(request, device, *callbacks), self._trained,
                       what="fine-tuning", on_reports=self.plot.add, on_cancelled=self._discard)

    def _job_finished(self, _outcome: Any) -> None:
        self.train_button.setEnabled(True)

    def _discard(self, result: Any) -> None:
        """After Cancel: remove the partial model; the model list and the model in use stay as they were."""
        folder = getattr(result, "checkpoint", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _trained(self, result: Any) -> None:
        from napari.utils.notifications import show_info

        self.last_model = Path(result.checkpoint)
        label = f"fine-tuned: {', '.join(result.classes)} ({self.last_model.name}, {result.steps} steps)"
        self.picker.registry.add(ModelEntry(label, str(self.last_model)), select=True)
        self.save_button.setEnabled(True)
        show_info(f"Fine-tuning done (Dice {result.dice:.2f} on the last batch): the model is selected in the "
                  "Segment widget; Save model… keeps it after napari closes.")

    # ------------------------------------------------------------------ saving

    def save_model(self, folder: str | Path) -> Path | None:
        """Save the last fine-tuned model to `folder` (new or empty) as a checkpoint; errors become notifications."""
        from napari.utils.notifications import show_error, show_info

        from model_core.checkpoint.store import load_checkpoint, save_checkpoint

        folder = Path(folder)
        try:
            if self.last_model is None:
                raise Ar3dInputError("there is no fine-tuned model to save yet; press Train first")
            if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
                raise Ar3dInputError("is not an empty folder; choose a new or empty folder for the model", folder)
            checkpoint = load_checkpoint(self.last_model)
            saved = save_checkpoint(folder, checkpoint.state_dict, checkpoint.config)
        except Ar3dInputError as exc:
            show_error(str(exc))
            return None
        show_info(f"Model saved to {saved}; open it later with the model list's 'Choose folder…'.")
        return saved

    def _choose_save_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the fine-tuned model into an empty folder")
        if folder:
            self.save_model(folder)
