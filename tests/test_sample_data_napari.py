"""The sample-data commands in a real napari viewer (run under xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_aligned, napari_world_to_ras

from model_core.data.phantoms import make_brain_mri, make_ct_abdomen

napari = pytest.importorskip("napari")


def class_of(labels_layer, value: int) -> str:
    features = labels_layer.features
    return features.loc[features["index"] == value, "class"].item()


def test_ct_abdomen_sample(viewer):
    viewer.open_sample("napari-ar3d", "ct_abdomen")
    assert [layer.name for layer in viewer.layers] == ["ct_abdomen", "ct_abdomen labels"]
    image, labels = viewer.layers
    assert isinstance(image, napari.layers.Image) and isinstance(labels, napari.layers.Labels)
    assert_aligned(labels, image)
    assert tuple(image.contrast_limits) == (-160.0, 240.0)

    phantom = make_ct_abdomen(seed=0)
    assert np.array_equal(image.data, phantom.images["ct"].transpose(2, 1, 0))  # (k, j, i)
    assert np.array_equal(labels.data, phantom.labels.transpose(2, 1, 0))
    geometry = labels.metadata["ar3d"]
    np.testing.assert_allclose(geometry["affine_ras"], phantom.affine)
    assert geometry["shape_ijk"] == list(phantom.shape) and geometry["orientation"] == "LPS"
    assert geometry["modality"] == "CT" and geometry["class_names"][1] == "liver"
    assert image.metadata["ar3d"]["spacing"] == pytest.approx(phantom.spacing)

    assert class_of(labels, 1) == "liver" and class_of(labels, 6) == "vertebrae"
    np.testing.assert_allclose(labels.colormap.map(np.array([1]))[0], phantom.colors[1], atol=1e-6)
    assert labels.colormap.map(np.array([0]))[0][3] == 0.0  # background transparent

    liver_kji = np.argwhere(labels.data == 1)
    every = max(1, len(liver_kji) // 200)
    ras = np.array([napari_world_to_ras(labels.data_to_world(v)) for v in liver_kji[::every]])
    assert np.median(ras[:, 0]) > 0  # the liver is on the patient's right: +x in RAS
    i, j, k = liver_kji[0][::-1]
    np.testing.assert_allclose(ras[0], phantom.affine[:3, :3] @ [i, j, k] + phantom.affine[:3, 3], atol=1e-6)
    spleen_kji = np.argwhere(labels.data == 2)
    assert napari_world_to_ras(labels.data_to_world(spleen_kji[len(spleen_kji) // 2]))[0] < 0


def test_brain_mri_sample(viewer):
    viewer.open_sample("napari-ar3d", "brain_mri")
    names = [layer.name for layer in viewer.layers]
    assert names == ["brain_mri t1n", "brain_mri t1c", "brain_mri t2w", "brain_mri t2f", "brain_mri labels"]
    *images, labels = viewer.layers
    assert [layer.visible for layer in images] == [False, True, False, False]
    for image in images:
        assert isinstance(image, napari.layers.Image)
        assert_aligned(labels, image)
        assert image.contrast_limits[1] > image.contrast_limits[0]
    assert isinstance(labels, napari.layers.Labels)

    phantom = make_brain_mri(seed=0)
    assert np.array_equal(labels.data, phantom.labels.transpose(2, 1, 0))
    assert labels.metadata["ar3d"]["orientation"] == "RAS" and labels.metadata["ar3d"]["modality"] == "MRI"
    assert [class_of(labels, v) for v in (1, 4, 5, 6)] == ["csf", "edema", "enhancing_tumor", "necrosis"]

    # The tumour shows in the same hemisphere in napari's world as in the phantom's RAS geometry.
    tumour_kji = np.argwhere(labels.data == 5)
    napari_x_ras = napari_world_to_ras(labels.data_to_world(tumour_kji.mean(0)))[0]
    i_mean = np.argwhere(phantom.labels == 5)[:, 0].mean()
    assert napari_x_ras == pytest.approx(phantom.affine[0, 0] * i_mean + phantom.affine[0, 3], abs=1e-6)
    assert abs(napari_x_ras) > 10.0


# ----------------------------------------------------------------------------- real scans

REAL_SAMPLES = {  # key -> (licence in the display name, layer names)
    "totalseg_ct": ("TotalSegmentator, Wasserthal et al., Apache-2.0", ["totalseg_ct", "totalseg_ct labels"]),
    "totalseg_mr": ("TotalSegmentator, Wasserthal et al., Apache-2.0", ["totalseg_mr", "totalseg_mr labels"]),
    "tcia_brain": ("TCIA Brain-Tumor-Progression, CC BY 3.0",
                   ["tcia_pgbm001 t1post", "tcia_pgbm001 flair", "tcia_pgbm001 labels"]),
}
TCIA_FILES = ("t1post.nii.gz", "flair.nii.gz", "tumor.nii.gz")


def menu_texts(menu) -> list[str]:
    """Every action text in a Qt menu and its sub-menus."""
    texts = []
    for action in menu.actions():
        texts.append(action.text())
        if action.menu() is not None:
            texts += menu_texts(action.menu())
    return texts


def test_open_sample_menu_lists_the_real_scans_with_their_licence(viewer):
    bar = viewer.window._qt_window.menuBar()
    file_menu = next(a.menu() for a in bar.actions() if a.text().replace("&", "") == "File")
    texts = [t.replace("&", "") for t in menu_texts(file_menu)]
    for licence, _ in REAL_SAMPLES.values():
        assert any(licence.split(",")[0] in t and licence.split(", ")[-1] in t for t in texts), (licence, texts)
    assert any("CT abdomen phantom" in t for t in texts)  # the phantoms stay


@pytest.mark.parametrize("key", ["totalseg_ct", "totalseg_mr"])
def test_shipped_real_sample_opens_aligned_as_the_reader_reads_it(viewer, key):
    from model_core.io.volume import read_label_names, read_volume
    from napari_ar3d._reader import read_layers
    from napari_ar3d.sample_data.samples import FILES

    viewer.open_sample("napari-ar3d", key)
    assert [layer.name for layer in viewer.layers] == REAL_SAMPLES[key][1]
    image, labels = viewer.layers
    assert isinstance(image, napari.layers.Image) and isinstance(labels, napari.layers.Labels)
    assert_aligned(labels, image)
    folder = FILES / key
    volume, truth = read_volume(folder / "image.nii.gz"), read_volume(folder / "seg.nii.gz")
    assert np.array_equal(image.data, volume.array.transpose(2, 1, 0))  # (k, j, i)
    assert np.array_equal(labels.data, np.rint(truth.array).astype(int).transpose(2, 1, 0))
    (_, reader_kwargs, _), = read_layers(str(folder / "image.nii.gz"))
    np.testing.assert_allclose(image.affine.affine_matrix, reader_kwargs["affine"])  # the reader's geometry
    assert image.metadata["ar3d"]["orientation"] == volume.orientation

    names = read_label_names(folder / "seg.nii.gz")
    assert class_of(labels, 5) == names[5] == "liver" and class_of(labels, 1) == "spleen"
    assert labels.metadata["ar3d"]["class_names"][1] == "spleen"
    # Anatomy in napari's world: the liver on the patient's right (+x RAS), the spleen on the left.
    liver = napari_world_to_ras(labels.data_to_world(np.argwhere(labels.data == 5).mean(0)))
    spleen = napari_world_to_ras(labels.data_to_world(np.argwhere(labels.data == 1).mean(0)))
    assert liver[0] > spleen[0] + 50


@pytest.fixture
def sample_server(shared_data, tmp_path, monkeypatch):
    """A local HTTP server holding copies of the TCIA files (as a mirror would); $AR3D_SAMPLE_URL points at it,
    $AR3D_CACHE_DIR at an empty folder. Yields (folder served, list of requested paths)."""
    import functools
    import http.server
    import shutil
    import threading

    served = tmp_path / "mirror"
    study = served / "PGBM-001" / "1991-11-19"
    study.mkdir(parents=True)
    for name in TCIA_FILES:
        shutil.copy(shared_data / "tcia_progression" / "PGBM-001" / "1991-11-19" / name, study / name)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AR3D_SAMPLE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("AR3D_CACHE_DIR", str(tmp_path / "cache"))
    yield served, requests
    server.shutdown()
    server.server_close()


def test_tcia_sample_downloads_once_into_the_cache_and_opens_aligned(viewer, sample_server, tmp_path, capfd):
    from model_core.io.volume import read_volume

    served, requests = sample_server
    viewer.open_sample("napari-ar3d", "tcia_brain")
    assert sorted(requests) == sorted(f"/PGBM-001/1991-11-19/{name}" for name in TCIA_FILES)
    assert "%" in capfd.readouterr().err  # the progress bar
    cached = tmp_path / "cache" / "samples" / "PGBM-001" / "1991-11-19"
    for name in TCIA_FILES:
        assert (cached / name).read_bytes() == (served / "PGBM-001" / "1991-11-19" / name).read_bytes()

    assert [layer.name for layer in viewer.layers] == REAL_SAMPLES["tcia_brain"][1]
    t1post, flair, labels = viewer.layers
    assert t1post.visible and not flair.visible
    assert isinstance(labels, napari.layers.Labels) and class_of(labels, 1) == "tumor"
    assert_aligned(labels, t1post)
    mask = read_volume(cached / "tumor.nii.gz")
    assert np.array_equal(labels.data, np.rint(mask.array).astype(int).transpose(2, 1, 0))
    assert labels.data.max() == 1 and (labels.data == 1).sum() > 100

    viewer.layers.clear()
    viewer.open_sample("napari-ar3d", "tcia_brain")  # the second time from the cache
    assert len(requests) == len(TCIA_FILES) and len(viewer.layers) == 3


def test_tcia_sample_offline_is_one_clear_error_and_caches_nothing(tmp_path, monkeypatch):
    import socket

    from model_core.errors import Ar3dEnvironmentError
    from napari_ar3d.sample_data.samples import tcia_brain

    with socket.socket() as s:  # a port nobody listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AR3D_SAMPLE_URL", f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("AR3D_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(Ar3dEnvironmentError, match="cannot download the sample file .*t1post.nii.gz.* no connection"):
        tcia_brain()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]

    monkeypatch.delenv("AR3D_SAMPLE_URL")
    with pytest.raises(Ar3dEnvironmentError, match="no public download URL.*AR3D_SAMPLE_URL"):
        tcia_brain()


def test_tcia_sample_refuses_a_file_that_differs_from_the_pinned_sha256(sample_server, tmp_path):
    from model_core.errors import Ar3dEnvironmentError
    from napari_ar3d.sample_data.download import fetch

    served, _ = sample_server
    (served / "PGBM-001" / "1991-11-19" / "flair.nii.gz").write_bytes(b"not the published file")
    with pytest.raises(Ar3dEnvironmentError, match="flair.nii.gz .* not the expected file"):
        fetch("PGBM-001/1991-11-19/flair.nii.gz", progressbar=False)
    assert not (tmp_path / "cache" / "samples" / "PGBM-001" / "1991-11-19" / "flair.nii.gz").exists()
