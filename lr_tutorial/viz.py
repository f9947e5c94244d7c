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


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """Tint an image where a soft mask (h, w) in [0, 1] (any resolution) is high."""
    from .masks import resize
    m = resize(np.asarray(mask, np.float32), image.shape[0])[..., None] * alpha
    return (image * (1 - m) + np.array(colour) * m).round().astype(np.uint8)


def result_panel(result, bundle, index: int = 0, n_x0: int = 6):
    """One image's story: reference, its mask, the layout x^c, attention and fused mask of the
    context, the final image; below, the target's predicted x0 at a few steps."""
    from . import sampling

    ref = result.reference
    ctx = result.masks.context[index]
    top = [ref.image, overlay(ref.image, ref.mask.mask), result.layout.images[index],
           overlay(result.layout.images[index], ctx.attention, (255, 200, 0)),
           overlay(result.layout.images[index], ctx.mask), result.images[index]]
    titles = ["reference x^r", "reference mask M^r", "layout x^c (stage 1)",
              "class-token attention", "fused mask M^c", "Layout-and-Retouch"]
    if not result.target.x0:  # the target started at the last step: no retouch step to show
        return image_grid(top, titles, ncols=len(top), suptitle=result.prompts[index])
    ks = np.linspace(0, len(result.target.x0) - 1, n_x0).round().astype(int)
    x0 = sampling.decode(bundle, __import__("torch").cat(
        [result.target.x0[k][index:index + 1] for k in ks]))
    titles += [f"target x0, step {k}" for k in ks]
    ncols = max(len(top), n_x0)
    pad = [np.full_like(top[0], 255)] * (ncols - len(top)) if ncols > len(top) else []
    return image_grid(top + pad + list(x0), titles[:len(top)] + [""] * len(pad) + titles[len(top):],
                      ncols=ncols, suptitle=result.prompts[index])
