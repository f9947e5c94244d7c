"""Training-data augmentations of a few DreamBooth reference photos (the toy LoRAs' copies,
`toy.personal.ToyPersonalConfig`): the subject pasted on solid backdrops and the photos
re-framed (zoomed, moved, mirrored, the random crop and flip of DreamBooth trainers). Pure numpy
on uint8 (n, H, W, 3) images, seeded."""
from __future__ import annotations

import numpy as np


def paste_on_backdrops(images: np.ndarray, masks: np.ndarray, n: int,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The images and masks followed by `n` composites: image i % len(images)'s subject pixels
    on a solid backdrop of a uniformly random RGB colour (drawn from `seed`)."""
    rng = np.random.default_rng(seed)
    masks = np.asarray(masks, bool)
    out = []
    for i in range(n):
        j = i % len(images)
        backdrop = rng.integers(0, 256, 3).astype(np.float32)  # (3,)
        m = masks[j][..., None].astype(np.float32)  # (H, W, 1)
        out.append((m * images[j] + (1 - m) * backdrop).round().astype(np.uint8))
    if not out:
        return images, masks
    return (np.concatenate([images, np.stack(out)]),
            np.concatenate([masks, masks[np.arange(n) % len(images)]]))


def reframe(images: np.ndarray, n: int, scale: tuple[float, float] = (0.5, 1.2),
            seed: int = 0, shift: float | None = None, masks: np.ndarray | None = None):
    """`n` re-framed copies (n, H, W, 3) uint8 of the photos (image i % len(images)): zoomed by
    a factor drawn uniformly from `scale` (< 1 shrinks the photo onto a canvas of its median
    border colour, > 1 crops it), placed at a random offset, mirrored with probability 1/2.
    The offset keeps the zoomed photo inside the frame (or covering it) when `shift` is None;
    otherwise its centre moves by up to `shift` x the side in x and y (ToyPersonalConfig).
    With `masks` ((n_images, H, W) bool) returns (copies, their masks), moved the same way."""
    from PIL import Image

    lo, hi = _check_scale(scale)
    _check_shift(shift)
    rng = np.random.default_rng(seed)
    size = images.shape[1]
    out, out_masks = [], []
    for i in range(n):
        img = images[i % len(images)]
        s = rng.uniform(lo, hi)
        side = max(1, int(round(size * s)))
        zoomed = np.asarray(Image.fromarray(img).resize((side, side), Image.BICUBIC))
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (4 size, 3)
        canvas = np.empty_like(img)
        canvas[:] = np.median(border, axis=0).astype(np.uint8)
        # offset of the zoomed photo's corner in the canvas (negative: the photo is cropped)
        if shift is None:
            lo_off, hi_off = min(0, size - side), max(0, size - side)
        else:
            reach = int(round(shift * size))
            lo_off, hi_off = (size - side) // 2 - reach, (size - side) // 2 + reach
        ox, oy = (int(rng.integers(lo_off, hi_off + 1)) for _ in range(2))
        x0, y0 = max(ox, 0), max(oy, 0)
        x1, y1 = min(ox + side, size), min(oy + side, size)
        mirror = rng.random() < 0.5
        m_canvas = np.zeros(img.shape[:2], bool)
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = zoomed[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            if masks is not None:
                m = np.asarray(Image.fromarray(np.asarray(masks[i % len(images)], np.uint8) * 255)
                               .resize((side, side), Image.NEAREST)) > 127
                m_canvas[y0:y1, x0:x1] = m[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        out.append(canvas[:, ::-1] if mirror else canvas)
        out_masks.append(m_canvas[:, ::-1] if mirror else m_canvas)
    return np.stack(out) if masks is None else (np.stack(out), np.stack(out_masks))


def _check_shift(shift) -> None:
    if shift is not None and not 0 <= shift <= 0.5:
        raise ValueError(f"layout_shift must be None or a fraction of the side in [0, 0.5], "
                         f"got {shift}")


def _check_scale(scale) -> tuple[float, float]:
    lo, hi = scale
    if not 0 < lo <= hi:
        raise ValueError(f"layout_scale must be (low, high) zoom factors with 0 < low <= high, "
                         f"got {scale}")
    return lo, hi
