"""ShapeWorld: 64x64 scenes of one object on a background, and the caption grammar.

A scene is a handful of discrete attributes (shape, colour, size, position, background) plus a
little continuous jitter. `render(scene)` turns it into an RGB uint8 array, deterministically
given the scene (the texture seed is part of the scene). Captions mention any subset of the
attributes: "a red star on the left in the snow", "a star", "a small circle at night".

The personal subject (identifier `sks`, class noun `star`) is a teal star: a colour that no
caption can name (teal is not in the palette). The model card data/toy/README.md says why.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down (anti-aliased edges)

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {  # name -> RGB; chosen to stay far from every background's colour
    "red": (215, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (240, 220, 50),
    "blue": (45, 85, 225),
    "purple": (140, 60, 200),
    "pink": (245, 130, 190),
}
SIZES = {"small": 12.0, "big": 16.0}  # half-extent R in pixels: ~24 px and ~32 px objects
POSITIONS = {  # name -> (x, y) centre in pixels
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
    "top": (32.0, 18.0),
    "bottom": (32.0, 46.0),
    "centre": (32.0, 32.0),
}
POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "centre": "in the centre",
}
BACKGROUNDS = {  # name -> base RGB; textures are added in `_background`
    "snow": (236, 241, 250),
    "grass": (78, 135, 62),
    "beach": (228, 203, 152),
    "night": (20, 24, 58),
    "plain": (206, 203, 198),  # the plain light backdrop of DreamBooth-style photos
}
BACKGROUND_PHRASES = {
    "snow": "in the snow", "grass": "on the grass", "beach": "on the beach",
    "night": "at night", "plain": "on a plain background",
}
# Rare words the vanilla model never sees in training: identifiers for personal subjects.
IDENTIFIERS = ("sks", "zwx", "qrv", "vpq")

# The personal subject: its class noun is a shape; its look is one colour outside the palette.
# It is uniform on purpose: a retouch reads the look through self-attention, and a 16x16
# latent's attention carries a colour from the reference photo but not where inside the object
# a second colour goes (a swap never moved the orange core of a two-colour look;
# data/toy/README.md).
SUBJECT_IDENTIFIER = "sks"
SUBJECT_CLASS = "star"
SUBJECT_BODY = (20, 160, 150)  # teal
SUBJECT_CORE = SUBJECT_BODY  # uniform: the core disc has the body's colour
SUBJECT_CORE_RADIUS = 0.42  # core radius as a fraction of R (of two-colour looks)


@dataclass(frozen=True)
class Pattern:
    """A look: body colour plus a centred disc of a core colour (uniform when they are equal;
    the free looks of the base's training data use both kinds)."""
    body: tuple[int, int, int]
    core: tuple[int, int, int]
    core_radius: float = SUBJECT_CORE_RADIUS


SUBJECT_PATTERN = Pattern(SUBJECT_BODY, SUBJECT_CORE)


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image. `pattern` overrides `colour` when set."""
    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0  # centre jitter in pixels
    dy: float = 0.0
    scale: float = 1.0  # multiplies the size's R
    rotation: float = 0.0  # degrees
    texture_seed: int = 0
    pattern: Pattern | None = None

    @property
    def centre(self) -> tuple[float, float]:
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale


def sample_scene(rng: np.random.Generator, **fixed) -> Scene:
    """Draw a scene uniformly over the attributes; keyword arguments fix some of them."""
    attrs = dict(
        shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)), background=rng.choice(list(BACKGROUNDS)),
        dx=float(rng.uniform(-2, 2)), dy=float(rng.uniform(-2, 2)),
        scale=float(rng.uniform(0.94, 1.06)), texture_seed=int(rng.integers(2**31)),
    )
    attrs = {k: (str(v) if isinstance(v, np.str_) else v) for k, v in attrs.items()}
    attrs.update(fixed)
    return Scene(**attrs)


def subject_scene(rng: np.random.Generator, **fixed) -> Scene:
    """The personal subject in a random scene (used for tests and the VAE's data)."""
    fixed = {"shape": SUBJECT_CLASS, "pattern": SUBJECT_PATTERN, **fixed}
    return sample_scene(rng, **fixed)


def reference_scene(rng: np.random.Generator, background: str = "plain") -> Scene:
    """A DreamBooth-style photo: subject centred and large on `background` (by default the plain
    light backdrop), with a little jitter of position, scale and rotation."""
    return subject_scene(
        rng, size="big", position="centre", background=background,
        dx=float(rng.uniform(-1.5, 1.5)), dy=float(rng.uniform(-1.5, 1.5)),
        scale=float(rng.uniform(0.92, 1.08)), rotation=float(rng.uniform(-12, 12)),
    )


# ----------------------------------------------------------------------------- drawing
def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in units of R around the centre (y grows downwards); None for the circle."""
    if shape == "square":
        return [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        a, b = 0.33, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; ShapeWorld knows {SHAPES}")


def shape_mask(shape: str, centre: tuple[float, float], radius: float, rotation: float = 0.0,
               size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape, shape (size, size) float32."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre[0] * s, centre[1] * s
    r = radius * s
    poly = _polygon(shape)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        c, sn = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        draw.polygon([(cx + r * (x * c - y * sn), cy + r * (x * sn + y * c)) for x, y in poly],
                     fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(name: str, seed: int) -> np.ndarray:
    """Lightly textured backdrop, float32 (SIZE, SIZE, 3) in [0, 255]."""
    rng = np.random.default_rng(seed)
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if name == "snow":  # soft drifts and blue-grey speckles
        img += (4 * np.sin(xx / 7 + seed % 7) * np.cos(yy / 9))[..., None]
        speck = rng.random((SIZE, SIZE)) < 0.03
        img[speck] = (212, 220, 236)
    elif name == "grass":  # vertical darker blades
        for _ in range(40):
            x, y0 = rng.integers(0, SIZE), rng.integers(0, SIZE - 6)
            img[y0:y0 + rng.integers(3, 7), x] = (58, 108, 45)
    elif name == "beach":  # gentle wave stripes in the sand
        img += (7 * np.sin(yy / 3.0 + 0.4 * np.sin(xx / 8.0) + seed % 5))[..., None]
    elif name == "night":  # a few small stars
        for _ in range(12):
            x, y = rng.integers(0, SIZE, size=2)
            img[y, x] = (235, 235, 200)
    elif name == "plain":  # a slightly tinted flat backdrop
        img += rng.uniform(-8, 8, size=3).astype(np.float32)
    else:
        raise ValueError(f"unknown background {name!r}; ShapeWorld knows {tuple(BACKGROUNDS)}")
    return img + rng.normal(0, 2.0, size=img.shape).astype(np.float32)


def render(scene: Scene) -> np.ndarray:
    """The scene as an RGB uint8 array of shape (64, 64, 3). Deterministic."""
    img = _background(scene.background, scene.texture_seed)
    alpha = shape_mask(scene.shape, scene.centre, scene.radius, scene.rotation)[..., None]
    if scene.pattern is None:
        fg = np.broadcast_to(np.array(COLOURS[scene.colour], np.float32), img.shape)
    else:
        core = shape_mask("circle", scene.centre, scene.radius * scene.pattern.core_radius)[..., None]
        fg = (1 - core) * np.array(scene.pattern.body, np.float32) + core * np.array(
            scene.pattern.core, np.float32)
    img = alpha * fg + (1 - alpha) * img
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- grammar
def caption(shape: str | None = None, colour: str | None = None, size: str | None = None,
            position: str | None = None, background: str | None = None,
            identifier: str | None = None) -> str:
    """'a [size] [colour] [identifier] <shape> [position phrase] [background phrase]'.

    Any attribute may be None (omitted). The shape (the class noun) is always present.
    """
    if shape is None:
        raise ValueError("a caption needs the class noun (the shape)")
    words = ["a"]
    words += [w for w in (size, colour, identifier) if w]
    words.append(shape)
    if position:
        words.append(POSITION_PHRASES[position])
    if background:
        words.append(BACKGROUND_PHRASES[background])
    return " ".join(words)


def scene_caption(scene: Scene, keep: dict[str, bool] | None = None) -> str:
    """Caption of a scene, keeping only the attributes with keep[attr] True (default: all)."""
    keep = keep or {}
    k = lambda a: keep.get(a, True)  # noqa: E731
    return caption(scene.shape, scene.colour if k("colour") and scene.pattern is None else None,
                   scene.size if k("size") else None, scene.position if k("position") else None,
                   scene.background if k("background") else None)


_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_PHRASE_TO_BACKGROUND = {v: k for k, v in BACKGROUND_PHRASES.items()}


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The attributes a prompt states: {'shape', 'colour', 'size', 'position', 'background',
    'identifier'}, None where omitted. Raises ValueError naming what it could not read."""
    text = " ".join(prompt.lower().replace("center", "centre").split())
    out: dict[str, str | None] = dict.fromkeys(
        ("shape", "colour", "size", "position", "background", "identifier"))
    for phrase, name in _PHRASE_TO_POSITION.items():
        if phrase in text:
            out["position"], text = name, text.replace(phrase, " ")
    for phrase, name in _PHRASE_TO_BACKGROUND.items():
        if phrase in text:
            out["background"], text = name, text.replace(phrase, " ")
    for word in re.findall(r"[a-z]+", text):
        if word in SHAPES:
            out["shape"] = word
        elif word in COLOURS:
            out["colour"] = word
        elif word in SIZES:
            out["size"] = word
        elif word in IDENTIFIERS:
            out["identifier"] = word
        elif word != "a":
            raise ValueError(f"ShapeWorld prompt {prompt!r}: unknown word {word!r}. Known words: "
                             f"{sorted(vocabulary())}")
    if out["shape"] is None:
        raise ValueError(f"ShapeWorld prompt {prompt!r} names no shape; add one of {SHAPES}")
    return out


def vocabulary() -> list[str]:
    """Every word the grammar can produce, plus the identifiers."""
    words = {"a"} | set(SHAPES) | set(COLOURS) | set(SIZES) | set(IDENTIFIERS)
    for phrase in (*POSITION_PHRASES.values(), *BACKGROUND_PHRASES.values()):
        words |= set(phrase.split())
    return sorted(words)


def with_attrs(scene: Scene, **attrs) -> Scene:
    """A copy of `scene` with some attributes changed."""
    return replace(scene, **attrs)
