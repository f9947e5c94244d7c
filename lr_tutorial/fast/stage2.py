"""Stage 2 on the target rows alone (fast engine).

retouch.retouch runs three branches per UNet call, [reference (1); context (B); target (B)].
The reference's and the context's keys and values are computed elsewhere already: the
context's by stage 1's personalized steps (recorded there, kv.record_kv), the reference's by
its inversion's own UNet calls (recorded while it is inverted, riding.riding_inversion(kv=...),
or replayed by `reference_kv`). `retouch_cached` runs the target's B rows per CFG half, its
swap reading the others' keys and values from those caches (swap.CachedSwapController): the
same equations, a third of the UNet work. Tested equal to retouch.retouch within float
rounding (tests/test_fast.py).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import attention, sampling, swap
from ..config import SwapConfig
from ..masks import MaskConfig
from ..retouch import ReferenceInversion, Target, check_reference_reaches
from .kv import KVCache, record_kv
from .swap import CachedSwapController


@torch.no_grad()
def reference_kv(bundle, reference: ReferenceInversion, layers: list[str], steps: list[int],
                 n_steps: int, device=None, steps_per_call: int = 8, dtype=None,
                 store: str = "kv") -> KVCache:
    """Keys/values of the reference branch, for a reference inverted without them being
    recorded (LayoutAndRetouch.reference, or caches dropped): the inversion's own UNet
    evaluations again, the personalized UNet on z^r_{k+1} at t_k with y^r, one row per step.
    (A reference inverted by the cached pipeline records them while inverting:
    riding.riding_inversion(kv=...).)

    The calls do not depend on each other (every z^r_{k+1} is read from the inversion), so
    `steps_per_call` steps share one call, each row with its own timestep: 5 calls instead of
    40 at 50 steps (a toy UNet call costs about the same at 1 row or 8)."""
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
    sched = sampling.make_scheduler(bundle, n_steps)
    cache = KVCache(layers, steps, device=device, dtype=dtype, store=store)
    steps = list(steps)
    if not steps or not layers:  # the swap never reads the reference (reference_plan)
        return cache
    with bundle.using(bundle.personal_mode), \
            record_kv(bundle.unets, cache):
        cond = sampling.encode_prompts(bundle, [reference.prompt])  # in this mode: a learned
        for i in range(0, len(steps), steps_per_call):           # identifier embedding applies
            group = steps[i:i + steps_per_call]
            n = len(group)
            cache.on_steps(group)
            z = torch.cat([reference.trajectory.latent(k + 1) for k in group]).to(
                bundle.device, bundle.dtype)  # (n, C, h, w): the inversion's input at t_k
            t = torch.stack([sched.timesteps[k] for k in group]).to(bundle.device)  # (n,)
            bundle.unet(z, t, encoder_hidden_states=cond.expand(n, -1, -1))
    return cache


@torch.no_grad()
def retouch_cached(bundle, layout, reference: ReferenceInversion, context_masks: np.ndarray,
                   class_indices: list[int], *, swap_cfg: SwapConfig, mask_cfg: MaskConfig,
                   steps: int, guidance: float, start_step: int = 0, callback=None,
                   observers: tuple = (), kv: dict[str, KVCache]
                   ) -> tuple[torch.Tensor, sampling.Trajectory, np.ndarray, object]:
    """retouch.retouch on the target rows alone, `kv` = {"reference": KVCache, "context":
    KVCache} (kv.reference_plan's and kv.kv_plan's layers and steps). Returns the same; its
    attention store holds the target rows only."""
    check_reference_reaches(reference, start_step)
    b, size = len(layout.prompt), bundle.latent_size
    sched = sampling.make_scheduler(bundle, steps)
    with bundle.using(bundle.personal_mode):  # y^p with the identifier's learned embedding
        cond = sampling.encode_prompts(bundle, layout.prompt)
    uncond = sampling.encode_prompts(bundle, [""] * b)
    ctl = CachedSwapController(bundle.unet, swap_cfg, steps, size, sources=kv)
    ctl.set_masks(reference=torch.as_tensor(reference.mask.mask)[None])
    target = Target(bundle, layout, context_masks, ctl, mask_cfg, steps, start_step, callback)
    spec = attention.CaptureSpec(layers=mask_cfg.layers(bundle.unet, size), kind="cross",
                                 tokens=[[i] for i in class_indices])
    rows = slice(0, b)
    with bundle.using(bundle.personal_mode), swap.swap(bundle.unet, ctl), \
            attention.capture(bundle.unet, spec) as store:
        for k in range(start_step, steps):
            t = sched.timesteps[k]
            for obs in (ctl, store, *observers):
                obs.on_step(k, int(t), guidance != 1.0)
            eps = sampling.guided_eps(bundle.unet, target.z, t, cond, uncond, guidance)
            target.step(k, t, sched.step(eps, t, target.z), store, rows)
    return target.z, target.trajectory, target.masks_used(), store
