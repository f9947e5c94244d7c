"""The personal subject's reference photos: five DreamBooth-style PNGs in data/toy/reference.

Centred and large, with a small jitter of position, scale and rotation
(`world.reference_scene`), on the backdrops of `REFERENCE_BACKDROPS`: mostly the plain light
one, once at night and once on grass, like a real photo set taken in a few places. A
DreamBooth-LoRA that overfits them then copies a photo's framing and backdrop, and it has seen
the subject's colour on dark and green ground. Regenerate with
`python -m lr_tutorial toy-references --overwrite`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_file
from . import world

REFERENCE_BACKDROPS = ("plain", "night", "plain", "grass", "plain")
N_REFERENCES = len(REFERENCE_BACKDROPS)
REFERENCE_SEED = 1234


def reference_scenes() -> list[world.Scene]:
    rng = np.random.default_rng(REFERENCE_SEED)
    return [world.reference_scene(rng, background) for background in REFERENCE_BACKDROPS]


def reference_dir() -> Path:
    from ..models import data_dir
    return data_dir() / "toy" / "reference"


def write_references(out: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    out = Path(out) if out else reference_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:02d}.png" for i in range(N_REFERENCES)]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the references")
    for p, scene in zip(paths, reference_scenes()):
        with atomic_file(p) as tmp:
            Image.fromarray(world.render(scene)).save(tmp)
    return paths


def reference_paths() -> list[Path]:
    return sorted(reference_dir().glob("*.png"))


def reference_images() -> np.ndarray:
    """The shipped reference photos as uint8 (5, 64, 64, 3)."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in reference_paths()])
