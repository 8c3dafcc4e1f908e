"""The typed config.json: version 1 configs load as version 2, round trips, and provenance without paths."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_core.checkpoint.config import VERSION, CheckpointConfig, migrate
from model_core.checkpoint.provenance import command_text, describe_file, strip_paths
from model_core.checkpoint.store import load_checkpoint, load_config, make_config, save_checkpoint
from model_core.errors import CheckpointError
from model_core.inference.segment import segmenter_from_checkpoint
from model_core.io.volume import write_volume
from model_core.models.segmentation import SegmentationModel, build_decoder
from model_core.models.vit import ViT3D, ViT3DConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ViT3DConfig(patch_size=8, width=24, depth=2, heads=2)
ABSOLUTE_PATH = re.compile(r"""(?:^|[\s=("'\[,])(?:~|[A-Za-z]:)?[/\\][^\s"',;)\]]+""")


def _strings(value) -> list[str]:
    """Every text in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    return []


def _absolute_paths(doc) -> list[str]:
    return [s for s in _strings(doc) if ABSOLUTE_PATH.search(s)]


def _version_1_segmenter() -> dict:
    """A config.json as napari-ar3d wrote it in version 1: "roi", no "mid", annotation "full", absolute paths."""
    model = SegmentationModel(ViT3D(TINY), build_decoder("light", TINY, 3, hidden=8, refine=4, mid=0))
    decoder = {k: v for k, v in model.decoder.config.items() if k != "mid"}
    return {
        "format": "napari-ar3d", "version": 1, "architecture": "vit3d", "encoder": TINY.to_dict(),
        "heads": {"segmentation": {"decoder": decoder, "roi": [32, 32, 32]}},
        "objective": "segmentation",
        "preprocessing": {"spacing": [8.0, 8.0, 8.0], "intensity": {"kind": "ct"}},
        "modality": "CT", "classes": ["liver", "spleen"],
        "provenance": {
            "command": "ar3d finetune --model /home/doe/enc --train /data/Doe_John/ct.nii.gz /data/Doe_John/seg.nii.gz "
                       "--out=/tmp/out --roi 32",
            "encoder": "/home/doe/enc",
            "data": ["/data/Doe_John/ct.nii.gz + /data/Doe_John/seg.nii.gz"],
            "annotation": "full",
            "finetune": {"mode": "head", "annotation": "full", "roi": 32, "seed": 0},
            "steps": 4,
            "recipe": "bash train.sh C:\\Users\\doe\\data ~/runs",
        },
    }, model.state_dict()


# ----------------------------------------------------------------------------- migration


def test_a_version_1_config_loads_as_version_2():
    old, _ = _version_1_segmenter()
    before = copy.deepcopy(old)
    doc = CheckpointConfig.from_json(old).to_json()
    assert old == before  # the input is untouched
    assert doc["version"] == VERSION == 2
    head = doc["heads"]["segmentation"]
    assert head["window"] == [32, 32, 32] and "roi" not in head and head["decoder"]["mid"] == 0
    prov = doc["provenance"]
    assert prov["annotation"] == "dense" and prov["finetune"]["annotation"] == "dense"
    assert list(prov["finetune"]) == ["mode", "annotation", "window", "seed"]  # renamed in place
    assert prov["encoder"] == {"name": "enc"}
    assert prov["data"] == ["ct.nii.gz + seg.nii.gz"]
    assert prov["command"] == "ar3d finetune --model enc --train ct.nii.gz seg.nii.gz --out=out --roi 32"
    assert prov["recipe"] == "bash train.sh data runs"
    assert _absolute_paths(doc) == [] and "Doe_John" not in json.dumps(doc)
    assert migrate(migrate(old)) == migrate(old)  # a version 2 document is left as it is


def test_a_version_1_segmenter_without_a_window_gets_the_default_and_rebuilds(tmp_path):
    old, state = _version_1_segmenter()
    del old["heads"]["segmentation"]["roi"]
    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(old))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    segmenter = segmenter_from_checkpoint(load_checkpoint(folder))
    assert segmenter.window == (48, 48, 48)  # WINDOW_PATCHES patches of 8 voxels
    assert not any(k.startswith("mid") for k in segmenter.model.decoder.state_dict())
    assert load_config(folder).heads.segmentation.decoder["mid"] == 0


def test_round_trip_to_json_and_from_json():
    old, _ = _version_1_segmenter()
    config = CheckpointConfig.from_json(old)
    doc = config.to_json()
    assert CheckpointConfig.from_json(doc) == config
    assert CheckpointConfig.from_json(doc).to_json() == doc
    assert json.loads(json.dumps(doc)) == doc  # plain JSON
    assert config.heads.segmentation.window == (32, 32, 32) and config.provenance.steps == 4
    assert config.provenance.extra == {"recipe": "bash train.sh data runs"}


@pytest.mark.parametrize("name", ["ar3d-encoder", "ar3d-ct-organs"])
def test_shipped_configs_are_in_the_current_version(name):
    path = REPO / "model_core" / "shipped" / name / "config.json"
    doc = json.loads(path.read_text())
    assert doc["version"] == VERSION and CheckpointConfig.from_json(path).to_json() == doc


def test_no_committed_config_json_holds_an_absolute_path():
    listed = subprocess.run(["git", "ls-files", "*.json"], cwd=REPO, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    configs = [REPO / p for p in listed.stdout.split() if Path(p).name == "config.json"]
    assert configs, "no config.json is committed"
    for path in configs:
        text = path.read_text()
        assert not re.search(r"/(work|root|home|tmp|Users)/", text), path
        assert _absolute_paths(json.loads(text)) == [], path


@pytest.mark.parametrize("change, message", [
    ({"provenance": {"steps": "many"}}, r"config\.json: the provenance 'steps' must be a whole number"),
    ({"provenance": {"encoder": 3}}, r"config\.json: the provenance 'encoder' must be a text or a JSON object"),
    ({"heads": {"next_token": {"type": "linear"}}}, r"config\.json: the next_token head needs a positive 'out_features'"),
    ({"heads": {"mae_decoder": {"mask": 0.5}}}, r"config\.json: unknown setting\(s\) of the mae_decoder head: mask"),
    ({"preprocessing": {"intensity": 5}}, r"config\.json: bad preprocessing settings \(intensity must be"),
])
def test_a_bad_setting_names_config_json_and_the_setting(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**make_config(TINY.to_dict()), **change}))
    with pytest.raises(CheckpointError, match=message):
        CheckpointConfig.from_json(path)


# ----------------------------------------------------------------------------- provenance


def test_describe_file_and_folder(tmp_path):
    scan = tmp_path / "Doe_John" / "series"
    scan.mkdir(parents=True)
    (scan / "b.dcm").write_bytes(b"second")
    (scan / "a.dcm").write_bytes(b"first")
    (scan / ".DS_Store").write_bytes(b"ignored")
    first, second = (hashlib.sha256(data).hexdigest() for data in (b"first", b"second"))
    assert describe_file(scan / "a.dcm") == {"name": "a.dcm", "sha256": first}
    assert describe_file(scan) == {"name": "series", "sha256": hashlib.sha256((first + second).encode()).hexdigest()}


def test_command_lines_and_texts_lose_their_paths():
    argv = ["finetune", "--train", "/data/Doe_John/ct.nii.gz", "rel/Doe_John/seg.nii.gz", "--out=/tmp/x/model",
            "--set", "width=32", "--model", "scratch", "--query-mm=-10,5,3"]
    assert command_text(argv) == ("ar3d finetune --train ct.nii.gz seg.nii.gz --out=model --set width=32 "
                                  "--model scratch --query-mm=-10,5,3")
    text = "trained on /data/x/ct.nii.gz (see ~/notes.txt) and 1/2 of train/heldout"
    assert strip_paths({"a": [text]}) == {"a": ["trained on ct.nii.gz (see notes.txt) and 1/2 of train/heldout"]}


def test_finetune_records_files_and_the_encoder_by_name_and_sha256(tmp_path):
    from test_finetune import TINY as FT_TINY
    from test_finetune import quick, small_phantom

    from model_core.training.finetune import finetune

    patient = tmp_path / "Doe_John"
    patient.mkdir()
    image, seg = small_phantom(0)
    image_file = write_volume(patient / "ct.nii.gz", image.array, image.affine, kind="float")
    seg_file = write_volume(patient / "seg.nii.gz", seg.array, seg.affine, kind="labels")
    encoder = save_checkpoint(patient / "my-encoder", {f"encoder.{k}": v for k, v in ViT3D(FT_TINY).state_dict().items()},
                              make_config(FT_TINY.to_dict(), objective="ar", modality="CT"))
    torch.manual_seed(0)
    finetune(encoder, [(image_file, seg_file)], tmp_path / "model", quick(steps=1, labels=[1]),
             provenance={"command": command_text(["finetune", "--train", str(image_file), str(seg_file)])})
    prov = load_config(tmp_path / "model").provenance
    assert prov.data == [{"image": describe_file(image_file), "segmentation": describe_file(seg_file)}]
    assert prov.encoder == {"name": "my-encoder", "sha256": describe_file(encoder / "model.safetensors")["sha256"]}
    text = (tmp_path / "model" / "config.json").read_text()
    assert str(tmp_path) not in text and "Doe_John" not in text
