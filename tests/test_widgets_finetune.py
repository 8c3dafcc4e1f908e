"""The Fine-tune widget in a real viewer: train, hand the model to Segment, save, cancel, refuse bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest

FAST = {"window": 32, "crops_per_scan": 2, "points": 1024}  # FinetuneConfig fields that keep a CPU test short


@pytest.fixture
def widgets(docked, tiny_ar_checkpoint):
    """(Fine-tune widget starting from the tiny AR encoder, Segment widget) docked in one viewer."""
    from napari_ar3d.widgets.finetune import FinetuneWidget
    from napari_ar3d.widgets.segment import SegmentWidget

    finetune = docked(FinetuneWidget)
    segment = docked(SegmentWidget)
    finetune.picker.open_folder(tiny_ar_checkpoint)
    finetune.options = dict(FAST)
    return finetune, segment


def test_training_hands_the_model_to_segment_and_leaves_the_labels_untouched(widgets, tmp_path, add_ct, wait_idle,
                                                                             notifications, tiny_ar_checkpoint):
    from model_core.checkpoint.store import load_checkpoint, read_config

    finetune, segment = widgets
    viewer = finetune.viewer
    _, labels = add_ct(viewer)
    labels_data, labels_bytes = labels.data, np.asarray(labels.data).tobytes()
    assert finetune.class_selection()[1] == (True, "liver")  # names from the layer's features
    finetune.set_classes({1: "liver", 2: "spleen"})
    finetune.steps_spin.setValue(6)
    finetune.train()
    assert finetune.panel.busy and not finetune.train_button.isEnabled()
    wait_idle(finetune.panel)

    assert labels.data is labels_data and np.asarray(labels.data).tobytes() == labels_bytes
    model = finetune.last_model
    assert model is not None and read_config(model)["classes"] == ["liver", "spleen"]
    assert finetune.plot.steps == list(range(1, 7)) and np.isfinite(finetune.plot.loss).all()
    assert all(0.0 <= d <= 1.0 for d in finetune.plot.dice)
    assert segment.picker.source == str(model)  # selected in the Segment widget
    assert finetune.picker.source == str(tiny_ar_checkpoint.resolve())  # the starting point did not move
    segment.run()
    wait_idle(segment.panel)
    assert segment.segmenter.path == model
    assert list(viewer.layers["ct segmentation"].features["class"]) == ["background", "liver", "spleen"]

    saved = finetune.save_model(tmp_path / "my-model")
    original, copy = load_checkpoint(model), load_checkpoint(saved)
    assert copy.config == original.config
    assert all(np.array_equal(copy.state_dict[k].numpy(), v.numpy()) for k, v in original.state_dict.items())
    with notifications() as seen:
        assert finetune.save_model(tmp_path / "my-model") is None  # not empty any more
    assert any("not an empty folder" in m for m in seen.errors)


@pytest.mark.parametrize("mode", ["head", "full"])
def test_cancel_stops_within_two_seconds_and_keeps_the_model_in_use(widgets, qtbot, mode, add_ct, wait_idle,
                                                                     tiny_segmenter):
    finetune, segment = widgets
    viewer = finetune.viewer
    add_ct(viewer)
    if mode == "full":  # the shipped encoder with its 96^3 windows: a step takes seconds, Cancel must not wait for it
        finetune.picker.select("ar3d-encoder")
        finetune.options = {"crops_per_scan": 2}
    finetune.mode_combo.setCurrentText(mode)
    segment.picker.open_folder(tiny_segmenter)
    segment.run()  # the model in use is loaded
    wait_idle(segment.panel)
    in_use = segment.segmenter
    before = {k: v.clone() for k, v in in_use.model.state_dict().items()}
    entries = list(finetune.picker.registry.entries)
    session = finetune.picker.registry.session_dir
    finetune.set_classes({1: "liver"})
    finetune.steps_spin.setValue(100_000)
    finetune.train()
    qtbot.waitUntil(lambda: len(finetune.plot.steps) >= 1, timeout=120_000)  # training is under way
    if mode == "full":
        qtbot.wait(500)  # inside the second step
    t0 = time.monotonic()
    finetune.panel.cancel_button.click()
    wait_idle(finetune.panel, timeout_s=5.0)
    elapsed = time.monotonic() - t0
    assert elapsed <= 2.0, f"cancel took {elapsed:.2f} s"
    assert "cancelled" in finetune.panel.status.text()
    assert finetune.last_model is None and not finetune.save_button.isEnabled()
    assert finetune.picker.registry.entries == entries
    assert segment.picker.source == str(tiny_segmenter.resolve()) and segment.segmenter is in_use
    after = in_use.model.state_dict()
    assert all(np.array_equal(after[k].numpy(), v.numpy()) for k, v in before.items())
    assert list(session.iterdir()) == []  # the partial model and its hidden work folder were removed

    if mode == "head":  # the state is consistent: training again works
        finetune.steps_spin.setValue(2)
        finetune.train()
        wait_idle(finetune.panel)
        assert finetune.last_model is not None and finetune.last_model.parent == session


def test_sparse_scribbles_with_a_background_label_train(widgets, add_ct, wait_idle):
    finetune, _ = widgets
    viewer = finetune.viewer
    image, labels = add_ct(viewer)
    truth = np.asarray(labels.data)
    rng = np.random.default_rng(0)
    scribbles = np.zeros_like(truth)
    for value, target in ((1, 1), (0, 9)):  # a few liver voxels, and background painted as 9
        where = np.argwhere(truth == value)
        scribbles[tuple(where[rng.choice(len(where), 300)].T)] = target
    viewer.add_labels(scribbles, name="scribbles", affine=image.affine.affine_matrix)
    finetune.pair_combos()[0][1].setCurrentText("scribbles")
    finetune.annotation_combo.setCurrentText("sparse")
    finetune.background_combo.setCurrentText("9: label_9")
    assert sorted(finetune.class_selection()) == [1]  # the background label is not a class to learn
    finetune.steps_spin.setValue(3)
    finetune.train()
    wait_idle(finetune.panel)
    from model_core.checkpoint.store import read_config

    label_map = read_config(finetune.last_model)["provenance"]["label_map"]
    assert label_map == {"classes": {"liver": [1]}, "background": [9], "ignored": [0]}


def _layers(viewer) -> list[tuple[str, bytes]]:
    return [(layer.name, np.asarray(layer.data).tobytes()) for layer in viewer.layers]


@pytest.mark.parametrize("problem", ["no image", "no labels", "shape", "grid", "empty", "no class"])
def test_bad_setups_are_notifications_and_change_nothing(widgets, problem, add_ct, notifications):
    finetune, _ = widgets
    viewer = finetune.viewer
    expected = {
        "no image": "no image layer",
        "no labels": "no labels layer",
        "shape": "paint the labels on the image's grid",
        "grid": "is not aligned with image 'ct'",
        "empty": "is empty; paint at least one structure",
        "no class": "no class to learn",
    }[problem]
    if problem != "no image":
        image, labels = add_ct(viewer)
        if problem == "no labels":
            viewer.layers.remove(labels)
        elif problem == "shape":
            viewer.add_labels(np.ones((10, 20, 30), np.uint8), name="cropped")
            finetune.pair_combos()[0][1].setCurrentText("cropped")
        elif problem == "grid":
            labels.translate = (5.0, 0.0, 0.0)
        elif problem == "empty":
            viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="blank", affine=image.affine.affine_matrix)
            finetune.pair_combos()[0][1].setCurrentText("blank")
        elif problem == "no class":
            finetune.set_classes({})
    before = _layers(viewer)
    with notifications() as seen:
        finetune.train()
    assert not finetune.panel.busy
    assert any(expected in m for m in seen.errors), [n.message for n in seen]
    assert _layers(viewer) == before
    assert finetune.last_model is None
