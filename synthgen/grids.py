"""Sample grids with each row's class name beside it, for the filter's and the report's figures.

A bare tile grid (torchvision's ``save_image``) does not say which row is which class, or where
the accepted samples end and the rejected begin; these figures are what a user looks at first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def tile_rows(rows: list[list[np.ndarray]], columns: int, image_shape) -> np.ndarray:
    """(R * (H + 1) + 1, columns * (W + 1) + 1, C) uint8: ``rows`` of (H, W, C) images, grey padding and blanks."""
    height, width, channels = image_shape
    grid = np.full((len(rows) * (height + 1) + 1, columns * (width + 1) + 1, channels), 128, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row[:columns]):
            top, left = 1 + r * (height + 1), 1 + c * (width + 1)
            grid[top : top + height, left : left + width] = image
    return grid


def save_labeled_grid(rows: list[list[np.ndarray]], row_labels, path: Path, image_shape, columns: int,
                      column_groups: tuple[str, ...] = ()) -> Figure:
    """Save ``rows`` (one list of (H, W, C) uint8 images per label) as a PNG with ``row_labels`` on the left; returns the figure.

    ``column_groups`` names equal-width groups of columns (e.g. accepted | rejected), drawn above
    the grid with a line between groups. Tiny images are drawn large (nearest neighbour).
    """
    grid = tile_rows(rows, columns, image_shape)
    figure = Figure(figsize=(max(3.0, 0.42 * columns) + 1.2, 0.42 * len(rows) + 0.5 + 0.25 * bool(column_groups)))
    axis = figure.add_subplot(1, 1, 1)
    axis.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    height, width = image_shape[0] + 1, image_shape[1] + 1
    axis.set_yticks([height * (r + 0.5) for r in range(len(rows))], [str(label) for label in row_labels], fontsize=8)  # row centres
    axis.set_xticks([])
    for group, name in enumerate(column_groups):
        per_group = columns // len(column_groups)
        axis.text(width * per_group * (group + 0.5), -1, name, ha="center", va="bottom", fontsize=9)
        if group:
            axis.axvline(width * per_group * group, color="red", linewidth=1.5)  # on the padding column between groups
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure
