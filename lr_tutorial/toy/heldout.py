"""Held-out ShapeWorld prompts: never used as training captions, used for every measurement.

Two sets, both deterministic (seeded) and shipped as text files in `data/prompts/`:
- `personal_prompts()`: the prompts written with `sks star` that leave the colour out (76 of
  240 drawn: size, position and background each stated or omitted; at least two stated). The
  subject's colours are its identity: "a red sks star" asks for another look, so such prompts
  cannot measure identity. The vanilla model is measured on the same prompts without `sks`.
- `vanilla_prompts()`: 240 prompts over every shape and colour, without an identifier.
"""
from __future__ import annotations

import numpy as np

from . import world

ATTRS = ("size", "colour", "position", "background")
STATE_PROB = {"size": 0.4, "colour": 0.3, "position": 0.75, "background": 0.75}
SCENE_BACKGROUNDS = tuple(b for b in world.BACKGROUNDS if b != "plain")


def _draw(rng, shape: str | None, n: int, identifier: str | None) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < n:
        attrs = {
            "size": rng.choice(list(world.SIZES)), "colour": rng.choice(list(world.COLOURS)),
            "position": rng.choice(list(world.POSITIONS)), "background": rng.choice(SCENE_BACKGROUNDS),
        }
        stated = {a: str(v) if rng.random() < STATE_PROB[a] else None for a, v in attrs.items()}
        if sum(v is not None for v in stated.values()) < 2:
            continue
        s = shape or str(rng.choice(world.SHAPES))
        seen[world.caption(s, identifier=identifier, **stated)] = None
    return list(seen)


def drawn_personal_prompts(n: int = 240, seed: int = 2407) -> list[str]:
    """All 240 drawn `sks star` prompts, colour stated or not (the training exclusions)."""
    return _draw(np.random.default_rng(seed), world.SUBJECT_CLASS, n, world.SUBJECT_IDENTIFIER)


def personal_prompts() -> list[str]:
    """The held-out `sks star` prompts that state no colour (see the module docstring)."""
    return [p for p in drawn_personal_prompts() if world.parse_prompt(p)["colour"] is None]


def vanilla_prompts(n: int = 240, seed: int = 9779) -> list[str]:
    return _draw(np.random.default_rng(seed), None, n, None)


def strip_identifier(prompt: str) -> str:
    """y^p -> y^-p for ShapeWorld prompts ('a sks star' -> 'a star')."""
    return " ".join(w for w in prompt.split() if w not in world.IDENTIFIERS)


def training_exclusions() -> frozenset[str]:
    """Captions the vanilla model must never be trained on."""
    return frozenset([strip_identifier(p) for p in drawn_personal_prompts()] + vanilla_prompts())
