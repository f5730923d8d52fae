"""The captioned grid: each image where the layout puts it, its caption below it, the score line kept."""
import numpy as np
import torch
from PIL import Image

from rlr_cli.images import CAPTION_LINES, CELL, LINE_HEIGHT, PAD, _caption_lines, save_grid


def test_grid_places_each_image_and_writes_its_caption_below(tmp_path):
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "grid.png"
    save_grid(images, [f"prompt {i}\nr={i}" for i in range(5)], path, title="step 3", columns=3)
    grid = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255
    caption_room, title_room = CAPTION_LINES * LINE_HEIGHT + PAD, LINE_HEIGHT + 2 * PAD
    assert grid.shape == (title_room + PAD + 2 * (CELL + caption_room + PAD), PAD + 3 * (CELL + PAD), 3)
    for index in range(5):
        row, column = divmod(index, 3)
        top, left = title_room + PAD + row * (CELL + caption_room + PAD), PAD + column * (CELL + PAD)
        cell = grid[top : top + CELL, left : left + CELL]
        expected = images[index].repeat_interleave(4, 1).repeat_interleave(4, 2).permute(1, 2, 0).numpy()
        assert np.abs(cell - expected).max() <= 0.5 / 255 + 1e-6
        caption = grid[top + CELL : top + CELL + caption_room, left : left + CELL]
        assert (caption < 0.5).any(), f"no caption under image {index}"
    empty = grid[title_room + PAD + CELL + caption_room + PAD :, PAD + 2 * (CELL + PAD) :]
    assert (empty == 1.0).all(), "the unused sixth cell stays white"


def test_long_captions_are_cut_but_keep_the_score_line():
    lines = _caption_lines(" ".join(["word"] * 60) + "\nr=5.1", chars=20)
    assert len(lines) == CAPTION_LINES and lines[-1] == "r=5.1" and lines[-2].endswith("...")
