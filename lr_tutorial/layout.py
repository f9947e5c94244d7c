"""Stage 1: layout generation by step-blended denoising (docs/method.md "Stage 1", [paper]).

    z_{k+1} = Step(z_k, CFG(eps,  z_k, y^-p, t_k))   for k <  lambda1   (vanilla: layout)
    z_{k+1} = Step(z_k, CFG(eps*, z_k, y^p,  t_k))   for k >= lambda1   (personalized: identity)
    x^c = Decode(z_N)

The whole trajectory is kept: stage 2 replays it, so the context image never needs inverting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import sampling
from .config import (LayoutConfig, check_boundary, check_guidance, check_steps,  # noqa: F401
                     resolve_guidance, resolve_steps)
from .prompts import check_prompts, strip_identifier


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
                 *, callback=None, observers: tuple = (), decode: bool = True,
                 checked: bool = False) -> LayoutResult:
    """Stage 1 (docs/method.md "Stage 1"): the vanilla model on y^-p for k < lambda1, then the
    personalized model on y^p, from the seeds' noise z_0. `checked`: the caller already ran
    prompts.check_prompts on these prompts. Observers hear every step (sampling.denoise)."""
    cfg = (config or LayoutConfig()).resolved(bundle)
    cfg.validate()
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed each")
    if not checked:
        check_prompts(bundle, prompts, need_class=False)
    n, ident = cfg.steps, bundle.identifier
    l1 = resolve_steps(cfg.lambda1, n, "lambda1")
    vanilla_prompts = [strip_identifier(p, ident) if ident else p for p in prompts]
    sched = sampling.make_scheduler(bundle, n)
    z = sampling.initial_noise(bundle, seeds)
    traj = sampling.Trajectory(latents=[sampling.to_host(z)])
    uncond = sampling.encode_prompts(bundle, [""] * len(prompts))
    common = dict(sched=sched, guidance=cfg.guidance, traj=traj, callback=callback,
                  observers=observers)
    if l1 > 0:  # k < lambda1: z_{k+1} = Step(z_k, CFG(eps, z_k, y^-p, t_k))
        with bundle.using("vanilla"):
            cond = sampling.encode_prompts(bundle, vanilla_prompts)
            z = sampling.denoise(bundle, z, cond, uncond, k_range=range(0, l1), **common)
    if l1 < n:  # k >= lambda1: z_{k+1} = Step(z_k, CFG(eps*, z_k, y^p, t_k))
        with bundle.using(bundle.personal_mode):
            cond = sampling.encode_prompts(bundle, list(prompts))
            z = sampling.denoise(bundle, z, cond, uncond, k_range=range(l1, n), **common)
    images = sampling.decode(bundle, z) if decode else None  # x^c = Decode(z_N)
    return LayoutResult(images, traj, l1, list(prompts), vanilla_prompts)
