"""Seconds to draw one captioned evaluation grid (rlr_cli/images.py), by image count and image size.

    python scripts/bench_grid.py            # 16, 64 and 128 images at 32 px (the toy world) and 512 px (SD 1.x)

The trainer draws one such grid per evaluation; the main job's `eval_seconds` (metrics.jsonl) is the whole
evaluation (sampling, scoring, the grid). Times are the fastest of --repeats.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlr_cli.images import save_grid  # noqa: E402


def seconds(count: int, side: int, repeats: int, folder: Path) -> float:
    images = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(0))
    captions = [f"a large red circle on a white background, number {i}\nr={i / 10:.3g}" for i in range(count)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        save_grid(images, captions, folder / "grid.png", title="bench")
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| images | side (px) | seconds |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for side in (32, 512):
            for count in (16, 64, 128):
                print(f"| {count} | {side} | {seconds(count, side, args.repeats, Path(folder)):.3f} |", flush=True)


if __name__ == "__main__":
    main()
