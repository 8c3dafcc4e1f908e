"""Whole-volume inference: geometry of the outputs, probabilities, padding, warnings and errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from model_core.checkpoint.store import load_checkpoint, make_config, save_checkpoint
from model_core.data.phantoms import make_ct_abdomen
from model_core.data.preprocess import IntensityConfig, PreprocessConfig
from model_core.errors import Ar3dEnvironmentError, CheckpointError
from model_core.inference.segment import (
    count_windows,
    load_segmenter,
    segment,
    segmenter_from_checkpoint,
)
from model_core.io.volume import Volume
from model_core.models.segmentation import SegmentationModel, build_decoder
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.progress import Cancelled

TINY = {"patch_size": 8, "width": 48, "depth": 4, "heads": 2}


def save_segmenter(folder, *, classes=("bright",), modality="CT", spacing=4.0, threshold=None, window=32):
    """A tiny light-decoder segmentation checkpoint. With `threshold` (normalised intensity), class 1
    is exactly "intensity above threshold": the decoder's output is k * (intensity - threshold)."""
    torch.manual_seed(0)
    cfg = ViT3DConfig(**TINY)
    model = SegmentationModel(ViT3D(cfg), build_decoder("light", cfg, len(classes) + 1))
    if threshold is not None:
        mix, out = model.decoder.refine[0], model.decoder.refine[2]
        with torch.no_grad():
            for p in (*mix.parameters(), *out.parameters()):
                p.zero_()
            k = 200.0
            mix.weight[0, -1], mix.bias[0] = k, -k * threshold  # h0 = k (v - t)
            mix.weight[1, -1], mix.bias[1] = -k, k * threshold  # h1 = -h0
            out.weight[1, 0], out.weight[1, 1] = 1.0, -1.0  # gelu(h) - gelu(-h) = h
    kind = "ct" if modality == "CT" else "mri"
    config = make_config(
        cfg.to_dict(),
        objective="segmentation",
        heads={"segmentation": {"decoder": model.decoder.config, "window": [window] * 3}},
        preprocessing=PreprocessConfig((spacing,) * 3, IntensityConfig(kind)).to_dict(),
        modality=modality,
        classes=list(classes),
    )
    return save_checkpoint(folder, model.state_dict(), config)


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory):
    """Class 1 = CT above 100 HU (normalised (100 + 1000) / 2000)."""
    return load_segmenter(save_segmenter(tmp_path_factory.mktemp("thr") / "model", threshold=0.55))


@pytest.fixture(scope="module")
def phantom():
    return make_ct_abdomen(3, shape=(64, 56, 32))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


@pytest.mark.parametrize("grid", ["phantom", "flipped", "oblique", "permuted"])
def test_labels_lie_on_the_input_grid_in_the_right_place(threshold_model, phantom, grid):
    array, affine = phantom.images["ct"], phantom.affine.copy()
    if grid == "flipped":  # RAS voxel axes instead of the phantom's LPS-like ones
        array = array[::-1, ::-1].copy()
        affine = affine @ np.array([[-1, 0, 0, array.shape[0] - 1], [0, -1, 0, array.shape[1] - 1],
                                    [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    elif grid == "oblique":
        affine = _oblique(affine, 20.0)
    elif grid == "permuted":  # k first: a sagittal-like storage order
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
        affine = affine[:, [2, 0, 1, 3]]
    result = segment(threshold_model, Volume(array, affine, f"{grid}.nii.gz"), device="cpu")
    assert result.labels.shape == array.shape
    assert np.array_equal(result.affine, affine)
    assert result.labels.dtype == np.uint8
    # The model's class 1 is "above 100 HU" on its own 4 mm grid: on the input grid it must cover
    # the voxels above 100 HU, give or take the resampling at the borders.
    bright = array > 100.0
    assert _dice(result.labels == 1, bright) > 0.85


def test_probabilities_sum_to_one_and_give_the_labels(threshold_model, phantom):
    volume = Volume(phantom.images["ct"], phantom.affine, "ct.nii.gz")
    result = segment(threshold_model, volume, device="cpu", probabilities=True)
    probs = result.probabilities
    assert probs.shape == (2, *volume.shape) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert probs.min() >= 0.0
    assert np.array_equal(result.labels, probs.argmax(axis=0))
    assert result.uncertainty.shape == volume.shape
    assert 0.0 <= result.uncertainty.min() and result.uncertainty.max() <= 1.0
    # uncertain only near the threshold: most voxels are far from 100 HU
    assert np.median(result.uncertainty) < 0.05


def test_a_volume_smaller_than_a_window_is_padded(tmp_path):
    segmenter = load_segmenter(save_segmenter(tmp_path / "m", spacing=2.0, window=32))
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 300, (9, 7, 5)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "tiny.nii")
    result = segment(segmenter, volume, device="cpu", probabilities=True)
    assert result.labels.shape == (9, 7, 5)
    assert np.allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_progress_counts_every_batch_of_windows_and_cancel_stops(threshold_model, phantom):
    volume = Volume(phantom.images["ct"], phantom.affine, "ct.nii.gz")
    reports = []
    segment(threshold_model, volume, device="cpu", sw_batch_size=1, progress=reports.append)
    shape = tuple(round(s * n / 4.0) for s, n in zip(phantom.spacing, phantom.shape))
    windows = count_windows(shape, threshold_model.window, 0.25)
    assert windows > 1
    assert [r.step for r in reports] == list(range(1, windows + 1))
    assert all(r.total == windows for r in reports)
    with pytest.raises(Cancelled):
        segment(threshold_model, volume, device="cpu", should_stop=lambda: True)


def test_a_model_of_another_modality_warns(threshold_model):
    rng = np.random.default_rng(1)
    mri = Volume(rng.uniform(100, 900, (40, 40, 20)).astype(np.float32), np.eye(4), "brain.nii.gz")
    with pytest.warns(UserWarning, match="trained on CT"):
        segment(threshold_model, mri, device="cpu")


def test_an_encoder_is_not_a_segmenter(tmp_path):
    cfg = ViT3DConfig(**TINY)
    folder = save_checkpoint(tmp_path / "enc", ViT3D(cfg).state_dict(), make_config(cfg.to_dict(), objective="ar"))
    with pytest.raises(CheckpointError, match="no segmentation decoder"):
        segmenter_from_checkpoint(load_checkpoint(folder))


def test_classes_must_match_the_decoder(tmp_path):
    folder = save_segmenter(tmp_path / "m", classes=("a",))
    checkpoint = load_checkpoint(folder)
    checkpoint.config["classes"] = ["a", "b"]
    with pytest.raises(CheckpointError, match="2 classes"):
        segmenter_from_checkpoint(checkpoint)


def test_count_windows_matches_monai():
    assert count_windows((32, 32, 32), (32, 32, 32), 0.25) == 1
    assert count_windows((10, 40, 57), (32, 32, 32), 0.25) == 1 * 2 * 3
    assert count_windows((160, 160, 103), (96, 96, 96), 0.25) == 8


# ----------------------------------------------------------------------------- out of memory


class FailingWhenBatched(torch.nn.Module):
    """Wraps a model; a forward pass of more than `max_windows` windows raises torch's out-of-memory error
    (from the second pass on, so the retry starts after windows were already stitched)."""

    def __init__(self, model: torch.nn.Module, max_windows: int):
        super().__init__()
        self.model, self.max_windows, self.calls = model, max_windows, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if len(self.calls) > 1 and x.shape[0] > self.max_windows:
            raise torch.OutOfMemoryError("CPU out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_mid_volume_retries_with_half_the_windows_per_batch(threshold_model, phantom):
    volume = Volume(phantom.images["ct"], phantom.affine, "ct.nii.gz")
    want = segment(threshold_model, volume, device="cpu", sw_batch_size=1, probabilities=True)
    flaky = FailingWhenBatched(threshold_model.model, max_windows=1)
    reports = []
    with pytest.warns(UserWarning) as caught:
        got = segment(replace(threshold_model, model=flaky), volume, device="cpu", sw_batch_size=4,
                      probabilities=True, progress=reports.append)
    messages = [str(w.message) for w in caught]
    assert messages == ["ct.nii.gz: CPU out of memory with 4 windows per batch; retrying with 2",
                        "ct.nii.gz: CPU out of memory with 2 windows per batch; retrying with 1"]
    assert [r.message for r in reports if r.step == 0] == messages  # the progress callback says so too
    assert flaky.calls[:3] == [4, 4, 2] and set(flaky.calls[3:]) == {1}
    assert reports[-1].step == reports[-1].total == count_windows(
        tuple(round(s * n / 4.0) for s, n in zip(phantom.spacing, phantom.shape)), threshold_model.window, 0.25)
    assert np.array_equal(got.labels, want.labels)
    assert np.allclose(got.probabilities, want.probabilities, atol=1e-5)


def test_out_of_memory_on_a_gpu_falls_back_to_the_cpu(threshold_model, phantom, monkeypatch):
    import model_core.inference.segment as infer

    real = infer._sliding_window
    attempts = []

    def gpu_without_memory(segmenter, image, device, sw_batch_size, *args):
        attempts.append((device.type, sw_batch_size))
        if device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(segmenter, image, device, sw_batch_size, *args)

    monkeypatch.setattr(infer, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(infer, "_sliding_window", gpu_without_memory)
    volume = Volume(phantom.images["ct"], phantom.affine, "ct.nii.gz")
    with pytest.warns(UserWarning) as caught:
        got = segment(threshold_model, volume, device="cuda", sw_batch_size=4)
    assert attempts == [("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert [str(w.message) for w in caught] == [
        "ct.nii.gz: CUDA out of memory with 4 windows per batch; retrying with 2",
        "ct.nii.gz: CUDA out of memory with 2 windows per batch; retrying with 1",
        "ct.nii.gz: CUDA out of memory with 1 window per batch; falling back to CPU (slower)",
    ]
    monkeypatch.undo()
    assert np.array_equal(got.labels, segment(threshold_model, volume, device="cpu", sw_batch_size=1).labels)


def test_out_of_memory_with_one_window_on_the_cpu_is_a_clear_error(threshold_model, phantom):
    volume = Volume(phantom.images["ct"], phantom.affine, "ct.nii.gz")
    broken = FailingWhenBatched(threshold_model.model, max_windows=0)
    broken.calls.append(0)  # fail from the first pass
    with pytest.warns(UserWarning, match="retrying with 1"), pytest.raises(
        Ar3dEnvironmentError, match="ct.nii.gz: CPU out of memory with 1 window per batch; close other programs"
    ):
        segment(replace(threshold_model, model=broken), volume, device="cpu", sw_batch_size=2)


def test_other_runtime_errors_are_not_retried(threshold_model, phantom):
    volume = Volume(phantom.images["ct"], phantom.affine, "ct.nii.gz")

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        segment(replace(threshold_model, model=Broken()), volume, device="cpu", sw_batch_size=4)


class Recording(torch.nn.Module):
    """Wraps a model and keeps a copy of every batch of windows it sees."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.model(x)


def test_test_time_flips_run_the_8_mirror_images_and_map_them_back(threshold_model, phantom):
    volume = Volume(phantom.images["ct"], phantom.affine, "ct.nii.gz")
    plain = segment(threshold_model, volume, device="cpu", sw_batch_size=1, probabilities=True)
    recording = Recording(threshold_model.model)
    flipped = segment(replace(threshold_model, model=recording), volume, device="cpu", sw_batch_size=1,
                      probabilities=True, tta=True)
    windows = count_windows(tuple(round(s * n / 4.0) for s, n in zip(phantom.spacing, phantom.shape)),
                            threshold_model.window, 0.25)
    assert len(recording.inputs) == 8 * windows
    first = recording.inputs[:8]
    assert torch.equal(first[1], first[0].flip(2)) and torch.equal(first[7], first[0].flip([2, 3, 4]))
    assert not torch.equal(first[1], first[0])  # the phantom is not mirror-symmetric: a wrong mapping back shows
    # The threshold model is voxel-wise, so each mirrored pass mapped back gives the plain probabilities.
    assert np.allclose(flipped.probabilities, plain.probabilities, atol=1e-4)
    assert np.array_equal(flipped.labels, plain.labels)
