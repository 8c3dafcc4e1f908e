"""Segment: run a segmentation model on an image layer (the same `model_core.inference.segment.segment` as `ar3d segment`).

The result is a labels layer "<image> segmentation" (class names in its features, one colour per
class), optionally "<image> probability" and "<image> uncertainty" image layers; all carry the
image's transform and metadata, and a re-run replaces their data in place.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari_ar3d.widgets._jobs import preload, run_on_device
from napari_ar3d.widgets._layers import (
    check_volume_layer,
    class_colors,
    class_features,
    layer_volume,
    percentile_limits,
    real_viewer,
    show_output,
    to_layer_data,
)
from napari_ar3d.widgets._models import ModelPicker
from napari_ar3d.widgets._panel import JobPanel, LayerCombo
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from model_core.errors import Ar3dInputError

ANY_CLASS = "any class"


@dataclass
class SegmentOutput:
    """What a segmentation job hands to the GUI thread, on the input grid (I, J, K)."""

    labels: np.ndarray
    classes: list[str]
    uncertainty: np.ndarray | None
    probability: np.ndarray | None  # P(class) for the asked class, or P(not background)
    probability_of: str
    algorithm: dict  # the model, as a DICOM-SEG of the labels names it: {"name", "version"}


class SegmenterCache:
    """The segmentation model in use, loaded once per checkpoint (reloaded if its weights file changes)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.segmenter: Any = None

    def get(self, source: str) -> Any:
        from model_core.checkpoint.store import WEIGHTS_FILE, resolve_model
        from model_core.inference.segment import load_segmenter

        folder = resolve_model(source)
        weights = Path(folder) / WEIGHTS_FILE
        key = (os.fspath(folder), weights.stat().st_mtime_ns if weights.is_file() else None)
        if key != self.key:
            self.segmenter, self.key = load_segmenter(folder), key
        return self.segmenter


def segment_job(
    cache: SegmenterCache,
    source: str,
    device: str,
    volume: Any,
    uncertainty: bool,
    probability_of: str | None,
    progress: Any,
    should_stop: Any,
    notify: Any,
) -> SegmentOutput:
    """Load (or reuse) the model and segment `volume`; runs in a worker, touches no Qt."""
    from model_core.inference.outputs import segmenter_algorithm
    from model_core.inference.segment import segment

    segmenter = cache.get(source)

    def run(dev: Any) -> Any:
        return segment(segmenter, volume, device=dev, sw_batch_size=1 if dev.type == "cpu" else 4,
                       probabilities=probability_of is not None, progress=progress, should_stop=should_stop)

    result = run_on_device(run, device, notify)
    probability = None
    if probability_of is not None:
        probs = result.probabilities  # (K+1, I, J, K)
        if probability_of in result.classes:
            probability = probs[1 + result.classes.index(probability_of)]
        else:
            probability = 1.0 - probs[0]
    return SegmentOutput(result.labels, result.classes, result.uncertainty if uncertainty else None,
                         probability, probability_of or "", asdict(segmenter_algorithm(segmenter)))


class SegmentWidget(QWidget):
    """Pick an image layer and a segmentation model, press Run."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer = real_viewer(napari_viewer)
        preload("model_core.inference.segment")
        self.cache = SegmenterCache()

        self.image_combo = LayerCombo(napari_viewer, "image")
        self.picker = ModelPicker(napari_viewer, "segment")
        self.uncertainty_check = QCheckBox("uncertainty map")
        self.probability_check = QCheckBox("probability map of")
        self.probability_combo = QComboBox()
        self.probability_combo.setToolTip("the class whose probability is shown; 'any class' = 1 - P(background)")
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("segment the image with the selected model")
        self.panel = JobPanel()

        model_box = QGroupBox("Model")
        QVBoxLayout(model_box).addWidget(self.picker)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow(self.uncertainty_check)
        form.addRow(self.probability_check, self.probability_combo)
        layout = QVBoxLayout(self)
        layout.addWidget(model_box)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.panel)
        layout.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.picker.changed.connect(self._model_changed)
        self.panel.finished.connect(lambda _: self.run_button.setEnabled(True))
        self._model_changed()

    @property
    def segmenter(self) -> Any:
        """The segmentation model last used (None before the first run)."""
        return self.cache.segmenter

    def _model_changed(self) -> None:
        classes = list((self.picker.config or {}).get("classes") or [])
        current = self.probability_combo.currentText()
        self.probability_combo.clear()
        self.probability_combo.addItems([ANY_CLASS, *classes])
        if current in classes:
            self.probability_combo.setCurrentText(current)

    def run(self) -> None:
        """Segment the selected image; problems become notifications and change nothing."""
        from napari.utils.notifications import show_error

        if self.panel.busy:
            return
        image = self.image_combo.layer
        try:
            check_volume_layer(image)
            source = self._check_model()
            volume = layer_volume(image)
        except Ar3dInputError as exc:
            show_error(str(exc))
            return
        probability_of = self.probability_combo.currentText() if self.probability_check.isChecked() else None
        args = (self.cache, source, self.picker.device, volume, self.uncertainty_check.isChecked(), probability_of)
        self.run_button.setEnabled(False)
        self.panel.run(lambda *callbacks: segment_job(*args, *callbacks), lambda out: self._show(image, out),
                       what=f"segmenting {image.name}")

    def _check_model(self) -> str:
        source, config = self.picker.source, self.picker.config
        if source is None or config is None:
            raise Ar3dInputError("choose a segmentation model in the model list (or a checkpoint folder) first")
        if "segmentation" not in (config.get("heads") or {}):
            raise Ar3dInputError(
                f"model {Path(source).name!r} is an encoder without a segmentation decoder; fine-tune it on a few "
                "painted scans with the Fine-tune widget, or choose a segmentation model"
            )
        return source

    def _show(self, image: Any, out: SegmentOutput) -> None:
        if image not in self.viewer.layers:
            return  # the image was closed while the job ran
        labels = show_output(self.viewer, image, "labels", to_layer_data(out.labels), f"{image.name} segmentation",
                             features=class_features(out.classes), colormap=class_colors(out.classes), opacity=0.6)
        labels.metadata = {**labels.metadata, "algorithm": out.algorithm}
        if out.probability is not None:
            layer = show_output(self.viewer, image, "image", to_layer_data(out.probability),
                                f"{image.name} probability", colormap="magma", blending="additive",
                                contrast_limits=(0.0, 1.0), opacity=0.7)
            layer.metadata = {**layer.metadata, "probability_of": out.probability_of}
        if out.uncertainty is not None:
            high = max(percentile_limits(out.uncertainty, 0.0, 99.5)[1], 0.05)
            show_output(self.viewer, image, "image", to_layer_data(out.uncertainty), f"{image.name} uncertainty",
                        colormap="inferno", blending="additive", contrast_limits=(0.0, high), opacity=0.7)
