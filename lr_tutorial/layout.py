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
                 checked: bool = False, rider=None) -> LayoutResult:
    """Denoise with the vanilla model for k < lambda1 on y^-p, then the personalized one on y^p.
    `checked`: the caller already ran prompts.check_prompts on these prompts. `rider`: a
    sampling.Inversion made with the personalized model (the reference inversion,
    lr_tutorial.pipeline) that shares the last of these UNet calls, one per step it has left:
    the personalized steps', and, where it has more steps than those, the last vanilla steps'
    too, which needs a bundle that mixes personalized and vanilla rows in one call
    (ModelBundle.mixes_rows: a LoRA, textual inversion)."""
    cfg = config or LayoutConfig()
    cfg.validate()
    cfg = cfg.resolved(bundle)
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed each")
    n = cfg.steps
    l1 = resolve_steps(cfg.lambda1, n, "lambda1")
    ident = bundle.identifier
    if not checked:
        check_prompts(bundle, prompts, need_class=False)
    vanilla_prompts = [strip_identifier(p, ident) if ident else p for p in prompts]
    sched = sampling.make_scheduler(bundle, n)
    z = sampling.initial_noise(bundle, seeds)
    traj = sampling.Trajectory(latents=[sampling.to_host(z)])
    uncond = sampling.encode_prompts(bundle, [""] * len(prompts))
    common = dict(sched=sched, guidance=cfg.guidance, traj=traj, callback=callback,
                  observers=observers)
    # the rider rides the last of stage 1's calls: the personalized ones, and the last `early`
    # vanilla ones where its steps outnumber those (one call then mixes the two models' rows)
    early = 0 if rider is None else max(0, rider.remaining - (n - l1))
    if early and not bundle.mixes_rows:
        raise ValueError(f"the rider has {rider.remaining} steps left, more than stage 1's "
                         f"{n - l1} personalized calls, and a {bundle.personalization} bundle "
                         "cannot mix its row into the vanilla calls: run the others alone first "
                         "(retouch.riding_inversion(ride_steps=retouch.rideable_steps(...)))")
    if l1 > 0:
        with bundle.using("vanilla"):
            cond = sampling.encode_prompts(bundle, vanilla_prompts)
            for ks, r in ((range(0, l1 - early), None), (range(l1 - early, l1), rider)):
                if len(ks):
                    z = sampling.denoise(bundle, z, cond, uncond, k_range=ks, rider=r, **common)
    if l1 < n:
        with bundle.using(bundle.personal_mode):
            cond = sampling.encode_prompts(bundle, list(prompts))
            z = sampling.denoise(bundle, z, cond, uncond, k_range=range(l1, n), rider=rider,
                                 **common)
    images = sampling.decode(bundle, z) if decode else None
    return LayoutResult(images, traj, l1, list(prompts), vanilla_prompts)
