"""Fuzzing the readers and the checkpoint loaders: mutated files may only raise Ar3dInputError.

Seeds are tiny valid files (NIfTI .nii and .nii.gz, NRRD raw and gzip, MHA raw and compressed) and
tiny checkpoint folders (an AR-pretrained encoder, a segmentation model). Hypothesis mutates them:
bytes flipped, set, inserted, deleted or truncated anywhere (half the time inside the header),
NIfTI header fields and NRRD / MetaImage header numbers and words set to edge values, gzip
applied after the mutation, config.json values replaced by arbitrary JSON, safetensors headers
given other dtypes, shapes and offsets. Every case goes through the function the CLI and the
napari reader call (`read_volume` and `read_layers`; `load_segmenter`, `load_explain_model`,
`build_encoder`, `count_values`), and the only exception allowed is `Ar3dInputError` (a
`CheckpointError` is one). A hang fails through pytest-timeout.

The default run tries 240 cases; `pytest -m slow tests/test_fuzz.py -s` tries 12,000 and prints
the counts.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from model_core.checkpoint.store import (
    build_encoder,
    count_values,
    load_checkpoint,
    make_config,
    save_checkpoint,
)
from model_core.errors import Ar3dInputError
from model_core.inference.explain import load_explain_model
from model_core.inference.segment import load_segmenter
from model_core.io.volume import read_volume
from model_core.models.segmentation import SegmentationModel, build_decoder
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.objectives.autoregressive import AutoregressiveObjective
from napari_ar3d._reader import read_layers

MAX_VOXELS = 20_000  # a mutated header may declare more; reading stays small and fast
VOLUME_TARGETS = ("nii", "nii.gz", "nrrd", "mha")
CHECKPOINT_TARGETS = ("config.json", "model.safetensors")
SLOW_EXAMPLES = {"nii": 2000, "nii.gz": 2000, "nrrd": 2000, "mha": 2000, "config.json": 2000, "model.safetensors": 2000}
FAST_EXAMPLES = 40  # per target: 240 in the default run

INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 255, 256, 32767, -32768, 65535, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1]
INTERESTING_FLOATS = [0.0, -0.0, 1e-30, -1.0, 1e30, float("inf"), float("-inf"), float("nan"), 3.5]
# NIfTI-1 header fields: (byte offset, struct format)
NIFTI_FIELDS = [
    (0, "<i"), (40, "<h"), (42, "<h"), (44, "<h"), (46, "<h"), (48, "<h"), (70, "<h"), (72, "<h"),
    (76, "<f"), (80, "<f"), (84, "<f"), (88, "<f"), (108, "<f"), (112, "<f"), (116, "<f"), (252, "<h"),
    (254, "<h"), (256, "<f"), (268, "<f"), (280, "<f"), (292, "<f"), (304, "<f"), (344, "4s"),
]
HEADER_WORDS = [  # (found in a seed header, replacements)
    (b"float", [b"double", b"int64", b"uchar", b"block", b"complex", b"xyz"]),
    (b"MET_FLOAT", [b"MET_DOUBLE", b"MET_LONG_LONG", b"MET_UCHAR_ARRAY", b"MET_OTHER", b"MET_"]),
    (b"raw", [b"gzip", b"bzip2", b"hex", b"text", b"zz"]),
    (b"gzip", [b"raw", b"bzip2", b"ascii"]),
    (b"little", [b"big", b"middle"]),
    (b"True", [b"False", b"Maybe"]),
    (b"False", [b"True", b"0"]),
    (b"LOCAL", [b"LIST", b"missing.raw"]),
    (b"3", [b"2", b"4", b"5", b"0", b"-3", b"17"]),
]
NUMBER_TOKENS = [b"0", b"-1", b"1", b"2", b"65536", b"99999999999", b"1e308", b"-1e308", b"nan", b"inf", b"", b"3.5", b"x"]


# ----------------------------------------------------------------------------- seeds


def _volume_seeds() -> dict[str, list[tuple[bytes, int]]]:
    """Valid files of each target as (bytes, header length): NIfTI float32 and int16, NRRD and MHA raw and compressed."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, -0.8, 2.0, 1.0])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    arrays = [rng.normal(size=(6, 5, 4)).astype(np.float32), rng.integers(0, 4, (6, 5, 4)).astype(np.int16)]
    nifti = [nib.Nifti1Image(a, affine, dtype=a.dtype).to_bytes() for a in arrays]
    seeds: dict[str, list[tuple[bytes, int]]] = {"nii": [(b, 352) for b in nifti], "nii.gz": [(b, 352) for b in nifti]}
    with tempfile.TemporaryDirectory() as tmp:
        for ext in ("nrrd", "mha"):
            seeds[ext] = []
            for array in arrays:
                for compress in (False, True):
                    image = sitk.GetImageFromArray(array)
                    image.SetSpacing((0.8, 0.9, 2.5))
                    image.SetOrigin((1.0, 2.0, 3.0))
                    path = Path(tmp) / f"seed.{ext}"
                    sitk.WriteImage(image, str(path), compress)
                    content = path.read_bytes()
                    header = content.index(b"\n\n") + 2 if ext == "nrrd" else content.index(b"LOCAL\n") + 6
                    seeds[ext].append((content, header))
    return seeds


def _checkpoint_seeds(root: Path) -> list[Path]:
    """A tiny AR-pretrained encoder and a tiny segmentation model, as folders."""
    torch.manual_seed(0)
    cfg = ViT3DConfig(patch_size=4, width=12, depth=1, heads=2, mlp_ratio=2.0)
    objective = AutoregressiveObjective(ViT3D(cfg))
    ar = make_config(cfg.to_dict(), objective="ar", heads={"next_token": {"type": "linear", "out_features": 4**3}},
                     preprocessing={"spacing": [2.0, 2.0, 2.0]},
                     provenance={"sequence": {"kinds": ["spatial"], "crop": 16, "slab": 8}})
    seg_model = SegmentationModel(ViT3D(cfg), build_decoder("light", cfg, 3, hidden=8, refine=4))
    seg = make_config(cfg.to_dict(), objective="segmentation", classes=["a", "b"], modality="CT",
                      heads={"segmentation": {"decoder": seg_model.decoder.config, "window": [16, 16, 16]}},
                      preprocessing={"spacing": [2.0, 2.0, 2.0], "intensity": {"kind": "ct"}})
    return [save_checkpoint(root / "ar", objective.state_dict(), ar), save_checkpoint(root / "seg", seg_model.state_dict(), seg)]


# ----------------------------------------------------------------------------- mutations


def _mutate_bytes(draw, content: bytes, header: int) -> bytes:
    """1 to 4 random byte-level mutations, each inside the first `header` bytes half the time."""
    data = bytearray(content)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "int", "truncate", "insert", "delete", "duplicate"]))
        end = min(header, len(data)) if draw(st.booleans()) else len(data)
        if end == 0:
            data = bytearray(draw(st.binary(max_size=64)))
            continue
        pos = draw(st.integers(0, end - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "int":
            width = draw(st.sampled_from([2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING_INTS)) % 2 ** (8 * width)
            data[pos:pos + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


def _mutate_nifti_field(draw, content: bytes) -> bytes:
    offset, fmt = draw(st.sampled_from(NIFTI_FIELDS))
    if fmt == "4s":
        value = struct.pack(fmt, draw(st.sampled_from([b"ni1\0", b"n+2\0", b"n+1\0", b"\0\0\0\0", b"n+1x"])))
    elif fmt == "<f":
        value = struct.pack(fmt, draw(st.sampled_from(INTERESTING_FLOATS)))
    else:
        bits = 16 if fmt == "<h" else 32
        value = struct.pack(fmt, (draw(st.sampled_from(INTERESTING_INTS)) + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1))
    return content[:offset] + value + content[offset + len(value):]


def _mutate_text_header(draw, content: bytes, header: int) -> bytes:
    """Replace one number or one known word in a NRRD / MetaImage text header."""
    head, body = content[:header], content[header:]
    if draw(st.booleans()):
        numbers = list(re.finditer(rb"-?\d+(\.\d+)?", head))
        m = draw(st.sampled_from(numbers))
        head = head[:m.start()] + draw(st.sampled_from(NUMBER_TOKENS)) + head[m.end():]
    else:
        word, replacements = draw(st.sampled_from([w for w in HEADER_WORDS if w[0] in head]))
        head = head.replace(word, draw(st.sampled_from(replacements)), 1)
    return head + body


@st.composite
def volume_files(draw, target: str, seeds: dict[str, list[tuple[bytes, int]]]) -> bytes:
    content, header = draw(st.sampled_from(seeds[target]))
    kind = draw(st.sampled_from(["bytes", "field", "field+bytes"]))
    if "field" in kind:
        if target.startswith("nii"):
            content = _mutate_nifti_field(draw, content)
        else:
            content = _mutate_text_header(draw, content, header)
    if "bytes" in kind:
        content = _mutate_bytes(draw, content, header)
    if target == "nii.gz":  # the NIfTI bytes mutated behind valid gzip, or the gzip stream itself
        content = gzip.compress(content, mtime=0)
        if draw(st.booleans()):
            content = _mutate_bytes(draw, content, 32)
    return content


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.sampled_from(INTERESTING_INTS) | st.sampled_from(INTERESTING_FLOATS)
    | st.integers() | st.text(max_size=6) | st.sampled_from(["tiny", "ar", "mae", "light", "unetr", "CT", "vit3d"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()) -> list[tuple]:
    """Every key path into a JSON value (the value itself included)."""
    found = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for n, value in enumerate(obj):
            found += _paths(value, prefix + (n,))
    return found


def _mutate_json(draw, doc):
    """`doc` with 1 to 3 values replaced by arbitrary JSON or deleted."""
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(JSON_VALUES)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return doc


@st.composite
def config_files(draw, seed: bytes) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return _mutate_bytes(draw, seed, len(seed))
    return json.dumps(_mutate_json(draw, json.loads(seed)), allow_nan=True).encode()


@st.composite
def safetensors_files(draw, seed: bytes) -> bytes:
    (n,) = struct.unpack("<Q", seed[:8])
    if draw(st.booleans()):
        return _mutate_bytes(draw, seed, 8 + n)
    header = json.loads(seed[8:8 + n])
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "any"]))
    if field == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "XX", ""]))
    elif field == "shape":
        header[name]["shape"] = draw(st.lists(st.sampled_from(INTERESTING_INTS), max_size=4))
    elif field == "data_offsets":
        header[name]["data_offsets"] = draw(st.lists(st.sampled_from(INTERESTING_INTS + [n, len(seed)]), max_size=3))
    else:
        header = _mutate_json(draw, header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + seed[8 + n:]


# ----------------------------------------------------------------------------- the harness


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seeds(workdir) -> dict:
    return {"volumes": _volume_seeds(), "checkpoints": _checkpoint_seeds(workdir / "seeds")}


@pytest.fixture(autouse=True, scope="module")
def _small_voxel_limit():
    old = os.environ.get("AR3D_MAX_VOXELS")
    os.environ["AR3D_MAX_VOXELS"] = str(MAX_VOXELS)
    yield
    if old is None:
        del os.environ["AR3D_MAX_VOXELS"]
    else:
        os.environ["AR3D_MAX_VOXELS"] = old


def _refused_or_read(stats: Counter, call) -> None:
    """Run `call`: success or Ar3dInputError are fine, anything else fails the test (and is shrunk)."""
    try:
        call()
        stats["accepted"] += 1
    except Ar3dInputError as err:
        assert "\n" not in str(err), str(err)
        stats["refused"] += 1


def fuzz(target: str, examples: int, seeds: dict, workdir: Path, derandomize: bool) -> Counter:
    """Run `examples` mutated cases of `target` and return the counts of cases, accepted and refused calls."""
    stats: Counter = Counter()
    folder = workdir / target.replace(".", "_")
    folder.mkdir(exist_ok=True)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def case(data):
        stats["cases"] += 1
        if target in VOLUME_TARGETS:
            path = folder / f"case.{target}"
            path.write_bytes(data.draw(volume_files(target, seeds["volumes"])))
            _refused_or_read(stats, lambda: read_volume(path))
            _refused_or_read(stats, lambda: read_layers(str(path)))
            return
        seed = data.draw(st.sampled_from(seeds["checkpoints"]))
        ckpt = folder / "ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(seed, ckpt)
        original = (ckpt / target).read_bytes()
        strategy = config_files(original) if target == "config.json" else safetensors_files(original)
        (ckpt / target).write_bytes(data.draw(strategy))
        _refused_or_read(stats, lambda: count_values(ckpt))
        _refused_or_read(stats, lambda: build_encoder(load_checkpoint(ckpt)))
        if seed.name == "seg":
            _refused_or_read(stats, lambda: load_segmenter(ckpt))
        else:
            _refused_or_read(stats, lambda: load_explain_model(ckpt, device="cpu"))

    case()
    print(f"\nfuzz {target}: {stats['cases']} cases, {stats['accepted']} calls accepted, {stats['refused']} refused")
    return stats


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", VOLUME_TARGETS + CHECKPOINT_TARGETS)
def test_fuzz_quick(target, seeds, workdir):
    stats = fuzz(target, FAST_EXAMPLES, seeds, workdir, derandomize=True)
    assert stats["cases"] >= FAST_EXAMPLES and stats["refused"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("target", VOLUME_TARGETS + CHECKPOINT_TARGETS)
def test_fuzz_thousands(target, seeds, workdir):
    stats = fuzz(target, SLOW_EXAMPLES[target], seeds, workdir, derandomize=False)
    assert stats["cases"] >= SLOW_EXAMPLES[target] and stats["refused"] > 0
