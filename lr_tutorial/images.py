"""Loading reference photos: EXIF orientation, RGB, centre crop, resize to the model's size."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def load_image(path: str | Path, size: int) -> np.ndarray:
    """One photo as uint8 (size, size, 3): EXIF-rotated upright, converted to RGB (alpha
    composited on white), centre-cropped to a square and resized with Lanczos."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image {path} does not exist; check the path")
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); give a PNG or JPEG file") from e
    return prepare(img, size, name=str(path))


def prepare(img: Image.Image | np.ndarray, size: int, name: str = "image") -> np.ndarray:
    """A PIL image or array -> uint8 (size, size, 3), converting what can be converted."""
    if isinstance(img, np.ndarray):
        img = _from_array(img, name)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode == "I;16" or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < 16:
        raise ValueError(f"{name} is {w}x{h}: too small to hold a subject; give at least "
                         f"{size}x{size} pixels")
    if w != h:
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if img.size[0] != size:
        if img.size[0] < size:
            warnings.warn(f"{name} is {img.size[0]} px, upscaled to {size} px", stacklevel=3)
        img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"{name} has shape {a.shape}; expected (H, W, 3) RGB or (H, W, 4) RGBA")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.min() >= 0 and a.max() <= 1:
            a = (a * 255).round().astype(np.uint8)
        else:
            raise ValueError(f"{name} has dtype {a.dtype} with range [{a.min()}, {a.max()}]; "
                             "give uint8 in [0, 255] or floats in [0, 1]")
    return Image.fromarray(a)


def load_images(paths, size: int) -> np.ndarray:
    """Several photos -> uint8 (n, size, size, 3)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no reference images given")
    return np.stack([load_image(p, size) for p in paths])
