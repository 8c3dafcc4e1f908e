"""Shared fixtures: the real-data folder (skipped when absent), and the napari / widget test kit.

The widget kit: a real `viewer` (napari's `make_napari_viewer`, offscreen under xvfb), `docked`
widgets, the small CT phantom (`ct_phantom`, `add_ct`), two tiny checkpoints made once per session
through the core APIs (`tiny_ar_checkpoint`, `tiny_segmenter`), `wait_idle` for a widget's worker
and `notifications` for what the user was told. `assert_aligned` and `napari_world_to_ras` are
plain helpers (`from conftest import ...`).
"""

from __future__ import annotations

import copy
import json
import locale
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from model_core.data.phantoms import Phantom

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """`$AR3D_DATA`, else `../shared/data` beside the repository; None when absent."""
    env = os.environ.get("AR3D_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if (path / "manifest.json").is_file() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder not found (set AR3D_DATA or put shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def manifest(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "manifest.json").read_text())["cases"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads thrash when other jobs share the 2 CPU cores."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _recovery_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Labels painted in test viewers are saved for crash recovery: in a temporary folder, not the user's cache."""
    os.environ["AR3D_RECOVERY_DIR"] = str(tmp_path_factory.mktemp("recovery"))


@pytest.fixture(autouse=True)
def _keep_the_locale():
    """GDCM's DICOM writer sets LC_CTYPE to "C"; later tests would decode subprocess output as ASCII."""
    saved = locale.setlocale(locale.LC_CTYPE)
    yield
    locale.setlocale(locale.LC_CTYPE, saved)


# ----------------------------------------------------------------------------- napari and widget tests

TINY_PATCH, TINY_SPACING = 8, 8.0  # tiny models: 8^3 patches on an 8 mm grid
WIDGET_CT_SHAPE = (64, 64, 32)  # the small CT phantom (I, J, K)


def assert_aligned(layer: Any, reference: Any) -> None:
    """`layer` has `reference`'s whole transform and grid (an RGB layer has one more axis)."""
    for name in ("scale", "translate", "rotate", "shear"):
        np.testing.assert_allclose(getattr(layer, name), getattr(reference, name), err_msg=name)
    np.testing.assert_allclose(layer.affine.affine_matrix, reference.affine.affine_matrix)
    assert layer.data.shape[:3] == reference.data.shape


def napari_world_to_ras(world: Any) -> np.ndarray:
    """A napari world point (LPS mm as z, y, x) in RAS mm (x, y, z)."""
    z, y, x = world
    return np.array([-x, -y, z])


class Notifications(list):
    """The napari notifications shown inside a `with notifications() as seen:` block."""

    def messages(self, severity: str) -> list[str]:
        return [n.message for n in self if str(n.severity) == severity]

    @property
    def errors(self) -> list[str]:
        return self.messages("error")

    @property
    def warnings(self) -> list[str]:
        return self.messages("warning")


@pytest.fixture
def notifications() -> Callable[[], Any]:
    """`with notifications() as seen:` collects the notifications shown inside the block."""
    from napari.utils.notifications import notification_manager

    @contextmanager
    def collect() -> Iterator[Notifications]:
        seen = Notifications()
        notification_manager.notification_ready.connect(seen.append)
        try:
            yield seen
        finally:
            notification_manager.notification_ready.disconnect(seen.append)

    return collect


@pytest.fixture
def viewer(make_napari_viewer: Callable[..., Any]) -> Any:
    """A real napari viewer; napari's fixture closes it and checks for leaked widgets afterwards."""
    return make_napari_viewer()


@pytest.fixture
def docked(viewer: Any) -> Callable[[type], Any]:
    """docked(WidgetClass) -> the widget, made for `viewer` and docked in its window."""

    def dock(widget_class: type) -> Any:
        widget = widget_class(viewer)
        viewer.window.add_dock_widget(widget)
        return widget

    return dock


@pytest.fixture
def wait_idle(qtbot: Any) -> Callable[..., None]:
    """wait_idle(panel, timeout_s=60) returns once the widget's job panel has no worker running."""

    def wait(panel: Any, timeout_s: float = 60.0) -> None:
        qtbot.waitUntil(lambda: not panel.busy, timeout=int(timeout_s * 1000))

    return wait


@pytest.fixture(scope="session")
def ct_phantom() -> Callable[[int], Phantom]:
    """ct_phantom(seed=0) -> the small CT abdomen phantom: made once per seed, a fresh copy on each call."""
    from model_core.data.phantoms import make_ct_abdomen

    made: dict[int, Phantom] = {}

    def phantom(seed: int = 0) -> Phantom:
        if seed not in made:
            made[seed] = make_ct_abdomen(seed, shape=WIDGET_CT_SHAPE)
        return copy.deepcopy(made[seed])

    return phantom


@pytest.fixture
def add_ct(ct_phantom: Callable[[int], Phantom]) -> Callable[..., tuple[Any, Any]]:
    """add_ct(viewer, seed=0, name="ct") -> (image, labels): the small CT phantom as the sample data shows it."""
    from napari_ar3d.sample_data.samples import phantom_layers

    from model_core.vocabulary import CT_SOFT_TISSUE_HU

    def add(viewer: Any, seed: int = 0, name: str = "ct") -> tuple[Any, Any]:
        layers = phantom_layers(ct_phantom(seed), name, {"ct": {"contrast_limits": CT_SOFT_TISSUE_HU}})
        return tuple(getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in layers)

    return add


@pytest.fixture(scope="session")
def tiny_ar_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AR encoder + next-token head checkpoint (CT intensities, 8 mm spacing, 32x32x16 windows).

    Made once per session, as `ar3d pretrain` writes it (random weights); tests must not write into it.
    """
    import torch

    from model_core.checkpoint.store import make_config, save_checkpoint
    from model_core.data.preprocess import IntensityConfig, PreprocessConfig
    from model_core.models.vit import ViT3D, ViT3DConfig
    from model_core.objectives.autoregressive import AutoregressiveObjective

    torch.manual_seed(0)
    objective = AutoregressiveObjective(ViT3D(ViT3DConfig(patch_size=TINY_PATCH, width=32, depth=2, heads=2)))
    config = make_config(
        objective.encoder.cfg.to_dict(),
        objective="ar",
        heads={"next_token": {"type": "linear", "out_features": TINY_PATCH**3}},
        preprocessing=PreprocessConfig((TINY_SPACING,) * 3, IntensityConfig("ct")).to_dict(),
        modality="CT",
        provenance={"sequence": {"crop": 32, "slab": 16}, "steps": 0, "data": ["random init (widget tests)"]},
    )
    return save_checkpoint(tmp_path_factory.mktemp("tiny-ar") / "tiny-ar", objective.state_dict(), config)


@pytest.fixture(scope="session")
def tiny_segmenter(
    tiny_ar_checkpoint: Path, ct_phantom: Callable[[int], Phantom], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A segmentation model (liver, spleen) fine-tuned for 3 steps from `tiny_ar_checkpoint`, once per session."""
    from model_core.io.volume import Volume
    from model_core.training.finetune import FinetuneConfig, finetune

    phantom = ct_phantom(0)
    pair = (Volume(phantom.images["ct"], phantom.affine), Volume(phantom.labels, phantom.affine))
    cfg = FinetuneConfig(labels=[1, 2], steps=3, window=32, crops_per_scan=2, points=512, device="cpu")
    work = tmp_path_factory.mktemp("tiny-seg") / "tiny-seg"
    return finetune(tiny_ar_checkpoint, [pair], work, cfg, class_names=phantom.class_names).checkpoint
