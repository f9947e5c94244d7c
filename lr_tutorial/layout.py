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

    def denoise(z, prompts_, k_range):  # the steps k_range with the current model and text encoder
        cond = sampling.encode_prompts(bundle, list(prompts_))
        return sampling.denoise(bundle, z, cond, uncond, sched=sched, guidance=cfg.guidance,
                                k_range=k_range, traj=traj, callback=callback, observers=observers)

    z = stage1_loop(bundle, z, l1, n, vanilla_prompts, list(prompts), denoise)
    images = sampling.decode(bundle, z) if decode else None  # x^c = Decode(z_N)
    return LayoutResult(images, traj, l1, list(prompts), vanilla_prompts)


def stage1_loop(bundle, z, l1: int, n: int, y_minus_p: list[str], y_p: list[str], denoise):
    """The two phases of stage 1 from z = z_0: `denoise(z, prompts, k_range)` runs the steps
    k_range with the bundle's current model (the prompts encoded by it) and returns z after them.
    Exercise 3.1 writes this function (lr_tutorial.exercises)."""
    if l1 > 0:  # k < lambda1: z_{k+1} = Step(z_k, CFG(eps, z_k, y^-p, t_k))
        with bundle.using("vanilla"):
            z = denoise(z, y_minus_p, range(0, l1))
    if l1 < n:  # k >= lambda1: z_{k+1} = Step(z_k, CFG(eps*, z_k, y^p, t_k))
        with bundle.using(bundle.personal_mode):
            z = denoise(z, y_p, range(l1, n))
    return z
