"""Figures (matplotlib) and fast latent previews."""
from __future__ import annotations

import numpy as np


def image_grid(images, titles=None, ncols: int | None = None, scale: float = 1.6,
               row_labels=None, suptitle: str | None = None):
    """A matplotlib Figure showing uint8 images (n, H, W, 3) in a grid with small titles."""
    import matplotlib.pyplot as plt

    images = list(images)
    n = len(images)
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + 0.3),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i], interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=6)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            axes[r, 0].set_ylabel(label, fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float image(s) in [0, 1] or [-1, 1] (auto-detected) to uint8."""
    x = np.asarray(x, dtype=np.float32)
    if x.min() < 0:
        x = (x + 1) / 2
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
