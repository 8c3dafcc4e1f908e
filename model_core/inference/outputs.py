"""Segmentation outputs on disk: where each input's files go, and writing them all or none.

`segment_files` is `ar3d segment` without the command line: it checks every input before
segmenting any, segments each, and writes its label map (last), its class names and, on request,
its probability and uncertainty maps, in the input's own geometry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_core.errors import Ar3dInputError
from model_core.inference.segment import SegmentationResult, Segmenter, segment
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

    One input: `output` itself, e.g. out.nii.gz and out_prob_<class>.nii.gz. Several (or `output` is a
    folder): <output>/<input name>_seg.<ext> and <output>/<input name>_prob_<class>.<ext>.
    """
    if len(inputs) == 1 and not output.is_dir():
        if not output.name.lower().endswith(WRITE_SUFFIXES):
            raise Ar3dInputError(f"the output must end with one of {', '.join(WRITE_SUFFIXES)} (or be a folder)", output)
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
    result: SegmentationResult, volume: Volume, target: Path, stem: Path, probabilities: bool = False
) -> list[Path]:
    """Write one input's outputs; the label map last, so an input's files appear together or not at all."""
    written: list[Path] = []
    try:
        if probabilities:
            suffix = split_suffix(target)[1]
            for name, prob in zip(["background", *result.classes], result.probabilities):
                written.append(write_volume(f"{stem}_prob_{file_safe(name)}{suffix}", prob,
                                            volume.affine, kind="float", like=volume))
            written.append(write_volume(f"{stem}_uncertainty{suffix}", result.uncertainty,
                                        volume.affine, kind="float", like=volume))
        written.append(write_label_names(target, dict(enumerate(result.classes, 1))))
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
    for item, (target, stem) in zip(inputs, output_paths(inputs, Path(output))):
        volume = read_volume(item)
        progress = progress_for(Path(item).name) if progress_for else None
        result = segment(segmenter, volume, probabilities=probabilities, progress=progress, **options)
        files = write_segmentation(result, volume, target, stem, probabilities)
        voxels = [int((result.labels == k).sum()) for k in range(1, len(result.classes) + 1)]
        done.append(SegmentedFile(target, list(result.classes), voxels, files))
    return done


def file_safe(name: str) -> str:
    """A class name as part of a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
