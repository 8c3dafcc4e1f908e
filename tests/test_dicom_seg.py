"""DICOM-SEG output (`model_core.io.dicom_seg`, `ar3d segment -o OUT.dcm`, the napari writer), read back with
highdicom and compared voxel by voxel with the NIfTI output, on the real DICOM series in ../shared/data.

`totalseg/ct_dicom` was anonymised down to blank study, series and instance uids, so a DICOM-SEG cannot
reference it: it is refused as is, and the round trips use a copy with the uids put back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_core.cli import main
from model_core.errors import Ar3dInputError
from model_core.inference.outputs import write_segmentation
from model_core.inference.segment import SegmentationResult
from model_core.io.volume import read_label_names, read_volume, world_to_voxel

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

CASES = {  # case -> (series folder, label map on its grid, class names)
    "ct3slice": ("dcmqi_ct3slice/dicom", "dcmqi_ct3slice/seg.nii.gz", None),
    "ct_dicom": ("totalseg/ct_dicom/dicom", "totalseg/ct_dicom/seg.nii.gz", "totalseg/ct_dicom/labels.json"),
}


@pytest.fixture(scope="module")
def series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case's DICOM folder; ct_dicom as a copy with its blanked uids put back (pixel data untouched)."""
    folder = tmp_path_factory.mktemp("ct_dicom_uids")
    study, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for file in sorted((shared_data / CASES["ct_dicom"][0]).iterdir()):
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(folder / file.name)
    return {"ct3slice": shared_data / CASES["ct3slice"][0], "ct_dicom": folder}


def silver_labels(shared_data: Path, case: str) -> tuple[np.ndarray, list[str]]:
    """The case's label map (I, J, K) and class names for values 1..max."""
    _, seg, names_file = CASES[case]
    labels = np.round(read_volume(shared_data / seg).array).astype(np.uint8)
    names = read_label_names(shared_data / names_file) if names_file else {1: "liver", 2: "spine", 3: "heart"}
    return labels, [names.get(k, f"class {k}") for k in range(1, int(labels.max()) + 1)]


def source_headers(folder: Path) -> list:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in read_volume(folder).meta["source_files"]]


def assert_matches_nifti(dcm: Path, nifti: Path, folder: Path) -> hd.seg.Segmentation:
    """Every source instance's frame of the DICOM-SEG equals the NIfTI labels in that instance's plane."""
    seg = hd.seg.segread(dcm)
    labels = read_volume(nifti)
    sources = source_headers(folder)
    uids = [ds.SOPInstanceUID for ds in sources]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)  # (N, rows, cols)
    for frame, ds in zip(frames, sources):
        ijk = world_to_voxel(labels.affine, np.array(ds.ImagePositionPatient, dtype=float) * [-1, -1, 1])
        np.testing.assert_allclose(ijk[:2], 0, atol=1e-3)
        np.testing.assert_array_equal(frame, labels.array[:, :, int(round(ijk[2]))].T)
    assert frames.any()  # a test on empty labels would pass whatever the geometry
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == set(uids)
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    return seg


@pytest.mark.parametrize("case", sorted(CASES))
def test_silver_labels_round_trip_through_dicom_seg(case, shared_data, series, tmp_path):
    labels, classes = silver_labels(shared_data, case)
    volume = read_volume(series[case])
    result = SegmentationResult(labels, np.zeros(labels.shape, np.float32), volume.affine, classes)
    for target in (tmp_path / "seg.nii.gz", tmp_path / "seg.dcm"):
        write_segmentation(result, volume, target, tmp_path / "seg")
    seg = assert_matches_nifti(tmp_path / "seg.dcm", tmp_path / "seg.nii.gz", series[case])
    assert [d.SegmentLabel for d in seg.SegmentSequence] == classes
    assert {d.SegmentAlgorithmType for d in seg.SegmentSequence} == {"MANUAL"}  # no algorithm given
    liver = seg.SegmentSequence[classes.index("liver")].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodingSchemeDesignator, liver.CodeValue) == ("SCT", "10200004")  # SNOMED CT: liver
    if "adrenal_gland_right" in classes:  # SNOMED CT: adrenal gland, modified by right
        gland = seg.SegmentSequence[classes.index("adrenal_gland_right")]
        assert gland.SegmentedPropertyTypeCodeSequence[0].CodeValue == "23451007"
        assert gland.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_dicom_seg_puts_each_label_where_the_nifti_does(case, series, tiny_segmenter, tmp_path, capsys):
    for name in ("labels.nii.gz", "labels.dcm"):
        assert main(["segment", str(series[case]), "--model", str(tiny_segmenter), "-o", str(tmp_path / name),
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.dcm", "labels.labels.json", "labels.nii.gz"]
    seg = assert_matches_nifti(tmp_path / "labels.dcm", tmp_path / "labels.nii.gz", series[case])
    classes = list(json.loads((tmp_path / "labels.labels.json").read_text()).values())
    assert [d.SegmentLabel for d in seg.SegmentSequence] == classes == ["liver", "spleen"]
    for description in seg.SegmentSequence:
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == tiny_segmenter.name
        assert "weights sha256 " in algorithm.AlgorithmVersion


def test_a_non_dicom_input_with_a_dcm_output_is_refused(shared_data, tiny_segmenter, tmp_path, capsys):
    image = shared_data / "dcmqi_ct3slice/image.nii.gz"
    code = main(["segment", str(image), "--model", str(tiny_segmenter), "-o", str(tmp_path / "out.dcm")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"ar3d: error: {image}: is not a DICOM series") and "DICOM-SEG" in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_a_series_without_uids_is_refused_before_segmenting(shared_data, tiny_segmenter, tmp_path, capsys):
    folder = shared_data / CASES["ct_dicom"][0]
    code = main(["segment", str(folder), "--model", str(tiny_segmenter), "-o", str(tmp_path / "out.dcm")])
    err = capsys.readouterr().err
    assert code == 2
    assert "has no StudyInstanceUID, SeriesInstanceUID" in err and "write the labels as .nii.gz" in err
    assert "batch" not in err  # refused before any window was segmented
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing(series, shared_data, tmp_path, monkeypatch):
    labels, classes = silver_labels(shared_data, "ct3slice")
    volume = read_volume(series["ct3slice"])

    def fail(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"DICM half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", fail)
    result = SegmentationResult(labels, np.zeros(labels.shape, np.float32), volume.affine, classes)
    with pytest.raises(Exception, match="no space left"):
        write_segmentation(result, volume, tmp_path / "seg.dcm", tmp_path / "seg")
    assert list(tmp_path.iterdir()) == []


def test_labels_off_the_series_grid_are_refused(series, shared_data, tmp_path):
    from model_core.io.dicom_seg import write_dicom_seg

    labels, _ = silver_labels(shared_data, "ct3slice")
    volume = read_volume(series["ct3slice"])
    shifted = volume.affine.copy()
    shifted[:3, 3] += volume.affine[:3, 2] * 0.5  # half a slice along k
    with pytest.raises(Ar3dInputError, match="does not lie on a slice of the labels' grid"):
        write_dicom_seg(tmp_path / "x.dcm", labels, shifted, volume.meta["source_files"], {1: "liver"})
    assert list(tmp_path.iterdir()) == []


def test_napari_writer_saves_labels_of_a_dicom_image_as_dicom_seg(series, shared_data, tmp_path):
    """As napari saves a layer: the reader's image layer, a labels layer made on it, the layer's data tuple."""
    from napari.layers import Image, Labels

    from napari_ar3d._reader import read_layers
    from napari_ar3d._writer import write_dicom_seg, write_labels

    data, kwargs, _ = read_layers(str(series["ct_dicom"]))[0]
    image = Image(data, **kwargs)
    labels, classes = silver_labels(shared_data, "ct_dicom")
    layer = Labels(labels.transpose(2, 1, 0), affine=image.affine.affine_matrix, metadata=dict(image.metadata),
                   features={"index": list(range(len(classes) + 1)), "class": ["background", *classes]})
    layer.metadata["algorithm"] = {"name": "ar3d-ct-organs", "version": "test"}  # as the Segment widget records it
    written = write_dicom_seg(str(tmp_path / "seg.dcm"), *layer.as_layer_data_tuple()[:2])
    write_labels(str(tmp_path / "seg.nii.gz"), *layer.as_layer_data_tuple()[:2])
    seg = assert_matches_nifti(Path(written[0]), tmp_path / "seg.nii.gz", series["ct_dicom"])
    assert [d.SegmentLabel for d in seg.SegmentSequence] == classes
    assert {d.SegmentAlgorithmType for d in seg.SegmentSequence} == {"SEMIAUTOMATIC"}  # a person may have edited it

    plain = Labels(layer.data, affine=image.affine.affine_matrix)  # napari's "new labels": no DICOM source
    with pytest.raises(Ar3dInputError, match="not on an image opened from a DICOM series"):
        write_dicom_seg(str(tmp_path / "plain.dcm"), *plain.as_layer_data_tuple()[:2])
    assert not (tmp_path / "plain.dcm").exists()


def test_the_manifest_offers_dicom_seg_for_labels():
    import npe2

    manifest = npe2.PluginManifest.from_file(Path(__file__).resolve().parents[1] / "napari_ar3d" / "napari.yaml")
    writers = {w.command: w for w in manifest.contributions.writers}
    assert writers["napari-ar3d.write_dicom_seg"].filename_extensions == [".dcm"]
    assert [str(t) for t in writers["napari-ar3d.write_dicom_seg"].layer_types] == ["labels"]
