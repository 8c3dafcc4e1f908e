"""Packaging contracts: light imports, a valid npe2 manifest, and an installable wheel."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path | str | None = None, exe: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_import_napari_ar3d_does_not_import_torch(tmp_path):
    code = (
        "import sys, napari_ar3d, napari_ar3d._reader, napari_ar3d._writer, napari_ar3d.sample_data.samples\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'napari', 'qtpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing napari_ar3d pulled in: {result.stdout.strip()}"


def test_reader_on_a_file_does_not_import_torch(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from model_core.io.volume import write_volume\n"
        f"p = write_volume({str(tmp_path / 'v.nii.gz')!r}, np.zeros((4, 5, 6), np.float32), np.eye(4), kind='float')\n"
        "from napari_ar3d._reader import napari_get_reader\n"
        "layers = napari_get_reader(str(p))(str(p))\n"
        "assert layers[0][0].shape == (6, 5, 4), layers[0][0].shape\n"
        "print('torch' in sys.modules)\n"
    )
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_every_manifest_command_imports():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-ar3d")
    commands = manifest.contributions.commands
    assert len(commands) >= 4
    for command in commands:
        module_name, _, attr = command.python_name.partition(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attr)), command.python_name


def test_npe2_validate():
    npe2_cli = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2_cli), "validate", "napari-ar3d"], capture_output=True, text=True,
                            encoding="utf-8", errors="replace", timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


@pytest.mark.slow
def test_wheel_installs_in_clean_venv(tmp_path):
    """Build the wheel, install it into a fresh venv, and use it from outside the source tree."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("napari_ar3d-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True, env=pip_env, timeout=900)
    subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], check=True, env=pip_env, timeout=1800)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    ar3d = env_dir / "bin" / "ar3d"
    result = subprocess.run([str(ar3d), "--help"], capture_output=True, text=True, cwd=workdir, timeout=120)
    assert result.returncode == 0 and "pretrain" in result.stdout, result.stderr
    result = subprocess.run([str(ar3d), "info"], capture_output=True, text=True, cwd=workdir, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ar3d-encoder" in result.stdout and "ar3d-ct-organs" in result.stdout, result.stdout
    result = subprocess.run([str(ar3d), "demo", "--out", "demo"], capture_output=True, text=True, cwd=workdir,
                            timeout=900)  # the CT shipped in the wheel, segmented and explained with its encoder
    assert result.returncode == 0, result.stderr
    assert (workdir / "demo" / "ct_liver_seg.nii.gz").is_file() and (workdir / "demo" / "dice.json").is_file()

    code = (
        "import importlib.util, numpy as np, napari_ar3d.widgets, napari_ar3d.sample_data\n"
        "assert importlib.util.find_spec('widgets') is None, 'generic top-level widgets installed'\n"
        "assert importlib.util.find_spec('sample_data') is None, 'generic top-level sample_data installed'\n"
        "assert 'site-packages' in napari_ar3d.sample_data.__file__\n"
        "from model_core.data.phantoms import make_ct_abdomen\n"
        "from model_core.io.volume import write_volume\n"
        "ph = make_ct_abdomen(seed=1)\n"
        "p = write_volume('ct.nii.gz', ph.labels, ph.affine, kind='labels')\n"
        "from napari_ar3d._reader import napari_get_reader\n"
        "(data, kwargs, kind), = napari_get_reader(str(p))(str(p))\n"
        "assert kind == 'image' and data.shape == ph.labels.shape[::-1]\n"
        "print('ok')\n"
    )
    result = _python(code, cwd=workdir, exe=py)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
    site = next((env_dir / "lib").glob("python*/site-packages"))
    assert not (site / "widgets").exists() and not (site / "sample_data").exists()
    assert not (site / "tests").exists() and not (site / "benchmarks").exists()
