"""Scribble: paint a few strokes on a few slices; the whole volume is segmented, and every stroke updates it.

The same `model_core.inference.scribble.ScribbleSession` as `ar3d scribble`. "Start" computes (or
reads from the disk cache) the encoder's features of the chosen image and adds the labels layer
"<image> scribbles" on the image's grid: value 1 is background, 2, 3, ... are classes (their names
are in the layer's features). Shortly after a stroke (or on "Update", or the key U on that layer)
an update trains the decoder on the painted voxels, shows the slice on screen first, then the
whole volume in "<image> scribble result" (painted values, 0 background) and "<image> scribble
uncertainty", updated in place. "Accept" copies the result into a labels layer of the user's
choice (on the image's grid), where the result is not background. The user's layers are never
changed otherwise; training and prediction run in a worker with progress and Cancel.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from napari_ar3d.widgets._jobs import preload, run_on_device
from napari_ar3d.widgets._layers import (
    check_volume_layer,
    label_values,
    layer_volume,
    real_viewer,
    same_grid,
    show_output,
    to_layer_data,
)
from napari_ar3d.widgets._models import ModelPicker
from napari_ar3d.widgets._panel import JobPanel, LayerCombo
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from model_core.errors import Ar3dInputError

BACKGROUND = 1  # the painted value that means background
CLASSES = 4  # class values 2..CLASSES+1 named in a new scribble layer (more can be painted)
UPDATE_DELAY_MS = 600  # an update starts this long after the last stroke


def scribble_names() -> dict:
    """The features table of a scribble layer: 0 unpainted, 1 background, 2.. classes."""
    values = list(range(CLASSES + 2))
    return {"index": values, "class": ["unpainted", "background", *(f"class {v}" for v in values[2:])]}


def start_job(volume: Any, source: str, device: str, progress: Any, should_stop: Any, notify: Any) -> Any:
    """A scribble session on `volume` (the encoder's features computed or read from the cache); no Qt."""
    from model_core.inference.scribble import ScribbleSession

    return run_on_device(lambda dev: ScribbleSession(volume, source, device=dev, progress=progress,
                                                     should_stop=should_stop), device, notify)


def train_job(session: Any, scribbles: Any, region: Any, progress: Any, should_stop: Any, notify: Any) -> Any:
    """Train on the strokes; the prediction of `region` (the slice on screen) or None; no Qt."""
    session.train(scribbles, BACKGROUND, progress, should_stop)
    return None if region is None else session.predict(region, progress=progress, should_stop=should_stop)


def volume_job(session: Any, progress: Any, should_stop: Any, notify: Any) -> Any:
    """The prediction of the whole volume; no Qt."""
    return session.predict(progress=progress, should_stop=should_stop)


class ScribbleWidget(QWidget):
    """Pick an image and an encoder, press Start, paint; Accept copies the result into a labels layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer = real_viewer(napari_viewer)
        preload("model_core.inference.scribble")
        self.session: Any = None
        self.image: Any = None  # the layer the session segments
        self.scribbles: Any = None  # its scribble layer
        self.pending = False  # a stroke came while a job ran: update again after it

        self.image_combo = LayerCombo(napari_viewer, "image")
        self.picker = ModelPicker(napari_viewer, "finetune")
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("compute the encoder's features of the image and add a scribble layer")
        self.update_button = QPushButton("Update")
        self.update_button.setToolTip("train on the strokes and segment (key U on the scribble layer)")
        self.auto_check = QCheckBox("update after each stroke")
        self.auto_check.setChecked(True)
        self.target_combo = LayerCombo(napari_viewer, "labels")
        self.accept_button = QPushButton("Accept into")
        self.accept_button.setToolTip("copy the result (where it is not background) into the chosen labels layer")
        self.panel = JobPanel()
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.timeout.connect(lambda: self.update_segmentation(quiet=True))
        self._lay_out()
        self.start_button.clicked.connect(self.start)
        self.update_button.clicked.connect(lambda: self.update_segmentation())
        self.accept_button.clicked.connect(self.accept)
        self.panel.finished.connect(self._finished)

    def _lay_out(self) -> None:
        model_box = QGroupBox("Encoder")
        QVBoxLayout(model_box).addWidget(self.picker)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.update_button)
        accept = QHBoxLayout()
        accept.addWidget(self.accept_button)
        accept.addWidget(self.target_combo, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(model_box)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.auto_check)
        layout.addLayout(accept)
        layout.addWidget(self.panel)
        layout.addStretch(1)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Start a session on the selected image; problems become notifications and change nothing."""
        from napari.utils.notifications import show_error

        if self.panel.busy:
            return
        image = self.image_combo.layer
        try:
            check_volume_layer(image)
            if self.picker.source is None:
                raise Ar3dInputError("choose an encoder in the model list (or a checkpoint folder) first")
            volume = layer_volume(image, copy=True)
        except Ar3dInputError as exc:
            show_error(str(exc))
            return
        args = (volume, self.picker.source, self.picker.device)
        self.panel.run(lambda *callbacks: start_job(*args, *callbacks), lambda s: self._started(image, s),
                       what=f"computing the features of {image.name}")

    def _started(self, image: Any, session: Any) -> None:
        if image not in self.viewer.layers:
            return
        self.session, self.image = session, image
        shape = tuple(image.data.shape)
        name = f"{image.name} scribbles"
        old = next((layer for layer in self.viewer.layers if layer.name == name), None)
        data = old.data if old is not None and tuple(old.data.shape) == shape else np.zeros(shape, np.uint8)
        self.scribbles = show_output(self.viewer, image, "labels", data, name, features=scribble_names())
        self.scribbles.events.paint.disconnect(self._stroke)
        self.scribbles.events.paint.connect(self._stroke)
        self.scribbles.bind_key("u", lambda _layer: self.update_segmentation(), overwrite=True)
        self.scribbles.selected_label = 2
        self.scribbles.mode = "paint"
        self.viewer.layers.selection.active = self.scribbles
        self.panel.status.setText("paint class 2 (and 3, 4...) and background (1); the result follows each stroke")

    # ------------------------------------------------------------------ updates

    def _stroke(self, *_: Any) -> None:
        if self.auto_check.isChecked():
            self.timer.start(UPDATE_DELAY_MS)

    def update_segmentation(self, quiet: bool = False) -> None:
        """Train on the strokes and segment: the slice on screen first, then the volume.

        quiet (an automatic update): strokes that cannot train yet (no background, no class) only
        change the status line; otherwise they are a notification.
        """
        from napari.utils.notifications import show_error

        if self.session is None or self.scribbles not in self.viewer.layers:
            if not quiet:
                show_error("press Start first: it adds the scribble layer to paint on")
            return
        if self.panel.busy:
            self.pending = True
            return
        values = label_values(self.scribbles.data)
        if BACKGROUND not in values or len(values) < 2:
            message = (f"paint some background (value {BACKGROUND}) and at least one class (2, 3...) to segment; "
                       f"painted so far: {', '.join(map(str, values)) or 'nothing'}")
            if quiet:
                self.panel.status.setText(message)
            else:
                show_error(message)
            return
        scribbles = layer_volume(self.scribbles, copy=True)
        args = (self.session, scribbles, self._visible_region())
        self.panel.run(lambda *callbacks: train_job(*args, *callbacks), self._show_region, what="training")

    def _visible_region(self) -> tuple | None:
        """The image's slice on screen as index slices (i, j, k), or None in 3D view."""
        dims = self.viewer.dims
        if dims.ndisplay != 2 or self.image.ndim != 3:
            return None
        axis = dims.not_displayed[0]  # layer data axis (k, j, i) order
        index = int(np.clip(np.rint(self.image.world_to_data(dims.point)[axis]), 0, self.image.data.shape[axis] - 1))
        return tuple(index if a == 2 - axis else slice(None) for a in range(3))

    def _result_layer(self) -> Any:
        name = f"{self.image.name} scribble result"
        if name in self.viewer.layers:
            return self.viewer.layers[name]
        return show_output(self.viewer, self.image, "labels", np.zeros(self.image.data.shape, np.uint8), name,
                           opacity=0.5)

    def _show_region(self, part: Any) -> None:
        if self.image not in self.viewer.layers:
            return
        if part is not None:
            layer = self._result_layer()
            data = np.asarray(layer.data)
            where = tuple(part.region[a] for a in (2, 1, 0))  # (k, j, i)
            data[where] = to_layer_data(part.labels)
            layer.refresh()
        self.panel.run(lambda *callbacks: volume_job(self.session, *callbacks), self._show_volume,
                       what="segmenting the volume")

    def _show_volume(self, result: Any) -> None:
        if self.image not in self.viewer.layers:
            return
        layer = self._result_layer()
        show_output(self.viewer, self.image, "labels", to_layer_data(result.labels), layer.name,
                    features={"index": [0, *result.classes],
                              "class": ["background", *(f"class {v}" for v in result.classes)]})
        name = f"{self.image.name} scribble uncertainty"
        hidden = {} if name in self.viewer.layers else {"visible": False}  # shown when the user asks
        show_output(self.viewer, self.image, "image", to_layer_data(result.uncertainty), name, colormap="inferno",
                    blending="additive", contrast_limits=(0.0, 1.0), opacity=0.5, **hidden)

    def _finished(self, outcome: Any) -> None:
        if self.pending and not self.panel.busy:
            self.pending = False
            self.update_segmentation(quiet=True)

    # ------------------------------------------------------------------ accept

    def accept(self) -> None:
        """Copy the result into the chosen labels layer where the result is not background."""
        from napari.utils.notifications import show_error, show_info

        name = None if self.image is None else f"{self.image.name} scribble result"
        target = self.target_combo.layer
        try:
            if name not in self.viewer.layers:
                raise Ar3dInputError("there is no scribble result yet: press Start and paint first")
            result = self.viewer.layers[name]
            if target is None or target is result or target is self.scribbles:
                raise Ar3dInputError("choose the labels layer to copy the result into (not the scribbles or result)")
            if not same_grid(target, result):
                raise Ar3dInputError(f"labels layer {target.name!r} is not on the grid of {self.image.name!r}")
        except Ar3dInputError as exc:
            show_error(str(exc))
            return
        data = np.array(target.data)
        found = np.asarray(result.data)
        data[found > 0] = found[found > 0]
        target.data = data
        show_info(f"copied {int((found > 0).sum())} voxels of the scribble result into {target.name!r}")
