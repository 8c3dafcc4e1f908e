"""Open the files `ar3d demo` wrote in a real napari viewer and save a screenshot for the README.

    ar3d demo --out ar3d-demo
    xvfb-run -a python docs/scripts/demo_screenshot.py ar3d-demo docs/images/demo_napari.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import napari
import numpy as np


def main(demo_dir: Path, out_png: Path) -> None:
    files = ["ct_phantom.nii.gz", "ct_phantom_seg.nii.gz", "explain/attention.nii.gz"]
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 860)
    for name in files:
        viewer.open(demo_dir / name, plugin="napari-ar3d")
    attention = viewer.layers["attention"]
    attention.colormap, attention.blending, attention.opacity = "inferno", "additive", 0.7
    seg = viewer.layers["ct_phantom_seg"]
    seg.opacity = 0.45
    liver = np.argwhere(np.asarray(seg.data) == 1).mean(axis=0)  # the demo's query voxel is in the liver
    world = seg.data_to_world(liver)
    viewer.dims.set_point(0, world[0])
    viewer.reset_view()
    viewer.screenshot(str(out_png), canvas_only=False, flash=False)
    viewer.close()
    print(f"wrote {out_png}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
