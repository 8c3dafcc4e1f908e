"""Time `model_core.io.volume.read_volume` on every image of the shared data (largest first).

    python benchmarks/read_speed.py [--data ../shared/data] [--repeat 3]

Prints a Markdown table: case, shape, megavoxels, first read and the median of the repeats.
Drop the page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches`, as root) for a cold first read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_core.io.volume import read_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("AR3D_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", default=default, help="folder holding manifest.json")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.data)
    cases = json.loads((root / "manifest.json").read_text())["cases"]
    rows = []
    for case in cases:
        path = root / case["image"]
        times = []
        for _ in range(1 + args.repeat):
            start = time.perf_counter()
            volume = read_volume(path)
            times.append(time.perf_counter() - start)
        rows.append((volume.array.size, case["id"], volume.shape, times[0], statistics.median(times[1:])))
    print("| case | shape | Mvoxels | first read (s) | median of repeats (s) |\n|---|---|---|---|---|")
    for size, name, shape, first, median in sorted(rows, key=lambda r: -r[0]):
        print(f"| {name} | {'x'.join(map(str, shape))} | {size / 1e6:.2f} | {first:.3f} | {median:.3f} |")


if __name__ == "__main__":
    main()
