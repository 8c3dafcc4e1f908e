"""Fine-tuning: class selection, input checks, layer-wise lr decay, the written checkpoint, cancel, accuracy."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from model_core.checkpoint.store import (
    TRAIN_STATE_DIR,
    load_checkpoint,
    make_config,
    read_config,
    save_checkpoint,
)
from model_core.data.finetuning import CropDataset, check_pair, class_map, prepare_scan
from model_core.data.phantoms import CT_CLASSES, make_ct_abdomen
from model_core.errors import Ar3dInputError
from model_core.inference.segment import load_segmenter, segment
from model_core.io.volume import Volume
from model_core.models.segmentation import SegmentationModel, build_decoder
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.segmentation import SegmentationObjective, layer_decay_groups
from model_core.progress import Cancelled
from model_core.training.finetune import FinetuneConfig, finetune
from model_core.training.resume import work_folder
from model_core.vocabulary import IGNORE

TINY = ViT3DConfig(patch_size=8, width=48, depth=4, heads=2)
NAMES = {1: "liver", 2: "spleen", 3: "kidney", 9: "background"}


def small_phantom(seed: int) -> tuple[Volume, Volume]:
    ph = make_ct_abdomen(seed, shape=(48, 40, 24))
    return Volume(ph.images["ct"], ph.affine, f"ct{seed}.nii.gz"), Volume(ph.labels, ph.affine, f"seg{seed}.nii.gz")


def quick(**kw) -> FinetuneConfig:
    base = {"steps": 4, "crops_per_scan": 2, "points": 512, "window": 32, "spacing": (8.0, 8.0, 8.0), "scratch_config": TINY,
                "device": "cpu"}
    return FinetuneConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- classes


def test_all_labels_become_classes_in_value_order():
    cmap = class_map({0, 3, 1, 2}, NAMES, FinetuneConfig())
    assert cmap.classes == ["liver", "spleen", "kidney"]
    assert cmap.lut(3).tolist() == [0, 1, 2, 3]


def test_selected_labels_and_merges():
    cmap = class_map({0, 1, 2, 3, 4}, NAMES, FinetuneConfig(labels=[2], merge={"organs": [1, 3]}))
    assert cmap.classes == ["spleen", "organs"]
    assert cmap.lut(4).tolist() == [0, 2, 1, 2, 0]  # 4: neither kept nor merged -> background
    merged_only = class_map({0, 1, 2, 3, 4}, NAMES, FinetuneConfig(merge={"tumor": [1, 2, 3, 4]}))
    assert merged_only.classes == ["tumor"] and merged_only.lut(4).tolist() == [0, 1, 1, 1, 1]


def test_labels_that_do_not_occur_are_refused():
    with pytest.raises(Ar3dInputError, match=r"label value\(s\) 7 do not occur .*found 1, 2"):
        class_map({0, 1, 2}, NAMES, FinetuneConfig(labels=[1, 7]))
    with pytest.raises(Ar3dInputError, match="both kept and merged"):
        class_map({0, 1, 2}, NAMES, FinetuneConfig(labels=[1], merge={"x": [1, 2]}))


def test_sparse_annotation_ignores_zero_and_needs_a_background_label():
    cmap = class_map({0, 1, 9}, NAMES, FinetuneConfig(annotation="sparse"))  # 9 is named "background"
    lut = cmap.lut(9)
    assert cmap.classes == ["liver"]
    assert lut[0] == IGNORE and lut[9] == 0 and lut[1] == 1
    by_value = class_map({0, 1, 5}, {}, FinetuneConfig(annotation="sparse", background_label=5))
    assert by_value.lut(5)[5] == 0 and by_value.classes == ["label_1"]
    with pytest.raises(Ar3dInputError, match="background label"):
        class_map({0, 1, 2}, NAMES, FinetuneConfig(annotation="sparse"))


# ----------------------------------------------------------------------------- input checks


def test_an_image_and_a_segmentation_on_different_grids_are_refused():
    image, seg = small_phantom(0)
    other = Volume(seg.array[:, :, :20], seg.affine, "short_seg.nii.gz")
    with pytest.raises(Ar3dInputError) as err:
        check_pair(image, other, "ct0.nii.gz", "short_seg.nii.gz")
    message = str(err.value)
    assert "ct0.nii.gz" in message and "short_seg.nii.gz" in message
    assert "(48, 40, 24)" in message and "(48, 40, 20)" in message
    moved = Volume(seg.array, seg.affine + np.diag([0, 0, 0.5, 0]), "moved_seg.nii.gz")
    with pytest.raises(Ar3dInputError, match="moved_seg.nii.gz.*not on the same voxel grid"):
        check_pair(image, moved, "ct0.nii.gz", "moved_seg.nii.gz")


def test_an_empty_segmentation_is_refused():
    image, seg = small_phantom(0)
    empty = Volume(np.zeros_like(seg.array), seg.affine, "empty.nii.gz")
    with pytest.raises(Ar3dInputError, match="empty.nii.gz: segmentation is empty"):
        check_pair(image, empty, "ct0.nii.gz", "empty.nii.gz")


@pytest.mark.parametrize("problem", ["unknown model", "missing label", "empty", "grid"])
def test_bad_inputs_write_nothing(tmp_path, problem):
    image, seg = small_phantom(0)
    model, cfg = "scratch", quick()
    if problem == "unknown model":
        model = "no-such-model"
    elif problem == "missing label":
        cfg = quick(labels=[1, 42])
    elif problem == "empty":
        seg = Volume(np.zeros_like(seg.array), seg.affine, "empty.nii.gz")
    else:
        seg = Volume(seg.array[1:], seg.affine, "cut.nii.gz")
    with pytest.raises(Ar3dInputError):
        finetune(model, [(image, seg)], tmp_path / "out", cfg)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- optimisation


def test_layer_wise_lr_decay():
    model = SegmentationModel(ViT3D(TINY), build_decoder("unetr", TINY, 2))
    groups = layer_decay_groups(SegmentationObjective(model, frozen_encoder=False), 1e-3, 0.01, 0.75)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    d = TINY.depth
    assert lr_of[id(model.encoder.blocks[-1].mlp[0].weight)] == (pytest.approx(1e-3 * 0.75), 0.01)
    assert lr_of[id(model.encoder.blocks[0].mlp[0].weight)][0] == pytest.approx(1e-3 * 0.75**d)
    assert lr_of[id(model.encoder.patch_embed.weight)][0] == pytest.approx(1e-3 * 0.75 ** (d + 1))
    assert lr_of[id(model.encoder.start_token)][1] == 0.0
    assert lr_of[id(model.decoder.out.conv.conv.weight)] == (pytest.approx(1e-3), 0.01)
    assert lr_of[id(model.encoder.blocks[0].norm1.bias)][1] == 0.0
    n_params = sum(1 for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_params


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", ["head", "full"])
def test_finetune_writes_a_complete_segmentation_checkpoint(tmp_path, mode):
    pairs = [small_phantom(0), small_phantom(1)]
    reports = []
    result = finetune("scratch", pairs, tmp_path / "model", quick(mode=mode, labels=[1, 2]),
                      class_names=CT_CLASSES, provenance={"command": "test"}, progress=reports.append)
    assert result.checkpoint == tmp_path / "model" and not result.cancelled and result.steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no work folder left behind
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert "config.json" in files and "model.safetensors" in files and TRAIN_STATE_DIR not in files
    config = read_config(tmp_path / "model")
    assert config["classes"] == ["liver", "spleen"]
    assert config["modality"] == "CT"
    assert config["preprocessing"]["spacing"] == [8.0, 8.0, 8.0]
    assert config["preprocessing"]["intensity"]["kind"] == "ct"
    assert config["preprocessing"]["intensity"]["window"] == [-160.0, 240.0]  # scratch: the soft-tissue window
    head = config["heads"]["segmentation"]
    assert head["decoder"]["kind"] == ("light" if mode == "head" else "unetr") and head["window"] == [32, 32, 32]
    prov = config["provenance"]
    assert prov["mode"] == mode and prov["encoder"] == "scratch" and prov["command"] == "test"
    assert prov["label_map"]["classes"] == {"liver": [1], "spleen": [2]}
    assert np.isfinite(prov["metrics"]["loss"])
    messages = {r.message for r in reports}
    assert "training" in messages and ("caching encoder features" in messages) == (mode == "head")
    assert all("dice" in r.metrics for r in reports if r.message == "training")
    segmenter = load_segmenter(tmp_path / "model")
    assert segmenter.classes == ["liver", "spleen"]
    out = segment(segmenter, pairs[0][0], device="cpu")
    assert out.labels.shape == pairs[0][0].shape and out.labels.max() <= 2


def test_finetune_from_a_pretrained_encoder_keeps_its_preprocessing(tmp_path):
    torch.manual_seed(0)
    encoder = ViT3D(TINY)
    config = make_config(TINY.to_dict(), objective="ar", modality="MRI",
                         preprocessing={"spacing": [6.0, 6.0, 6.0], "intensity": None},
                         provenance={"steps": 7, "data": ["somewhere"]})
    save_checkpoint(tmp_path / "enc", {f"encoder.{k}": v for k, v in encoder.state_dict().items()}, config)
    with pytest.warns(UserWarning, match="pretrained on MRI"):
        finetune(tmp_path / "enc", [small_phantom(0)], tmp_path / "seg", quick(spacing=None, labels=[1]))
    saved = read_config(tmp_path / "seg")
    assert saved["preprocessing"]["spacing"] == [6.0, 6.0, 6.0]
    assert saved["provenance"]["encoder_provenance"]["steps"] == 7
    segmenter = load_segmenter(tmp_path / "seg")
    state = segmenter.model.encoder.state_dict()
    untouched = encoder.state_dict()  # head mode: the encoder is frozen
    assert all(torch.equal(state[k], untouched[k]) for k in state)


def test_a_ct_window_is_for_a_new_encoder_only(tmp_path):
    save_checkpoint(tmp_path / "enc", {f"encoder.{k}": v for k, v in ViT3D(TINY).state_dict().items()},
                    make_config(TINY.to_dict(), objective="ar", modality="CT"))
    with pytest.raises(Ar3dInputError, match=r"ct_window \(-100.0, 200.0\) is for a new encoder"):
        finetune(tmp_path / "enc", [small_phantom(0)], tmp_path / "seg", quick(ct_window=(-100, 200), labels=[1]))
    assert not (tmp_path / "seg").exists()
    finetune("scratch", [small_phantom(0)], tmp_path / "new", quick(ct_window=(-100, 200), labels=[1]))
    assert read_config(tmp_path / "new")["preprocessing"]["intensity"]["window"] == [-100.0, 200.0]
    with pytest.raises(Ar3dInputError, match="low < high"):
        quick(ct_window=(300, 200))


@pytest.mark.parametrize("name", ["zoom", "rotate"])
def test_zoom_and_rotation_must_be_below_one(name):
    with pytest.raises(Ar3dInputError, match=f"FinetuneConfig.{name} must be in"):
        quick(**{name: 1.5})


def test_zoom_and_rotation_change_the_crops_but_keep_their_size_and_labels():
    rng = np.random.default_rng(0)
    image = rng.random((40, 40, 40), dtype=np.float32)
    target = np.zeros((40, 40, 40), np.uint8)
    target[10:30, 12:28, 8:30] = 1
    target[0:4] = IGNORE
    scan = prepare_scan(image, target, (24, 24, 24), "img", "seg")
    plain = CropDataset([scan], (24,) * 3, quick(zoom=0.0, rotate=0.0, intensity_jitter=0.0), seed=1)[0]
    warped = CropDataset([scan], (24,) * 3, quick(zoom=0.15, rotate=0.1, intensity_jitter=0.0), seed=1)[0]
    assert warped["volumes"].shape == plain["volumes"].shape == (1, 24, 24, 24)
    assert warped["labels"].shape == (1, 24, 24, 24)
    assert set(np.unique(warped["labels"].numpy())) <= {0, 1, IGNORE}  # nearest: no blended label values
    assert not torch.allclose(warped["volumes"], plain["volumes"])


def test_sparse_scribbles_train(tmp_path):
    image, seg = small_phantom(0)
    scribbles = np.zeros_like(seg.array)
    liver = np.argwhere(seg.array == 1)
    outside = np.argwhere(seg.array == 0)
    rng = np.random.default_rng(0)
    for idx in liver[rng.choice(len(liver), 60)]:
        scribbles[tuple(idx)] = 1
    for idx in outside[rng.choice(len(outside), 200)]:
        scribbles[tuple(idx)] = 9
    result = finetune("scratch", [(image, Volume(scribbles, seg.affine, "scribbles.nii.gz"))], tmp_path / "m",
                      quick(annotation="sparse"), class_names={1: "liver", 9: "background"})
    assert result.classes == ["liver"]
    assert read_config(tmp_path / "m")["provenance"]["label_map"] == {
        "classes": {"liver": [1]}, "background": [9], "ignored": [0]}


def test_a_volume_smaller_than_a_window_is_padded(tmp_path):
    image, seg = small_phantom(0)  # about 48 x 40 x 27 voxels at 8 mm: padded to 64^3 windows
    result = finetune("scratch", [(image, seg)], tmp_path / "m", quick(labels=[1], window=64))
    assert result.steps == 4


def test_cancel_before_training_writes_nothing_and_during_training_keeps_the_model(tmp_path):
    pairs = [small_phantom(0)]
    with pytest.raises(Cancelled):
        finetune("scratch", pairs, tmp_path / "a", quick(), should_stop=lambda: True)
    assert list(tmp_path.iterdir()) == []
    state = {"training": 0}

    def stop_after_two_steps() -> bool:
        return state["training"] >= 2

    def count(p) -> None:
        if p.message == "training":
            state["training"] = p.step

    result = finetune("scratch", pairs, tmp_path / "b", quick(steps=10), progress=count,
                      should_stop=stop_after_two_steps)
    assert result.cancelled and result.steps == 2
    assert read_config(tmp_path / "b")["provenance"]["cancelled"] is True


def test_an_output_folder_with_a_checkpoint_is_refused(tmp_path):
    finetune("scratch", [small_phantom(0)], tmp_path / "m", quick(labels=[1]))
    with pytest.raises(Ar3dInputError, match="already holds a checkpoint"):
        finetune("scratch", [small_phantom(0)], tmp_path / "m", quick(labels=[1]))


# ----------------------------------------------------------------------------- kill and resume


def _kill_after(step: int):
    """A progress callback that dies like a kill after training step `step` (KeyboardInterrupt keeps the work folder)."""

    def progress(p) -> None:
        if p.message == "training" and p.step == step:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize("mode", ["head", "full"])
def test_resume_after_a_kill_equals_one_run(tmp_path, mode):
    pairs = [small_phantom(0)]
    cfg = quick(mode=mode, labels=[1], steps=6, ckpt_every=2)
    finetune("scratch", pairs, tmp_path / "straight", cfg)

    with pytest.raises(KeyboardInterrupt):
        finetune("scratch", pairs, tmp_path / "b", cfg, progress=_kill_after(5))
    work = work_folder(tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert read_config(work)["provenance"]["steps"] == 4  # the last complete checkpoint
    with pytest.raises(Ar3dInputError, match="interrupted at step 4; continue it with --resume"):
        finetune("scratch", pairs, tmp_path / "b", cfg)

    steps = []
    resumed = replace(cfg, ckpt_every=3)  # checkpoint spacing (and device) may change on resume
    result = finetune("scratch", pairs, tmp_path / "b", resumed, resume=True,
                      progress=lambda p: steps.append(p.step) if p.message == "training" else None)
    assert steps == [5, 6] and result.steps == 6 and not result.cancelled
    assert not work.exists() and TRAIN_STATE_DIR not in {p.name for p in (tmp_path / "b").iterdir()}
    want, got = load_checkpoint(tmp_path / "straight").state_dict, load_checkpoint(tmp_path / "b").state_dict
    assert want.keys() == got.keys()
    worst = max((want[k].float() - got[k].float()).abs().max().item() for k in want)
    assert worst < 1e-6, worst


def test_resume_with_other_settings_or_data_is_refused(tmp_path):
    image, seg = small_phantom(0)
    cfg = quick(labels=[1], steps=4, ckpt_every=2)
    with pytest.raises(KeyboardInterrupt):
        finetune("scratch", [(image, seg)], tmp_path / "m", cfg, progress=_kill_after(3))
    with pytest.raises(Ar3dInputError, match="the steps, lr of this run differ from the interrupted run's"):
        finetune("scratch", [(image, seg)], tmp_path / "m", replace(cfg, steps=8, lr=1e-2), resume=True)
    changed = Volume(image.array + np.float32(1.0), image.affine, image.path)  # same name, other voxels
    with pytest.raises(Ar3dInputError, match="the training data contents of this run differ"):
        finetune("scratch", [(changed, seg)], tmp_path / "m", cfg, resume=True)
    assert read_config(work_folder(tmp_path / "m"))["provenance"]["steps"] == 2  # refusals keep the run
    assert finetune("scratch", [(image, seg)], tmp_path / "m", cfg, resume=True).steps == 4


def test_resume_without_an_interrupted_run_starts_afresh(tmp_path):
    result = finetune("scratch", [small_phantom(0)], tmp_path / "m", quick(labels=[1], steps=2), resume=True)
    assert result.steps == 2 and load_checkpoint(tmp_path / "m").config["classes"] == ["label_1"]


def test_resume_after_a_kill_between_the_final_save_and_the_rename(tmp_path):
    first = finetune("scratch", [small_phantom(0)], tmp_path / "done", quick(labels=[1], steps=2))
    work = work_folder(tmp_path / "m")
    os.rename(first.checkpoint, work)  # what such a kill leaves: the complete model, still in the work folder
    result = finetune("scratch", [small_phantom(0)], tmp_path / "m", quick(labels=[1], steps=2), resume=True)
    assert result.checkpoint == tmp_path / "m" and result.steps == 2 and result.loss == pytest.approx(first.loss)
    assert not work.exists() and load_checkpoint(tmp_path / "m").config["provenance"]["steps"] == 2


def _liver_dice(segmenter, seed: int) -> float:
    ph = make_ct_abdomen(seed)
    pred = segment(segmenter, Volume(ph.images["ct"], ph.affine), device="cpu").labels == 1
    truth = ph.labels == 1
    return 2.0 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())


@pytest.mark.slow
def test_head_mode_on_one_phantom_segments_the_liver_of_another(tmp_path):
    ph = make_ct_abdomen(0)
    pairs = [(Volume(ph.images["ct"], ph.affine), Volume(ph.labels, ph.affine))]
    cfg = FinetuneConfig(labels=[1], steps=1000, crops_per_scan=128, points=8192, window=48, spacing=(4.0, 4.0, 4.0),
                         scratch_config=TINY, device="cpu")
    torch.set_num_threads(2)  # the "under a minute" is on this 2-core machine (conftest sets 1 per test)
    t0 = time.perf_counter()
    finetune("scratch", pairs, tmp_path / "m", cfg, class_names=CT_CLASSES)
    elapsed = time.perf_counter() - t0
    segmenter = load_segmenter(tmp_path / "m")
    scores = {seed: _liver_dice(segmenter, seed) for seed in (0, 1, 2)}
    print(json.dumps({"finetune_s": round(elapsed, 1), "liver_dice": scores}))
    assert scores[0] >= 0.9  # the phantom it was trained on
    assert min(scores[1], scores[2]) >= 0.9  # unseen phantoms of the same generator


# ----------------------------------------------------------------------------- intensity augmentation


@pytest.mark.parametrize("option", [{"contrast_curve": 1.0}, {"gamma": 1.0}, {"bias_field": 0.5}, {"thick_slices": 6}])
def test_each_intensity_augmentation_changes_the_image_and_never_the_labels(option):
    image, seg = small_phantom(0)
    cmap = class_map({0, 1, 2, 3, 9}, NAMES, quick(labels=[1]))
    target = cmap.lut(9)[seg.array.astype(np.int64)]
    scan = prepare_scan((image.array - image.array.min()) / np.ptp(image.array), target, (32, 32, 32), "ph", "seg")
    plain = CropDataset([scan], (32, 32, 32), quick(labels=[1], zoom=0.0, rotate=0.0, intensity_jitter=0.0), seed=0)
    augmented = CropDataset([scan], (32, 32, 32), quick(labels=[1], zoom=0.0, rotate=0.0, intensity_jitter=0.0,
                                                         **option), seed=0)
    changed = 0
    for i in range(8):
        a, b = plain[i], augmented[i]
        assert torch.equal(a["labels"], b["labels"])  # the same crop, the same labels
        changed += not torch.allclose(a["volumes"], b["volumes"])
    assert changed >= 2, f"{option} changed {changed} of 8 crops"


@pytest.mark.parametrize("bad", [{"contrast_curve": 1.5}, {"gamma": -1.0}, {"bias_field": 9.0}, {"thick_slices": 0}])
def test_bad_augmentation_settings_are_named(bad):
    (name,) = bad
    with pytest.raises(Ar3dInputError, match=f"FinetuneConfig.{name}"):
        FinetuneConfig(**bad)
