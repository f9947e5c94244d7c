"""Loading reference photos: EXIF orientation, RGB, centre crop, resize to the model's size.

What can be converted is converted (RGBA/LA/palette-with-transparency composited on white;
grayscale, CMYK, 16-bit and float images to 8-bit RGB; channels-first tensors to channels-last;
non-square images centre-cropped and small ones upscaled, each with a warning); the rest is
refused with a ValueError that says what is wrong and what to give instead.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 16  # px: below this there is no subject to see


def load_image(path: str | Path, size: int) -> np.ndarray:
    """One photo as uint8 (size, size, 3): EXIF-rotated upright, converted to RGB (alpha
    composited on white), centre-cropped to a square and resized with Lanczos."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image {path} does not exist; check the path")
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1) if getattr(im, "is_animated", False) else 1
            im.load()
            img = ImageOps.exif_transpose(im)
            if frames > 1:  # a GIF's palette is part of what the note says was done
                keep_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                img = img.convert("RGBA" if keep_alpha else "RGB")
                note(f"{path} is animated ({frames} frames): using the first frame; save the "
                     "frame you want as a PNG to choose another")
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{path} is larger than PIL's safety limit of {Image.MAX_IMAGE_PIXELS} pixels ({e}); "
            "downscale it first (the model only needs a few hundred pixels), or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); give a PNG or JPEG file") from e
    return prepare(img, size, name=str(path))


def prepare(img, size: int, name: str = "image") -> np.ndarray:
    """A PIL image, numpy array or torch tensor -> uint8 (size, size, 3), converting what can
    be converted (see the module docstring) and refusing the rest with a ValueError."""
    if not isinstance(img, Image.Image):
        img = _from_array(_to_numpy(img, name), name)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            img.mode == "P" and "transparency" in img.info):
        rgba = _convert(img, "RGBA", name)
        if np.asarray(rgba)[..., 3].min() < 255:
            note(f"{name} has transparent pixels: composited on white (save it without "
                 "transparency to choose the background)")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    elif img.mode == "P":
        note(f"{name} is a palette image: converted to RGB")
    if img.mode.startswith("I"):  # 16- or 32-bit integer grayscale: scale 16-bit to 8-bit
        arr = np.asarray(img, dtype=np.float64)
        if arr.max() > 255:
            arr = arr / 257.0
            note(f"{name} has 16 bits per channel: scaled to 8 bits (x 255/65535)")
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    elif img.mode == "F":
        img = _from_array(np.asarray(img, dtype=np.float32), name, grayscale_float=True)
    img = _convert(img, "RGB", name)
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"{name} is {w}x{h}: too small to hold a subject; give at least "
                         f"{size}x{size} pixels")
    if w != h:
        s = min(w, h)
        if s < 0.8 * max(w, h):  # a crop that cuts more than a fifth: the subject may be cut
            warnings.warn(f"{name} is {w}x{h}, not square: centre-cropped to {s}x{s}; crop it "
                          "yourself to keep the subject whole", stacklevel=3)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if img.size[0] != size:
        if img.size[0] < size:
            warnings.warn(f"{name} is {img.size[0]} px, upscaled to {size} px (blurry); give "
                          f"at least {size}x{size} pixels", stacklevel=3)
        img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def _convert(img: Image.Image, mode: str, name: str) -> Image.Image:
    try:
        return img.convert(mode)
    except ValueError as e:
        raise ValueError(f"{name} has image mode {img.mode!r}, which cannot be converted to "
                         f"{mode} ({e}); save it as an RGB PNG or JPEG") from e


def _to_numpy(x, name: str) -> np.ndarray:
    """numpy arrays as they are (channels last); torch tensors moved to the CPU and, being
    channels first by torch convention, transposed to channels last."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        a = x.detach().cpu()
        a = (a.float() if a.dtype in (torch.float16, torch.bfloat16) else a).numpy()
        if a.ndim == 3 and a.shape[0] in (1, 3, 4):
            a = a.transpose(1, 2, 0)
        return a
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name} is a {type(x).__name__}; give a file path, a PIL image, a uint8 "
                     "numpy array (H, W, 3) or a torch tensor (3, H, W)")


def _from_array(a: np.ndarray, name: str, grayscale_float: bool = False) -> Image.Image:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # channels first (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"{name} has shape {a.shape}; expected one image (H, W, 3) RGB, "
                         "(H, W, 4) RGBA, (H, W) grayscale or a channels-first (3, H, W) tensor "
                         "(for several images: a list, or a batch (N, H, W, 3))")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); give an image")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values; give finite pixels")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 1:
            a = a * 255
        elif not (grayscale_float and lo >= 0 and hi <= 255):
            hint = " (looks like [-1, 1]: map it with (x + 1) / 2)" if lo >= -1 and hi <= 1 else ""
            raise ValueError(f"{name} has dtype {a.dtype} with range [{lo:g}, {hi:g}]{hint}; "
                             "give uint8 in [0, 255] or floats in [0, 1]")
        a = np.clip(a, 0, 255).round().astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a / 257.0).round().astype(np.uint8)  # 16-bit -> 8-bit
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{name} has dtype {a.dtype} with range [{lo}, {hi}]; give uint8 "
                             "in [0, 255] (or uint16 for 16-bit images)")
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {a.dtype}; give uint8 in [0, 255] or floats in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a))


def as_batch(images, size: int, name: str = "reference_images") -> np.ndarray:
    """Reference images in any accepted form -> uint8 (n, size, size, 3): a path, a PIL image,
    an array (H, W[, C]) or tensor (C, H, W), a batch (N, H, W, C) array or (N, C, H, W)
    tensor, or a list of any of these. Converted and checked image by image (prepare)."""
    if isinstance(images, (str, Path)):
        items = list(expand(images))  # a folder: its image files
    elif isinstance(images, Image.Image):
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        a = _to_numpy(images, name) if not isinstance(images, np.ndarray) else images
        if a.ndim == 4:
            channels_first = not isinstance(images, np.ndarray) or (
                a.shape[1] in (1, 3, 4) and a.shape[3] not in (1, 3, 4))
            items = list(a.transpose(0, 2, 3, 1) if channels_first else a)
        else:
            items = [images]
    if not items:
        raise ValueError(f"{name} is empty; give at least one photo of the subject")
    out = []
    for i, item in enumerate(items):
        label = f"{name}[{i}]"
        if isinstance(item, (str, Path)):
            out.append(load_image(item, size))
        else:
            out.append(prepare(item, size, name=label))
    return np.stack(out)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageNote(UserWarning):
    """A reference image was converted (transparency, animation, palette, bit depth)."""


def note(message: str) -> None:
    """A one-line notice of a conversion (an ImageNote warning)."""
    warnings.warn(message, ImageNote, stacklevel=4)


def expand(paths) -> list[Path]:
    """Files and folders -> image files: a folder gives its image files (by suffix, sorted,
    hidden files skipped). FileNotFoundError for a missing path; ValueError for a folder with
    no image file, naming what it holds."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                           and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                held = sorted(q.name for q in p.iterdir())[:5]
                raise ValueError(f"reference folder {p} holds no image file ({', '.join(held) or 'it is empty'}); "
                                 f"put PNG or JPEG photos of the subject in it")
            out += found
        elif not p.exists():
            raise FileNotFoundError(f"reference image {p} does not exist; check the path")
        else:
            out.append(p)
    return out


def check_files(paths) -> list[Path]:
    """The usable image files among `paths` (files or folders, `expand`), each opened and
    decoded (cheap: no model needed). A file that is not a readable image is refused with a
    ValueError naming it; so is a list with no usable image."""
    files = expand(paths)
    if not files:
        raise ValueError("no reference images given; pass the paths of a few photos of the subject")
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Image.DecompressionBombError as e:
            raise ValueError(f"{f} is larger than PIL's safety limit of {Image.MAX_IMAGE_PIXELS} "
                             "pixels; downscale it first") from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{f} is not a readable image ({e}); give a PNG or JPEG file") from e
    return files


def load_images(paths, size: int) -> np.ndarray:
    """Several photos (files, or folders of them) -> uint8 (n, size, size, 3)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no reference images given; pass the paths of a few photos of the subject")
    return np.stack([load_image(p, size) for p in expand(paths)])
