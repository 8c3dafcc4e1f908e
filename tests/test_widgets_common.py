"""Widget infrastructure: the Plugins menu entries, the model picker, the job runner; helpers for the widget tests.

The other `test_widgets_*.py` files import the helpers below. The tiny models are made once per
test session through the core APIs (an AR checkpoint as `ar3d pretrain` writes it, and a
segmentation model fine-tuned from it with `model_core.finetune`), on the CPU.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PATCH, SPACING = 8, 8.0  # tiny models: 8^3 patches on an 8 mm grid
PHANTOM_SHAPE = (64, 64, 32)
WIDGETS = {"Segment": "SegmentWidget", "Explain": "ExplainWidget", "Fine-tune": "FinetuneWidget"}


# ----------------------------------------------------------------------------- helpers (imported by the other files)


@functools.lru_cache(maxsize=None)
def _session_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ar3d-widget-tests-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.lru_cache(maxsize=None)
def tiny_ar_checkpoint() -> Path:
    """A tiny AR encoder + next-token head checkpoint (CT intensities, 8 mm spacing, 32x32x16 windows)."""
    import torch

    from model_core.checkpoint import make_config, save_checkpoint
    from model_core.models import ViT3D, ViT3DConfig
    from model_core.objectives import AutoregressiveObjective
    from model_core.preprocess import IntensityConfig, PreprocessConfig

    torch.manual_seed(0)
    objective = AutoregressiveObjective(ViT3D(ViT3DConfig(patch_size=PATCH, width=32, depth=2, heads=2)))
    config = make_config(
        objective.encoder.cfg.to_dict(),
        objective="ar",
        heads={"next_token": {"type": "linear", "out_features": PATCH**3}},
        preprocessing=PreprocessConfig((SPACING,) * 3, IntensityConfig("ct")).to_dict(),
        modality="CT",
        provenance={"sequence": {"crop": 32, "slab": 16}, "steps": 0, "data": ["random init (widget tests)"]},
    )
    return save_checkpoint(_session_dir() / "tiny-ar", objective.state_dict(), config)


def ct_phantom(seed: int = 0):
    from napari_ar3d.sample_data.phantoms import make_ct_abdomen

    return make_ct_abdomen(seed, shape=PHANTOM_SHAPE)


@functools.lru_cache(maxsize=None)
def tiny_segmenter() -> Path:
    """A segmentation model (liver, spleen) fine-tuned for a few steps from `tiny_ar_checkpoint`."""
    from model_core.finetune import FinetuneConfig, finetune
    from model_core.io import Volume

    phantom = ct_phantom(0)
    pair = (Volume(phantom.images["ct"], phantom.affine), Volume(phantom.labels, phantom.affine))
    cfg = FinetuneConfig(labels=[1, 2], steps=3, roi=32, crops_per_scan=2, points=512, device="cpu")
    return finetune(tiny_ar_checkpoint(), [pair], _session_dir() / "tiny-seg", cfg,
                    class_names=phantom.class_names).checkpoint


def add_ct(viewer, seed: int = 0, name: str = "ct"):
    """The small CT phantom as the reader / sample data show it: (image layer, labels layer)."""
    from napari_ar3d._sample_data import CT_WINDOW, phantom_layers

    layers = phantom_layers(ct_phantom(seed), name, {"ct": {"contrast_limits": CT_WINDOW}})
    return tuple(getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in layers)


def assert_aligned(layer, image) -> None:
    """`layer` has `image`'s whole transform."""
    for name in ("scale", "translate", "rotate", "shear"):
        assert np.allclose(getattr(layer, name), getattr(image, name)), name
    assert np.allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
    assert layer.data.shape[:3] == image.data.shape


def wait_idle(qtbot, panel, timeout_s: float = 60.0) -> None:
    qtbot.waitUntil(lambda: not panel.busy, timeout=int(timeout_s * 1000))


@contextmanager
def notifications():
    """Collect the napari notifications shown inside the block."""
    from napari.utils.notifications import notification_manager

    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        yield seen
    finally:
        notification_manager.notification_ready.disconnect(seen.append)


def errors(seen: list) -> list[str]:
    return [n.message for n in seen if str(n.severity) == "error"]


def dock(viewer, widget):
    viewer.window.add_dock_widget(widget)
    return widget


# ----------------------------------------------------------------------------- tests


def test_every_widget_in_the_manifest_opens_from_the_plugins_menu(make_napari_viewer):
    import npe2

    manifest = npe2.PluginManifest.from_distribution("napari-ar3d")
    names = [w.display_name for w in manifest.contributions.widgets]
    assert sorted(names) == sorted(WIDGETS)
    viewer = make_napari_viewer()
    for name in names:
        dock_widget, widget = viewer.window.add_plugin_dock_widget("napari-ar3d", name)
        assert type(widget).__name__ == WIDGETS[name]
        assert widget.viewer is viewer
        assert widget.picker.combo.count() >= 2  # the shipped encoder and "Choose folder…"


def test_the_model_picker_shows_the_shipped_encoder_and_its_card(make_napari_viewer):
    from model_core.checkpoint import list_shipped, read_config, resolve_model
    from napari_ar3d.widgets._models import CHOOSE_FOLDER, ModelPicker

    viewer = make_napari_viewer()
    picker = ModelPicker(viewer, "explain")
    shipped = list_shipped()
    assert [picker.combo.itemText(i) for i in range(picker.combo.count())] == [*shipped, CHOOSE_FOLDER]
    assert picker.source == "ar3d-encoder"  # the model with a next-token head, whatever the list's order
    config = read_config(resolve_model(picker.source))
    card = picker.card.text()
    spacing = " × ".join(f"{s:g}" for s in config["preprocessing"]["spacing"])
    assert f"spacing: {spacing} mm" in card
    assert f"steps: {config['provenance']['steps']}" in card
    assert f"modality: {config['modality']}" in card
    assert picker.device == "auto" and [picker.device_combo.itemText(i) for i in range(4)] == [
        "auto", "cpu", "cuda", "mps"]
    picker.deleteLater()


@pytest.mark.parametrize(("role", "default"), [("segment", "ar3d-ct-organs"), ("explain", "ar3d-encoder"),
                                              ("finetune", "ar3d-encoder")])
def test_each_picker_starts_on_a_shipped_model_that_suits_its_role(make_napari_viewer, role, default):
    from napari_ar3d.widgets._models import ModelPicker

    picker = ModelPicker(make_napari_viewer(), role)
    assert picker.source == default and picker.config["objective"] in {"segment": ("segmentation",)}.get(role, ("ar",))
    if role == "segment":
        assert "liver" in picker.card.text()  # the card lists the classes
    picker.deleteLater()


def test_a_folder_that_is_not_a_checkpoint_is_refused_with_a_notification(make_napari_viewer, tmp_path):
    from napari_ar3d.widgets._models import ModelPicker

    viewer = make_napari_viewer()
    picker = ModelPicker(viewer, "segment")
    before = [picker.combo.itemText(i) for i in range(picker.combo.count())]
    (tmp_path / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    with notifications() as seen:
        assert picker.open_folder(tmp_path) is None
    assert any("never unpickles" in m for m in errors(seen)), [n.message for n in seen]
    assert [picker.combo.itemText(i) for i in range(picker.combo.count())] == before
    assert picker.source == before[0]
    # a real checkpoint folder is added to every picker of the viewer and selected in this one
    other = ModelPicker(viewer, "explain")
    entry = picker.open_folder(tiny_ar_checkpoint())
    assert picker.source == entry.source == str(tiny_ar_checkpoint().resolve())
    assert "autoregressive encoder" in picker.card.text()
    assert any(other.combo.itemData(i) == entry for i in range(other.combo.count()))
    assert other.source != entry.source  # listed, not switched to
    picker.deleteLater()
    other.deleteLater()


def test_job_generator_forwards_progress_and_hands_back_errors_and_cancel():
    from model_core.errors import Ar3dInputError
    from model_core.progress import Cancelled, Progress, check_stop
    from napari_ar3d.widgets._jobs import Notice, job_generator

    def run(generator):
        items = []
        try:
            while True:
                items += next(generator)
        except StopIteration as stop:
            return items, stop.value

    def work(progress, should_stop, notify):
        for step in range(3):
            progress(Progress(step + 1, 3, "working"))
        notify("careful")
        return "result"

    items, outcome = run(job_generator(work, threading.Event(), poll_s=0.01))
    assert [i.step for i in items if isinstance(i, Progress)] == [1, 2, 3]
    assert [i.message for i in items if isinstance(i, Notice)] == ["careful"]
    assert (outcome.value, outcome.error, outcome.cancelled) == ("result", None, False)

    def bad(progress, should_stop, notify):
        raise Ar3dInputError("scan.nii: broken")

    _, outcome = run(job_generator(bad, threading.Event(), poll_s=0.01))
    assert isinstance(outcome.error, Ar3dInputError) and not outcome.cancelled

    stop = threading.Event()

    def endless(progress, should_stop, notify):
        while True:
            check_stop(should_stop)
            stop.set()  # as if the user pressed Cancel

    _, outcome = run(job_generator(endless, stop, poll_s=0.01))
    assert outcome.cancelled and outcome.error is None
    with pytest.raises(Cancelled):
        check_stop(stop.is_set)
