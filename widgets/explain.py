"""Explain: what an autoregressive encoder attends to and expects, as overlays on an image layer.

Click a voxel (pan / zoom mode, a click without dragging) or add a point to the "<image> query"
points layer: the attention map of that voxel appears as "<image> attention". Buttons compute the
next-token prediction, the surprise map and the PCA features (`model_core.inference.explain`, the same
functions as `ar3d explain`). The image's model grid (`explain.prepare`) is cached per layer and
model, so a click only runs the encoder on one window.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import napari
import numpy as np
from napari_ar3d.widgets._jobs import preload, run_on_device
from napari_ar3d.widgets._layers import (
    aligned_kwargs,
    check_volume_layer,
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
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from model_core.errors import Ar3dInputError

MAPS = {  # button text -> (output suffix, model_core.inference.explain function name)
    "Next-token prediction": ("prediction", "next_token_prediction"),
    "Surprise map": ("surprise", "surprise_map"),
    "PCA features": ("PCA", "pca_features"),
}


class ExplainState:
    """The loaded model and the prepared grids, used by the jobs (one at a time); no Qt."""

    def __init__(self) -> None:
        self.model_key: tuple | None = None
        self.model: Any = None
        self.grids: dict[int, tuple[tuple, Any]] = {}  # id(layer) -> (key, ModelGrid)

    def load(self, source: str, device: Any) -> Any:
        from model_core.checkpoint.store import WEIGHTS_FILE, resolve_model
        from model_core.inference.explain import load_explain_model

        folder = resolve_model(source)
        weights = Path(folder) / WEIGHTS_FILE
        key = (os.fspath(folder), weights.stat().st_mtime_ns if weights.is_file() else None)
        if key != self.model_key:
            self.model, self.model_key = load_explain_model(folder, device), key
            self.grids.clear()
        return self.model.to(device)

    def grid(self, layer_id: int, data_id: int, volume: Any) -> Any:
        """`explain.prepare(model, volume)`, reused while the layer's data and the model are the same."""
        from model_core.inference.explain import prepare

        key = (self.model_key, data_id)
        cached = self.grids.get(layer_id)
        if cached is None or cached[0] != key:
            self.grids[layer_id] = (key, prepare(self.model, volume))
        return self.grids[layer_id][1]


def explain_job(
    state: ExplainState,
    source: str,
    device: str,
    layer_key: tuple[int, int],
    volume: Any,
    compute: Callable[[Any, Any, Any, Any], np.ndarray],
    progress: Any,
    should_stop: Any,
    notify: Any,
) -> np.ndarray:
    """Load the model, prepare (or reuse) the grid, then `compute(model, grid, progress, should_stop)`."""

    def run(dev: Any) -> np.ndarray:
        model = state.load(source, dev)
        grid = state.grid(*layer_key, volume)
        return compute(model, grid, progress, should_stop)

    return run_on_device(run, device, notify)


class ExplainWidget(QWidget):
    """Attention of a clicked voxel, next-token prediction, surprise and PCA features of an image layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer = real_viewer(napari_viewer)
        preload("model_core.inference.explain")
        self.state = ExplainState()
        self._pending: tuple[Any, tuple[int, int, int]] | None = None

        self.image_combo = LayerCombo(napari_viewer, "image")
        self.picker = ModelPicker(napari_viewer, "explain")
        self.block_spin = QSpinBox()
        self.block_spin.setToolTip("encoder block whose attention is shown (-1: the last)")
        self.rollout_check = QCheckBox("attention rollout up to this block")
        hint = QLabel("Click a voxel of the image (pan / zoom mode) or add a point to the "
                      "'<image> query' points layer to see where that voxel's token attends.")
        hint.setWordWrap(True)
        self.map_buttons = {text: QPushButton(text) for text in MAPS}
        self.panel = JobPanel()

        model_box = QGroupBox("Model")
        QVBoxLayout(model_box).addWidget(self.picker)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("attention block", self.block_spin)
        form.addRow(self.rollout_check)
        buttons = QHBoxLayout()
        for button in self.map_buttons.values():
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(model_box)
        layout.addLayout(form)
        layout.addWidget(hint)
        layout.addLayout(buttons)
        layout.addWidget(self.panel)
        layout.addStretch(1)

        for text, button in self.map_buttons.items():
            button.clicked.connect(lambda _=False, t=text: self.compute_map(t))
        self.picker.changed.connect(self._model_changed)
        self.panel.finished.connect(self._job_finished)
        napari_viewer.mouse_drag_callbacks.append(self._on_mouse)
        napari_viewer.layers.events.removed.connect(self._layer_removed)
        self.destroyed.connect(lambda *_: self._disconnect(napari_viewer))
        self._model_changed()

    def _disconnect(self, viewer: Any) -> None:
        if self._on_mouse in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.remove(self._on_mouse)
        viewer.layers.events.removed.disconnect(self._layer_removed)

    # ------------------------------------------------------------------ inputs

    def _model_changed(self) -> None:
        depth = int(((self.picker.config or {}).get("encoder") or {}).get("depth", 1))
        self.block_spin.setRange(-1, depth - 1)
        self.block_spin.setValue(-1)

    def _layer_removed(self, event: Any) -> None:
        self.state.grids.pop(id(event.value), None)

    def _inputs(self) -> tuple[Any, str, Any]:
        """(image layer, model source, volume), or `Ar3dInputError` naming what is missing."""
        image = self.image_combo.layer
        check_volume_layer(image)
        source, config = self.picker.source, self.picker.config
        if source is None or config is None:
            raise Ar3dInputError("choose an autoregressive encoder (e.g. ar3d-encoder) in the model list first")
        if "next_token" not in (config.get("heads") or {}):
            raise Ar3dInputError(
                f"model {Path(source).name!r} has no next-token head; Explain needs an autoregressive encoder "
                "such as ar3d-encoder, not a fine-tuned segmentation model"
            )
        return image, source, layer_volume(image)

    def _start(self, what: str, image: Any, source: str, volume: Any, compute: Callable, show: Callable) -> None:
        key = (id(image), id(image.data))
        args = (self.state, source, self.picker.device, key, volume, compute)
        self._set_buttons(False)
        self.panel.run(lambda *callbacks: explain_job(*args, *callbacks), lambda out: show(image, out), what=what)

    def _set_buttons(self, enabled: bool) -> None:
        for button in self.map_buttons.values():
            button.setEnabled(enabled)

    def _job_finished(self, _outcome: Any) -> None:
        self._set_buttons(True)
        if self._pending is not None:
            image, query = self._pending
            self._pending = None
            if image in self.viewer.layers:
                self.attention(query, image)

    # ------------------------------------------------------------------ attention

    def _on_mouse(self, viewer: Any, event: Any):
        """A left click without drag, in pan / zoom mode, asks for the attention of the voxel under the mouse."""
        active = viewer.layers.selection.active
        if event.button != 1 or event.modifiers or getattr(active, "mode", "pan_zoom") != "pan_zoom":
            return
        if not self.isVisible():
            return
        position = tuple(event.position)
        yield
        if event.type == "mouse_move":
            return  # a drag pans the view
        self.click(position)

    def click(self, world_position: tuple[float, ...]) -> None:
        """Put the query point at a world position (the voxel under it) and compute its attention."""
        from napari.utils.notifications import show_error

        image = self.image_combo.layer
        if image is None or image.data.ndim != 3:
            return
        kji = np.rint(np.asarray(image.world_to_data(world_position), dtype=float)[-3:]).astype(int)
        if np.any(kji < 0) or np.any(kji >= np.array(image.data.shape)):
            show_error(f"the point clicked is outside image {image.name!r}; click inside the volume")
            return
        self.query_layer(image).data = kji[None].astype(float)  # its data event starts the job

    def query_layer(self, image: Any) -> Any:
        """The "<image> query" points layer (created on the image's transform when missing)."""
        name = f"{image.name} query"
        if name in self.viewer.layers:
            return self.viewer.layers[name]
        kwargs = aligned_kwargs(image)
        layer = self.viewer.add_points(np.empty((0, 3)), name=name, size=6, face_color="cyan",
                                       border_color="white", border_width=0.2, symbol="cross", **kwargs)
        layer.events.data.connect(lambda event, img=image: self._query_moved(img, event))
        self.viewer.layers.selection.active = image  # clicks keep landing on the image
        return layer

    def _query_moved(self, image: Any, event: Any) -> None:
        if str(getattr(event, "action", "changed")) not in ("added", "changed") or not len(event.source.data):
            return
        kji = np.rint(event.source.data[-1]).astype(int)
        self.attention(tuple(int(v) for v in kji[::-1]), image)

    def attention(self, query_ijk: tuple[int, int, int], image: Any | None = None) -> None:
        """The attention map of voxel `query_ijk` (file order i, j, k) of `image` (default: the selected one)."""
        from napari.utils.notifications import show_error

        from model_core.inference.explain import attention_map

        if self.panel.busy:
            self._pending = (image or self.image_combo.layer, tuple(query_ijk))
            return
        try:
            selected, source, volume = self._inputs()
        except Ar3dInputError as exc:
            show_error(str(exc))
            return
        image = image or selected
        if image is not selected:
            volume = layer_volume(image)
        block, rollout = self.block_spin.value(), self.rollout_check.isChecked()

        def compute(model: Any, grid: Any, progress: Any, should_stop: Any) -> np.ndarray:
            return attention_map(model, grid, query_ijk, layer=block, rollout=rollout,
                                 progress=progress, should_stop=should_stop)

        self._start(f"attention of voxel {tuple(query_ijk)}", image, source, volume, compute, self._show_attention)

    def _show_attention(self, image: Any, attention: np.ndarray) -> None:
        if image not in self.viewer.layers:
            return
        limits = percentile_limits(attention, 50.0, 99.5, mask=attention > 0)
        show_output(self.viewer, image, "image", to_layer_data(attention), f"{image.name} attention",
                    colormap="inferno", blending="additive", contrast_limits=limits, opacity=0.9)
        self.viewer.layers.selection.active = image

    # ------------------------------------------------------------------ whole-volume maps

    def compute_map(self, text: str) -> None:
        """Run one of `MAPS` ("Next-token prediction", "Surprise map", "PCA features") on the selected image."""
        from napari.utils.notifications import show_error

        import model_core.inference.explain as explain

        if self.panel.busy:
            return
        try:
            image, source, volume = self._inputs()
        except Ar3dInputError as exc:
            show_error(str(exc))
            return
        suffix, function = MAPS[text]
        fn = getattr(explain, function)

        def compute(model: Any, grid: Any, progress: Any, should_stop: Any) -> np.ndarray:
            return fn(model, grid, progress=progress, should_stop=should_stop)

        self._start(f"{text.lower()} of {image.name}", image, source, volume, compute,
                    lambda img, out: self._show_map(img, suffix, out))

    def _show_map(self, image: Any, suffix: str, data: np.ndarray) -> None:
        if image not in self.viewer.layers:
            return
        name = f"{image.name} {suffix}"
        if suffix == "PCA":  # (I, J, K, 3) in [0, 1]
            show_output(self.viewer, image, "image", to_layer_data(data), name, rgb=True, contrast_limits=(0.0, 1.0))
        elif suffix == "surprise":
            show_output(self.viewer, image, "image", to_layer_data(data), name, colormap="turbo",
                        blending="additive", opacity=0.6, contrast_limits=percentile_limits(data, 2.0, 99.0))
        else:  # the prediction, in the model's [0, 1] intensity scale
            show_output(self.viewer, image, "image", to_layer_data(data), name, colormap="gray",
                        contrast_limits=percentile_limits(data, 0.5, 99.5))
        self.viewer.layers.selection.active = image
