"""Stage 1: layout generation by step-blended denoising (docs/method.md "Stage 1", [paper]).

    z_{k+1} = Step(z_k, CFG(eps,  z_k, y^-p, t_k))   for k <  lambda1   (vanilla: layout)
    z_{k+1} = Step(z_k, CFG(eps*, z_k, y^p,  t_k))   for k >= lambda1   (personalized: identity)
    x^c = Decode(z_N)

The whole trajectory is kept: stage 2 replays it, so the context image never needs inverting.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import numpy as np

from . import sampling
from .prompts import check_prompts, strip_identifier


def resolve_steps(value: float | int, n: int, name: str = "lambda") -> int:
    """A step boundary given as a fraction of N (float in [0, 1]) or a step count (int)."""
    check_boundary(value, name)
    if isinstance(value, numbers.Integral):
        if not 0 <= value <= n:
            raise ValueError(f"{name} = {value} steps is outside [0, {n}] for {n} steps; give a "
                             f"step count from 0 to {n}, or a fraction such as 0.2")
        return int(value)
    return int(round(float(value) * n))


def check_boundary(value, name: str) -> None:
    """A step boundary must be a fraction (float in [0, 1]) or a step count (int >= 0); the
    upper bound of a count is checked against N by resolve_steps."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a fraction of the steps (float in [0, 1]) or a step "
                        f"count (int), got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{name} = {value} steps is negative; give a step count >= 0")
    elif not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} = {value} as a fraction of the steps must be in [0, 1]; "
                         "give an int for a step count")


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}; 50 is the usual DDIM "
                         "setting (a few steps suffice for a quick look on the toy backend)")


def check_guidance(guidance, allow_none: bool = False) -> None:
    if guidance is None and allow_none:
        return
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not guidance >= 0:
        raise ValueError(f"guidance must be a number >= 0{' or None' if allow_none else ''}, got "
                         f"{guidance!r}; 7.5 is Stable Diffusion's usual setting, 3.0 the toy "
                         "backend's (1 means no classifier-free guidance)")


def resolve_guidance(bundle, guidance) -> float:
    """`guidance`, or the bundle's own weight (ModelBundle.guidance) when it is None."""
    guidance = getattr(bundle, "guidance", 7.5) if guidance is None else guidance
    check_guidance(guidance)
    return float(guidance)


@dataclass
class LayoutConfig:
    """Stage 1 knobs. lambda1: vanilla steps, a fraction of N or a count (default 0.2 N [ours],
    docs/method.md "Stage 1"). The toy backend fixes its layouts later, between 0.32 and 0.40 N
    (docs/results.md compares 0.2-0.4 N). steps: N DDIM steps. guidance: CFG weight; None (default): the models' own
    (ModelBundle.guidance: Stable Diffusion's 7.5, the toy backend's 3.0) [ours]."""
    lambda1: float | int = 0.2
    steps: int = 50
    guidance: float | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError/TypeError naming the bad knob (also after fields were changed)."""
        check_steps(self.steps)
        check_guidance(self.guidance, allow_none=True)
        resolve_steps(self.lambda1, self.steps, "lambda1")

    def resolved(self, bundle) -> "LayoutConfig":
        """A copy with the guidance filled in from the bundle when it is None."""
        return replace(self, guidance=resolve_guidance(bundle, self.guidance))


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
