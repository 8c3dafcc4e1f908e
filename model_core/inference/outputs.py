"""Segmentation outputs on disk: where each input's files go, and writing them all or none.

`segment_files` is `ar3d segment` without the command line: it checks every input before
segmenting any, segments each, and writes its label map (last), its class names and, on request,
its probability and uncertainty maps, in the input's own geometry. A `.dcm` output of a DICOM
series is a DICOM-SEG (`model_core.io.dicom_seg`) that holds the class names itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_core.checkpoint.store import WEIGHTS_FILE
from model_core.errors import Ar3dInputError
from model_core.inference.segment import SegmentationResult, Segmenter, segment
from model_core.io.dicom_seg import Algorithm, is_dicom_seg_path, model_algorithm, read_sources, write_dicom_seg
from model_core.io.volume import (
    WRITE_SUFFIXES,
    Volume,
    read_volume,
    split_suffix,
    volume_format,
    write_label_names,
    write_volume,
)
from model_core.progress import ProgressFn


@dataclass
class SegmentedFile:
    """One input's outputs."""

    labels: Path  # the label map
    classes: list[str]  # class names, label values 1..K
    voxels: list[int]  # voxels of each class
    files: list[Path]  # every file written for this input (probabilities, names, the label map)


def output_paths(inputs: Sequence[str | os.PathLike], output: Path) -> list[tuple[Path, Path]]:
    """(label file, stem for the probability files) of each input.

    One input: `output` itself, e.g. out.nii.gz and out_prob_<class>.nii.gz, or out.dcm (a DICOM-SEG, for
    a DICOM input only). Several (or `output` is a folder): <output>/<input name>_seg.<ext> and
    <output>/<input name>_prob_<class>.<ext>.
    """
    if len(inputs) == 1 and not output.is_dir():
        if is_dicom_seg_path(output) and volume_format(inputs[0]) != "dicom":
            raise Ar3dInputError(f"is not a DICOM series, so its labels cannot be written as DICOM-SEG "
                                 f"({output.name}); use {', '.join(WRITE_SUFFIXES)}", inputs[0])
        if not output.name.lower().endswith(WRITE_SUFFIXES) and not is_dicom_seg_path(output):
            raise Ar3dInputError(f"the output must end with one of {', '.join(WRITE_SUFFIXES)}, .dcm (DICOM-SEG of a "
                                 "DICOM input) or be a folder", output)
        if not output.parent.is_dir():
            raise Ar3dInputError(f"folder {output.parent} does not exist", output)
        return [(output, output.parent / split_suffix(output)[0])]
    if output.exists() and not output.is_dir():
        raise Ar3dInputError("with several inputs the output must be a folder, and this is a file", output)
    targets = []
    for item in inputs:
        stem, suffix = split_suffix(Path(item))
        targets.append((output / f"{stem}_seg{suffix if suffix.lower() in WRITE_SUFFIXES else '.nii.gz'}", output / stem))
    names = [t.name for t, _ in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise Ar3dInputError(f"several inputs would write {', '.join(duplicates)}; segment them into separate folders")
    output.mkdir(parents=True, exist_ok=True)
    return targets


def write_segmentation(
    result: SegmentationResult, volume: Volume, target: Path, stem: Path, probabilities: bool = False,
    algorithm: Algorithm | None = None, names: dict[int, str] | None = None,
) -> list[Path]:
    """Write one input's outputs; the label map last, so an input's files appear together or not at all.

    A `.dcm` target is a DICOM-SEG of the DICOM series `volume` was read from, made by `algorithm`;
    its probability maps are NIfTI. names: label value -> class name, in the order of the probability
    channels after the background (default: value k is `result.classes[k - 1]`).
    """
    names = dict(enumerate(result.classes, 1)) if names is None else names
    dicom_seg = is_dicom_seg_path(target)
    written: list[Path] = []
    try:
        if probabilities:
            suffix = ".nii.gz" if dicom_seg else split_suffix(target)[1]
            for name, prob in zip(["background", *names.values()], result.probabilities):
                written.append(write_volume(f"{stem}_prob_{file_safe(name)}{suffix}", prob,
                                            volume.affine, kind="float", like=volume))
            written.append(write_volume(f"{stem}_uncertainty{suffix}", result.uncertainty,
                                        volume.affine, kind="float", like=volume))
        if dicom_seg:
            written.append(write_dicom_seg(target, result.labels, volume.affine, volume.meta.get("source_files", []),
                                           names, algorithm))
        else:
            written.append(write_label_names(target, names))
            written.append(write_volume(target, result.labels, volume.affine, kind="labels", like=volume))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def segment_files(
    segmenter: Segmenter,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    probabilities: bool = False,
    progress_for: Callable[[str], ProgressFn] | None = None,
    **options,
) -> list[SegmentedFile]:
    """Segment each input and write its outputs (see `output_paths`); `options` go to `segment`.

    progress_for: given an input's file name, the progress callback for segmenting it.
    """
    for item in inputs:
        if not Path(item).exists():
            raise Ar3dInputError("file not found", item)
        if volume_format(item) is None:
            raise Ar3dInputError("not a NIfTI, NRRD, MHA/MHD file or DICOM folder", item)
    done = []
    targets = output_paths(inputs, Path(output))
    algorithm = segmenter_algorithm(segmenter) if any(is_dicom_seg_path(t) for t, _ in targets) else None
    for item, (target, stem) in zip(inputs, targets):
        volume = read_volume(item)
        if is_dicom_seg_path(target):  # a series a DICOM-SEG cannot reference fails before segmenting
            read_sources(volume.meta.get("source_files", []), item)
        progress = progress_for(Path(item).name) if progress_for else None
        result = segment(segmenter, volume, probabilities=probabilities, progress=progress, **options)
        files = write_segmentation(result, volume, target, stem, probabilities, algorithm)
        voxels = [int((result.labels == k).sum()) for k in range(1, len(result.classes) + 1)]
        done.append(SegmentedFile(target, list(result.classes), voxels, files))
    return done


def segmenter_algorithm(segmenter: Segmenter) -> Algorithm:
    """How a DICOM-SEG names the model: its folder name and the sha256 of its weights."""
    if segmenter.path is None:
        raise Ar3dInputError("a DICOM-SEG names the model that made it; this model was not loaded from a folder")
    return model_algorithm(Path(segmenter.path).name, Path(segmenter.path) / WEIGHTS_FILE)


def file_safe(name: str) -> str:
    """A class name as part of a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
