"""The model picker shared by the widgets, and the per-viewer list of models it offers.

Models come from three places: the ones shipped inside the package (by name), checkpoint folders
the user chose, and models fine-tuned in this session (kept in a session folder until napari
quits). Each viewer has one `ModelRegistry`; every picker in that viewer shows its models, and a
model fine-tuned by the Fine-tune widget is selected in the pickers that segment.
"""

from __future__ import annotations

import html
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_ar3d.widgets._layers import real_viewer
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QLabel, QWidget

from model_core.errors import Ar3dInputError
from model_core.vocabulary import DEVICES

CHOOSE_FOLDER = "Choose folder…"
ROLE_OBJECTIVES = {  # the objectives a picker's default model may have, by the picker's role
    "segment": ("segmentation",),
    "explain": ("ar",),  # next-token prediction and surprise need the AR head
    "finetune": ("ar", "mae", "alice"),  # start from a pretrained encoder
}


@dataclass(frozen=True)
class ModelEntry:
    """One model the pickers offer."""

    label: str  # what the combo box shows
    source: str  # a shipped model's name or a checkpoint folder


class ModelRegistry(QObject):
    """The models offered in one viewer; `added(entry, select)` tells the pickers about a new one."""

    added = Signal(object, bool)

    def __init__(self) -> None:
        super().__init__()
        from model_core.checkpoint.store import list_shipped

        self.entries: list[ModelEntry] = [ModelEntry(name, name) for name in list_shipped()]
        self._session_dir: Path | None = None

    @property
    def session_dir(self) -> Path:
        """A folder for this session's fine-tuned models, removed when the registry goes away."""
        if self._session_dir is None:
            self._session_dir = Path(tempfile.mkdtemp(prefix="napari-ar3d-session-"))
            weakref.finalize(self, shutil.rmtree, self._session_dir, True)
        return self._session_dir

    def add(self, entry: ModelEntry, select: bool = False) -> ModelEntry:
        """Add `entry` (once) and tell the pickers; `select`: pickers that segment switch to it."""
        known = next((e for e in self.entries if e.source == entry.source), None)
        if known is None:
            self.entries.append(entry)
            known = entry
        self.added.emit(known, select)
        return known


_REGISTRIES: "weakref.WeakKeyDictionary[Any, ModelRegistry]" = weakref.WeakKeyDictionary()


def registry_for(viewer: Any) -> ModelRegistry:
    """The one `ModelRegistry` of `viewer`."""
    viewer = real_viewer(viewer)
    if viewer not in _REGISTRIES:
        _REGISTRIES[viewer] = ModelRegistry()
    return _REGISTRIES[viewer]


def model_card(config: dict) -> str:
    """A few lines about a checkpoint from its config.json (`model_core.checkpoint.card.picker_lines`), as HTML."""
    from model_core.checkpoint.card import picker_lines

    kind, *rest = (html.escape(line) for line in picker_lines(config))
    return "<br>".join([f"<b>{kind}</b>", *rest])


class ModelPicker(QWidget):
    """Model (shipped / folder / this session's), device and the model card.

    role: "segment" pickers switch to a model as soon as it is fine-tuned; "explain" and
    "finetune" pickers only list it.
    """

    changed = Signal()

    def __init__(self, viewer: Any, role: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.role = role
        self.registry = registry_for(viewer)
        self._config: dict | None = None
        self._current = -1

        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(16)  # long names are elided, the dock stays narrow
        self.combo.setToolTip("the model: shipped with napari-ar3d, a checkpoint folder, or fine-tuned here")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip("auto: a CUDA GPU, then Apple MPS, then the CPU")
        self.card = QLabel()
        self.card.setWordWrap(True)
        self.card.setTextFormat(Qt.TextFormat.RichText)
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addRow("model", self.combo)
        layout.addRow("device", self.device_combo)
        layout.addRow(self.card)

        for entry in self.registry.entries:
            self._insert(entry)
        self.combo.addItem(CHOOSE_FOLDER)
        self.combo.setCurrentIndex(self._default_index())
        self.combo.currentIndexChanged.connect(self._on_index)
        self.registry.added.connect(self._on_added)
        self._on_index(self.combo.currentIndex())

    # ------------------------------------------------------------------ state

    @property
    def entry(self) -> ModelEntry | None:
        data = self.combo.itemData(self._current) if self._current >= 0 else None
        return data if isinstance(data, ModelEntry) else None

    @property
    def source(self) -> str | None:
        """The selected model as `model_core` takes it: a shipped name or a folder."""
        return None if self.entry is None else self.entry.source

    @property
    def config(self) -> dict | None:
        """The selected model's config.json (None when it could not be read)."""
        return self._config

    @property
    def device(self) -> str:
        return self.device_combo.currentText()

    def select(self, source: str) -> None:
        """Select the model whose source is `source` (it must be listed)."""
        for i in range(self.combo.count()):
            data = self.combo.itemData(i)
            if isinstance(data, ModelEntry) and data.source == source:
                self.combo.setCurrentIndex(i)
                return
        raise Ar3dInputError(f"model {source!r} is not in the list")

    def add_folder(self, folder: str | Path) -> ModelEntry:
        """Add a checkpoint folder after checking its config.json; raises `Ar3dInputError` if it cannot be read."""
        from model_core.checkpoint.store import read_config

        folder = Path(folder).expanduser().resolve()
        read_config(folder)  # a CheckpointError names the folder and the problem
        entry = self.registry.add(ModelEntry(f"{folder.name}  ({folder.parent})", str(folder)))
        self.select(entry.source)
        return entry

    # ------------------------------------------------------------------ events

    def _default_index(self) -> int:
        """The first model whose objective suits the role (Segment: a segmenter; else an encoder)."""
        from model_core.checkpoint.store import load_config, resolve_model

        wanted = ROLE_OBJECTIVES[self.role]
        for i, entry in enumerate(self.registry.entries):
            try:
                if load_config(resolve_model(entry.source)).objective in wanted:
                    return i
            except Ar3dInputError:
                continue
        return 0 if self.registry.entries else -1

    def _insert(self, entry: ModelEntry) -> None:
        index = self.combo.count() - (1 if self.combo.findText(CHOOSE_FOLDER) >= 0 else 0)
        self.combo.insertItem(index, entry.label, entry)

    def _on_added(self, entry: ModelEntry, select: bool) -> None:
        if all(self.combo.itemData(i) != entry for i in range(self.combo.count())):
            self._insert(entry)
        if select and self.role == "segment":
            self.select(entry.source)

    def _on_index(self, index: int) -> None:
        if index >= 0 and self.combo.itemText(index) == CHOOSE_FOLDER:
            self._choose_folder()
            return
        self._current = index
        self._config, text = None, ""
        if self.entry is not None:
            from model_core.checkpoint.store import read_config, resolve_model

            try:
                self._config = read_config(resolve_model(self.entry.source))
                text = model_card(self._config)
            except Ar3dInputError as exc:
                text = f"<b>cannot read this model:</b> {exc}"
        self.card.setText(text)
        self.changed.emit()

    def open_folder(self, folder: str | Path) -> ModelEntry | None:
        """`add_folder`, telling the user (a notification, no change) when the folder is not a checkpoint."""
        from napari.utils.notifications import show_error

        try:
            return self.add_folder(folder)
        except Ar3dInputError as exc:
            show_error(f"{exc}. Choose a folder written by napari-ar3d (config.json + model.safetensors).")
            return None

    def _choose_folder(self) -> None:
        self.combo.blockSignals(True)
        self.combo.setCurrentIndex(self._current)  # the model in use stays selected until a folder is checked
        self.combo.blockSignals(False)
        folder = QFileDialog.getExistingDirectory(self, "Choose a napari-ar3d checkpoint folder")
        if folder:
            self.open_folder(folder)
