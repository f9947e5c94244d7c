"""The ShapeWorld oracle: read a scene's facts back from any 64x64 image, and score identity.

`analyze(image)` estimates the background from the image border, segments the object as the
largest connected region that differs from that background, then reads shape (template IoU),
colour (nearest palette colour of the object's core pixels), size (bounding-box extent) and
position (nearest position centre). It is validated on fresh renders (tests/test_toy_oracle.py)
and is the toy analogue of the paper's CLIP/DINO metrics.

`identity_score(image)` compares the subject's pattern with the personal subject's, in a frame
normalized to the object's bounding box: insensitive to position and size, sensitive to pattern.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from . import world

_BG = {k: np.array(v, np.float32) / 255 for k, v in world.BACKGROUNDS.items()}
_PALETTE = {k: np.array(v, np.float32) / 255 for k, v in world.COLOURS.items()}
FG_THRESHOLD = 0.2  # RGB distance (0..1 per channel) from the background that marks the object
SIZE_THRESHOLD = 14.0  # px: estimated R between small (R = 12) and big (R = 16) objects
CANON = 24  # side of the normalized frame for shape templates and identity


@dataclass
class SceneFacts:
    """What the oracle reads from an image. Fields are None when no object is found."""
    background: str
    shape: str | None
    colour: str | None
    position: str | None
    size: str | None
    mask: np.ndarray = field(repr=False)  # (64, 64) bool subject mask
    bbox: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1), x1/y1 exclusive

    @property
    def found(self) -> bool:
        return self.shape is not None

    def matches(self, attrs: dict) -> dict[str, bool]:
        """For each attribute stated in `attrs` (e.g. world.parse_prompt output), whether this
        image satisfies it."""
        return {a: getattr(self, a) == v for a, v in attrs.items()
                if v is not None and a in ("shape", "colour", "position", "size", "background")}


def _as_array(image) -> np.ndarray:
    """Accept a PIL image, a uint8 HxWx3 array or a float array in [0, 1]; return float [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"oracle expects an RGB image of shape (H, W, 3), got {a.shape}")
    return a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)


def _classify_background(img: np.ndarray) -> tuple[str, np.ndarray]:
    border = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3),
                             img[:, :3].reshape(-1, 3), img[:, -3:].reshape(-1, 3)])
    med = np.median(border, axis=0)
    name = min(_BG, key=lambda k: np.linalg.norm(_BG[k] - med))
    return name, med


@lru_cache(maxsize=None)
def _template(shape: str) -> np.ndarray:
    """The shape's canonical mask cropped to its bounding box, resized to CANON x CANON."""
    m = world.shape_mask(shape, (64, 64), 56, size=128) > 0.5
    ys, xs = np.nonzero(m)
    crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return _resize_mask(crop, CANON)


@lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area in px of the shape drawn with R = 1 (measured at R = 56)."""
    return float(world.shape_mask(shape, (64, 64), 56, size=128).sum() / 56 ** 2)


def _resize_mask(m: np.ndarray, side: int) -> np.ndarray:
    im = Image.fromarray(m.astype(np.uint8) * 255).resize((side, side), Image.BILINEAR)
    return np.asarray(im) > 127


def _crop_canon(a: np.ndarray, bbox, side: int = CANON, resample=Image.BILINEAR) -> np.ndarray:
    x0, y0, x1, y1 = bbox
    crop = a[y0:y1, x0:x1]
    if crop.dtype == bool:
        return _resize_mask(crop, side)
    im = Image.fromarray(np.clip(crop * 255, 0, 255).astype(np.uint8)).resize((side, side), resample)
    return np.asarray(im, np.float32) / 255


def subject_mask(img: np.ndarray, bg_colour: np.ndarray) -> np.ndarray:
    """Largest connected region that differs from the background colour, holes filled."""
    diff = np.linalg.norm(img - bg_colour, axis=-1) > FG_THRESHOLD
    labels, n = ndimage.label(diff)
    if n == 0:
        return np.zeros(diff.shape, bool)
    sizes = ndimage.sum(diff, labels, range(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def analyze(image) -> SceneFacts:
    """Read background, shape, colour, position, size and subject mask from a ShapeWorld image."""
    img = _as_array(image)
    if img.shape[:2] != (world.SIZE, world.SIZE):
        raise ValueError(f"oracle expects a {world.SIZE}x{world.SIZE} image, got {img.shape[:2]}")
    bg, bg_colour = _classify_background(img)
    mask = subject_mask(img, bg_colour)
    if mask.sum() < 12:  # nothing object-like (a 22 px object covers > 150 px)
        return SceneFacts(bg, None, None, None, None, mask)
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    canon = _crop_canon(mask, bbox)
    shape = max(world.SHAPES, key=lambda s: _iou(canon, _template(s)))
    core = ndimage.binary_erosion(mask, iterations=1)
    pix = img[core if core.sum() >= 4 else mask]
    med = np.median(pix, axis=0)
    colour = min(_PALETTE, key=lambda k: np.linalg.norm(_PALETTE[k] - med))
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    position = min(world.POSITIONS, key=lambda p: np.hypot(cx - world.POSITIONS[p][0],
                                                           cy - world.POSITIONS[p][1]))
    radius = np.sqrt(mask.sum() / _unit_area(shape))  # R of a shape with this area
    size = "big" if radius >= SIZE_THRESHOLD else "small"
    return SceneFacts(bg, shape, colour, position, size, mask, bbox)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ----------------------------------------------------------------------------- identity
IDENTITY_SIGMA = 0.2  # colour tolerance (RGB distance) of the per-pixel pattern agreement


def identity_score(image, facts: SceneFacts | None = None, shape: str = world.SUBJECT_CLASS,
                   pattern: world.Pattern = world.SUBJECT_PATTERN) -> float:
    """Similarity in [0, 1] of the image's object to a patterned subject.

    The object's centroid and equivalent radius R (from its area, as if it had the subject's
    shape) define a frame that ignores position, size and rotation. Pixels well inside the core
    disc (distance < 0.75 r_core R) are compared with the core colour, object pixels well
    outside it (> 1.3 r_core R, not on the edge) with the body colour; agreement is
    exp(-d^2 / 2 sigma^2) of the RGB distance d. The score is the geometric mean of the two
    regions' mean agreement, so for a two-colour look a plain object in either colour scores
    near 0; a uniform look (the subject's) compares both regions with its one colour. 0 when no
    object.
    """
    img = _as_array(image)
    facts = facts or analyze(img)
    if not facts.found:
        return 0.0
    mask = facts.mask
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    radius = np.sqrt(mask.sum() / _unit_area(shape))
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    dist = np.hypot(yy - cy, xx - cx) / (radius * pattern.core_radius)
    core = mask & (dist < 0.75)
    body = ndimage.binary_erosion(mask) & (dist > 1.3)
    if core.sum() == 0 or body.sum() == 0:
        return 0.0

    def agreement(region, colour):
        d = np.linalg.norm(img[region] - np.array(colour, np.float32) / 255, axis=-1)
        return float(np.exp(-d ** 2 / (2 * IDENTITY_SIGMA ** 2)).mean())

    return float(np.sqrt(agreement(body, pattern.body) * agreement(core, pattern.core)))
