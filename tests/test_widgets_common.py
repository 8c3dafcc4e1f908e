"""Widget infrastructure: the Plugins menu entries, the model picker, the job runner.

The viewer, the small CT phantom, the tiny checkpoints and the waiting / notification helpers that
every `test_widgets_*.py` file uses are fixtures in `conftest.py`.
"""

from __future__ import annotations

import threading

import pytest

WIDGETS = {"Segment": "SegmentWidget", "Explain": "ExplainWidget", "Fine-tune": "FinetuneWidget",
           "Scribble": "ScribbleWidget"}


def test_every_widget_in_the_manifest_opens_from_the_plugins_menu(viewer):
    import npe2

    manifest = npe2.PluginManifest.from_distribution("napari-ar3d")
    names = [w.display_name for w in manifest.contributions.widgets]
    assert sorted(names) == sorted(WIDGETS)
    for name in names:
        _, widget = viewer.window.add_plugin_dock_widget("napari-ar3d", name)
        assert type(widget).__name__ == WIDGETS[name]
        assert widget.viewer is viewer
        assert widget.picker.combo.count() >= 2  # the shipped encoder and "Choose folder…"


def test_the_model_picker_shows_the_shipped_encoder_and_its_card(viewer):
    from napari_ar3d.widgets._models import CHOOSE_FOLDER, ModelPicker

    from model_core.checkpoint.store import list_shipped, read_config, resolve_model

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
def test_each_picker_starts_on_a_shipped_model_that_suits_its_role(viewer, role, default):
    from napari_ar3d.widgets._models import ModelPicker

    picker = ModelPicker(viewer, role)
    assert picker.source == default and picker.config["objective"] in {"segment": ("segmentation",)}.get(role, ("ar",))
    if role == "segment":
        assert "liver" in picker.card.text()  # the card lists the classes
    picker.deleteLater()


def test_a_folder_that_is_not_a_checkpoint_is_refused_with_a_notification(
    viewer, tmp_path, notifications, tiny_ar_checkpoint
):
    from napari_ar3d.widgets._models import ModelPicker

    picker = ModelPicker(viewer, "segment")
    before = [picker.combo.itemText(i) for i in range(picker.combo.count())]
    (tmp_path / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    with notifications() as seen:
        assert picker.open_folder(tmp_path) is None
    assert any("never unpickles" in m for m in seen.errors), [n.message for n in seen]
    assert [picker.combo.itemText(i) for i in range(picker.combo.count())] == before
    assert picker.source == before[0]
    # a real checkpoint folder is added to every picker of the viewer and selected in this one
    other = ModelPicker(viewer, "explain")
    entry = picker.open_folder(tiny_ar_checkpoint)
    assert picker.source == entry.source == str(tiny_ar_checkpoint.resolve())
    assert "autoregressive encoder" in picker.card.text()
    assert any(other.combo.itemData(i) == entry for i in range(other.combo.count()))
    assert other.source != entry.source  # listed, not switched to
    picker.deleteLater()
    other.deleteLater()


def test_job_generator_forwards_progress_and_hands_back_errors_and_cancel():
    from napari_ar3d.widgets._jobs import Notice, job_generator

    from model_core.errors import Ar3dInputError
    from model_core.progress import Cancelled, Progress, check_stop

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
