"""Image grids with captions, for samples/step_N.png and before/after comparisons."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from torch import Tensor


def save_grid(images: Tensor, captions: Sequence[str], path: Path, title: str = "", columns: int = 8) -> None:
    """images (N,3,H,W) in [0,1] -> one PNG, each image above its wrapped caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.3 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            axis.imshow(images[index].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            axis.set_title(textwrap.fill(captions[index], 24), fontsize=6)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
