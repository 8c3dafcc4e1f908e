"""Open the files `ar3d demo` wrote in a real napari viewer and save a screenshot for the README.

The real-scan demo: TotalSegmentator's example CT (Apache-2.0), the liver segmented from the
simulated strokes, the strokes themselves, and the silver labels' liver outline for comparison.

    ar3d demo --out ar3d-demo
    xvfb-run -a python docs/scripts/demo_screenshot.py ar3d-demo docs/images/demo_napari.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import napari
import numpy as np

FILES = ["ct.nii.gz", "ct_silver_labels.nii.gz", "ct_liver_seg.nii.gz", "ct_scribble_labels.nii.gz"]
LIVER = 5  # in the silver labels (labels.json)
CLEAR = (0.0, 0.0, 0.0, 0.0)


def main(demo_dir: Path, out_png: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 860)
    for name in FILES:
        viewer.open(demo_dir / name, plugin="napari-ar3d")
    silver = viewer.layers["ct_silver_labels"]
    silver.data = np.where(np.asarray(silver.data) == LIVER, 1, 0).astype(np.int32)  # the liver alone, outlined
    silver.contour, silver.opacity, silver.name = 2, 1.0, "silver liver (TotalSegmentator)"
    silver.colormap = {None: CLEAR, 1: "lime"}
    seg = viewer.layers["ct_liver_seg"]
    seg.opacity, seg.name = 0.45, "liver from the strokes"
    seg.colormap = {None: CLEAR, 1: "magenta"}
    strokes = viewer.layers["ct_scribble_labels"]
    strokes.opacity, strokes.name = 1.0, "strokes: background yellow, liver cyan"
    strokes.colormap = {None: CLEAR, 1: "yellow", 2: "cyan"}
    painted = np.argwhere(np.asarray(strokes.data) == 2)  # (k, j, i): show a slice the user painted on
    k = np.bincount(painted[:, 0]).argmax()
    viewer.dims.set_point(0, strokes.data_to_world([k, 0, 0])[0])
    viewer.reset_view()
    viewer.screenshot(str(out_png), canvas_only=False, flash=False)
    viewer.close()
    print(f"wrote {out_png}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
