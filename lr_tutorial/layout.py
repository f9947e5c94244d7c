"""Stage 1: layout generation by step-blended denoising (docs/method.md, [paper]).

    z_{k+1} = Step(z_k, CFG(eps,  z_k, y^-p, t_k))   for k <  lambda1   (vanilla: layout)
    z_{k+1} = Step(z_k, CFG(eps*, z_k, y^p,  t_k))   for k >= lambda1   (personalized: identity)
    x^c = Decode(z_N)

The whole trajectory is kept: stage 2 replays it, so the context image never needs inverting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import sampling
from .prompts import check_personal_prompt, strip_identifier


def resolve_steps(value: float | int, n: int, name: str = "lambda") -> int:
    """A step boundary given as a fraction of N (float in [0, 1]) or a step count (int)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} = {value} as a fraction of the steps must be in [0, 1]; "
                             f"give an int for a step count")
        return int(round(value * n))
    if not 0 <= value <= n:
        raise ValueError(f"{name} = {value} steps is outside [0, {n}] for {n} steps")
    return int(value)


@dataclass
class LayoutConfig:
    """Stage 1 knobs. lambda1: vanilla steps, a fraction of N or a count (default 0.2 N [ours],
    docs/method.md stage 1). steps: N DDIM steps. guidance: CFG weight (7.5 [ours])."""
    lambda1: float | int = 0.2
    steps: int = 50
    guidance: float = 7.5


@dataclass
class LayoutResult:
    """x^c images (B, H, W, 3) uint8, the trajectory (z_0..z_N, x0 per step), lambda1 in steps,
    the prompts used, and the attention store if a capture spec was given."""
    images: np.ndarray
    trajectory: sampling.Trajectory
    lambda1: int
    prompt: list[str]
    vanilla_prompt: list[str]
    store: object = None


def step_blended(bundle, prompts: list[str], seeds: list[int], config: LayoutConfig | None = None,
                 *, callback=None, observers: tuple = (), decode: bool = True) -> LayoutResult:
    """Denoise with the vanilla model for k < lambda1 on y^-p, then the personalized one on y^p."""
    cfg = config or LayoutConfig()
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed each")
    n = cfg.steps
    l1 = resolve_steps(cfg.lambda1, n, "lambda1")
    ident = bundle.identifier
    if ident:
        for p in prompts:
            check_personal_prompt(p, ident, bundle.class_noun)
    vanilla_prompts = [strip_identifier(p, ident) if ident else p for p in prompts]
    sched = sampling.make_scheduler(bundle, n)
    z = sampling.initial_noise(bundle, seeds)
    traj = sampling.Trajectory(latents=[z.detach().cpu()])
    uncond = sampling.encode_prompts(bundle, [""] * len(prompts))
    common = dict(sched=sched, guidance=cfg.guidance, traj=traj, callback=callback,
                  observers=observers)
    if l1 > 0:
        with bundle.using("vanilla"):
            cond = sampling.encode_prompts(bundle, vanilla_prompts)
            z = sampling.denoise(bundle, z, cond, uncond, k_range=range(0, l1), **common)
    if l1 < n:
        with bundle.using("personalized" if bundle.has_personal else "vanilla"):
            cond = sampling.encode_prompts(bundle, list(prompts))
            z = sampling.denoise(bundle, z, cond, uncond, k_range=range(l1, n), **common)
    images = sampling.decode(bundle, z) if decode else None
    return LayoutResult(images, traj, l1, list(prompts), vanilla_prompts)
