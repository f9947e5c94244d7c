"""Stage 2: retouch by multi-source attention swap, with adaptive mask blending.

Three branches share one UNet call per step (x2 for classifier-free guidance), batch order
[reference (one row for all targets); context; target] (docs/method.md "Stage 2"); or, faster, the
target alone reads the other two branches' keys/values, cached from stage 1 and from the
reference's inversion (`kv=`, lr_tutorial.kv):
- reference r: the DDIM inversion of x^r: at step k the reference row is the very UNet
               evaluation the inversion made at t_k, eps*(z^r_{k+1}, t_k, y^r), in both CFG
               halves [ours: so its keys/values are recorded while inverting, no replay];
               z^r_N .. z^r_start is all stage 2 reads, so the inversion may stop at the
               target's first step (`reference_stop`, LRConfig.reference_inversion="start");
- context c:   the stage-1 trajectory, replayed: z^c_k is read, never recomputed;
- target t:    starts from z^c at `start_step` and is denoised by eps* with y^p, its
               self-attention reading from the other two (swap.SwapProcessor).

    z^t_{k+1} = DDIM(z^t_k, CFG(eps*, [z^r_{k+1}, z^c_k, z^t_k], t_k))[target]
    z^t_{k+1} = M_k z^t_{k+1} + (1 - M_k) z^c_{k+1}        for k < lambda3
    M_{k+1}   = max(M^c, feather(norm(mean_{j<=k} A^t_j) >= tau_lo  &  near))   (adaptive)
    near      = distance to {M^c >= 1/2} <= adaptive_reach * h       (everywhere if None)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from . import attention, masks, sampling, swap
from .kv import KVCache, record_kv
from .config import resolve_steps


@dataclass
class ReferenceInversion:
    """x^r, its inversion trajectory (denoising order, z^r_start .. z^r_N: Trajectory.start is
    where it stopped, `reference_stop`), the class-token attention map seen while inverting
    (the mask window's steps it ran), and its fused subject mask M^r. Reusable across prompts
    and seeds."""
    image: np.ndarray
    prompt: str
    trajectory: sampling.Trajectory
    attention: np.ndarray
    mask: masks.FusedMask


def mask_layers(unet, cfg: masks.MaskConfig, latent_size: int) -> list[str]:
    return cfg.layers(unet, latent_size)


def rideable_steps(bundle, n: int, lambda1: int) -> int:
    """How many of stage 1's n UNet calls the reference inversion (personalized model) can
    ride: all n where one call can mix vanilla and personalized rows (ModelBundle.mixes_rows:
    a LoRA, through ModelBundle.personal_rows; textual inversion), so no inversion call runs
    alone; else (a full DreamBooth UNet) the n - lambda1 personalized ones [ours]."""
    return n if bundle.mixes_rows else n - lambda1


def reference_stop(cfg: masks.MaskConfig, n: int, start: int) -> int:
    """The last step the reference is inverted to: the target's first step `start` (stage 2
    reads the reference row at steps k >= start, the inversion's call at t_k; the steps before
    it would only walk the photo on to full noise), or the mask window's last step if the window
    ends before `start`, so that M^r sees at least one of its steps [ours]. At 50 steps with
    the defaults (start = lambda1 = lambda2 = 10): 40 of the 50 inversion calls, 40 rows in
    stage 1's calls instead of 50 (LRConfig.reference_inversion; with a full DreamBooth UNet
    the full inversion's 10 extra calls run alone)."""
    return min(start, window(cfg, n)[-1])


def window(cfg: masks.MaskConfig, n: int) -> list[int]:
    return cfg.window(n)


def aggregate(store, rows: slice, n_steps: int, cfg: masks.MaskConfig, size: int,
              steps: list[int] | None = None) -> np.ndarray:
    """Mean class-token map (rows of the store's batch) over the window's steps: (B, size, size)."""
    # .cpu(): while a capture with offload="end" runs, its maps are still on the GPU
    return class_maps(store, rows, n_steps, cfg, size, steps).cpu().numpy()


def class_maps(store, rows: slice, n_steps: int, cfg: masks.MaskConfig, size: int,
               steps: list[int] | None = None) -> torch.Tensor:
    """`aggregate`, left where the maps are (on a GPU: no wait for it): (B, size, size) float32."""
    steps = steps if steps is not None else window(cfg, n_steps)
    present = [s for s in steps if s in set(store.steps())]
    return store.cross_map(0, size, steps=present)[rows]


@torch.no_grad()
def invert_reference(bundle, image: np.ndarray, prompt: str, class_index: int, *, steps: int,
                     mask_cfg: masks.MaskConfig, segmenter=None, guidance: float = 1.0,
                     stop: int = 0) -> ReferenceInversion:
    """DDIM-invert x^r with the personalized model, from z^r_N down to z^r_stop (0: to full
    noise; the pipeline passes `reference_stop`), and build its subject mask M^r."""
    with riding_inversion(bundle, image, prompt, class_index, steps=steps, mask_cfg=mask_cfg,
                          ride_steps=0, guidance=guidance, stop=stop) as (inv, store):
        pass
    return reference_from(bundle, inv, store, image, mask_cfg, segmenter)


@contextlib.contextmanager
def riding_inversion(bundle, image: np.ndarray, prompt: str, class_index: int, *, steps: int,
                     mask_cfg: masks.MaskConfig, ride_steps: int, guidance: float = 1.0,
                     kv: KVCache | None = None, stop: int = 0):
    """`with riding_inversion(...) as (inv, store):` the reference inversion of invert_reference
    (steps N-1 .. stop: `steps - stop` UNet calls), started so that its last calls ride the
    `ride_steps` UNet calls of another loop (`sampling.denoise(..., rider=inv)`: stage 1's
    calls, `rideable_steps`, in the pipeline). Runs the calls that do not fit there alone first,
    `max(0, steps - stop - ride_steps)`, with the personalized model, and keeps the class
    token's capture open for the riding steps. Then `reference_from(...)`.

    kv: a KVCache (reference_plan's layers and steps) that records the reference branch's
    keys/values from the inversion's own UNet calls: here for the steps that run alone, and,
    with `record_kv(..., kv)` around the other loop, for the riding ones (it is one of the
    inversion's observers, so it records the inversion's row only)."""
    if kv is not None and guidance != 1.0:
        raise ValueError("the reference's keys/values are recorded from an inversion without "
                         "classifier-free guidance (guidance=1.0, the inversion's usual "
                         f"setting), got guidance={guidance}")
    z = sampling.encode(bundle, image[None])
    spec = attention.CaptureSpec(layers=mask_layers(bundle.unet, mask_cfg, bundle.latent_size),
                                 kind="cross", tokens=[class_index])
    with attention.capture(bundle.unets, spec) as store:
        observers = (store,) if kv is None else (store, kv)
        with bundle.using(bundle.personal_mode), \
                (record_kv(bundle.unets, kv) if kv is not None else contextlib.nullcontext()):
            # the prompt is encoded here: a learned identifier embedding exists in this mode only
            inv = sampling.Inversion(bundle, z, prompt, steps=steps, guidance=guidance,
                                     observers=observers, stop=stop)
            for _ in range(max(0, steps - stop - ride_steps)):
                inv.step_alone()
        yield inv, store


def reference_from(bundle, inv: sampling.Inversion, store, image: np.ndarray,
                   mask_cfg: masks.MaskConfig, segmenter=None) -> ReferenceInversion:
    """The ReferenceInversion of a finished inversion: its trajectory, the class token's mean
    attention over the window, and the fused subject mask M^r."""
    traj = inv.trajectory()  # raises while steps are left
    n = len(inv.sched.timesteps)  # the window is a fraction of all N steps, of which it ran
    attn = aggregate(store, slice(0, 1), n, mask_cfg, bundle.latent_size)[0]  # k >= stop
    fused = masks.subject_mask(image, attn, segmenter, mask_cfg)
    return ReferenceInversion(image, inv.prompt, traj, attn, fused)


@torch.no_grad()
def reference_kv(bundle, reference: ReferenceInversion, layers: list[str], steps: list[int],
                 n_steps: int, device=None, steps_per_call: int = 8, dtype=None,
                 store: str = "kv") -> KVCache:
    """Keys/values of the reference branch, for a reference inverted without them being
    recorded (LayoutAndRetouch.reference, or caches dropped): the inversion's own UNet
    evaluations again, the personalized UNet on z^r_{k+1} at t_k with y^r, one row per step.
    (A reference inverted by the cached pipeline records them while inverting:
    riding_inversion(kv=...).)

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
def retouch(bundle, layout, reference: ReferenceInversion, context_masks: np.ndarray,
            class_indices: list[int], *, swap_cfg: swap.SwapConfig,
            mask_cfg: masks.MaskConfig, steps: int, guidance: float, start_step: int = 0,
            callback=None, observers: tuple = (), kv: dict[str, KVCache] | None = None,
            ) -> tuple[torch.Tensor, sampling.Trajectory, np.ndarray, object]:
    """Denoise the target branch. Returns (z^t_N, target trajectory, masks used per step
    (N - start, B, h, w), the attention store of the class token for the branches in the
    batch). Extra observers (e.g. a user's attention store, already capturing) hear every step.

    kv=None: the batched path, three branches per UNet call, batch [reference (one row, shared
    by every target); context; target], 2B + 1 rows (x2 under CFG).
    kv={"reference": KVCache, "context": KVCache} (kv_plan's layers and steps): the target rows
    alone, reading the other branches' keys/values from the caches; same result, a third of
    the UNet work (the context cache comes from stage 1, lr_tutorial.kv)."""
    b = len(layout.prompt)
    size = bundle.latent_size
    if reference.trajectory.start > start_step:
        raise ValueError(f"the reference was inverted down to step {reference.trajectory.start}, "
                         f"but the target starts at step {start_step} and reads it from there: "
                         f"invert it with stop <= {start_step} (retouch.reference_stop)")
    sched = sampling.make_scheduler(bundle, steps)
    l3 = resolve_steps(mask_cfg.lambda3, steps, "lambda3")
    ref_class = reference_class_index(bundle, reference.prompt)
    personal = bundle.personal_mode
    with bundle.using(personal):  # y^p with the identifier's learned embedding, if there is one
        cond_p = sampling.encode_prompts(bundle, layout.prompt)
        cond_r = sampling.encode_prompts(bundle, [reference.prompt])
    m_ctx = torch.as_tensor(context_masks, dtype=torch.float32).to(bundle.device)  # (B, h, w)
    ctl = swap.SwapController(bundle.unet, swap_cfg, steps, size)
    ctl.set_masks(target=m_ctx, reference=torch.as_tensor(reference.mask.mask)[None])
    mask_layers_ = mask_layers(bundle.unet, mask_cfg, size)
    if kv is None:  # one reference row serves every target: [ref (1); ctx (B); tgt (B)]
        ctl.shared_reference = True
        cond = torch.cat([cond_r, cond_p, cond_p])
        tokens = [[ref_class]] + [[i] for i in class_indices] * 2
        target_rows = slice(1 + b, 1 + 2 * b)
    else:
        ctl.sources = kv
        cond, tokens, target_rows = cond_p, [[i] for i in class_indices], slice(0, b)
    uncond = sampling.encode_prompts(bundle, [""] * len(cond))
    if kv is None:  # the reference row is the inversion's evaluation (y^r) in both halves
        uncond = torch.cat([cond_r, uncond[1:]])
    spec = attention.CaptureSpec(layers=mask_layers_, kind="cross", tokens=tokens)
    win = set(window(mask_cfg, steps))
    m = m_ctx.clone()
    near = (reach_region(m_ctx, mask_cfg.adaptive_reach)  # (B, h, w) bool, or None: anywhere
            if mask_cfg.adaptive else None)
    zt = layout.trajectory.latents[start_step].to(bundle.device, bundle.dtype)
    traj = sampling.Trajectory(latents=[sampling.to_host(zt)], start=start_step)  # z^t_start..
    used, acc, n_seen = [], 0.0, 0
    with bundle.using(personal), \
            swap.swap(bundle.unet, ctl), attention.capture(bundle.unet, spec) as store:
        for k in range(start_step, steps):
            t = sched.timesteps[k]
            for obs in (ctl, store, *observers):
                obs.on_step(k, int(t), guidance != 1.0)
            if kv is None:  # the reference row: the inversion's input at t_k, z^r_{k+1}
                zr = sampling.to_device(reference.trajectory.latent(k + 1), zt)  # (1, C, h, w)
                zc = sampling.to_device(layout.trajectory.latents[k], zt)
                z_in = torch.cat([zr, zc, zt])
            else:
                z_in = zt
            eps = sampling.guided_eps(bundle.unet, z_in, t, cond, uncond, guidance)[target_rows]
            out = sched.step(eps, t, zt)
            zt = out.prev_sample
            m_used = m  # replaced below, never written in place
            used.append(sampling.to_host(m_used))
            if k < l3:
                mm = m[:, None].to(zt.dtype)
                zt = mm * zt + (1 - mm) * sampling.to_device(layout.trajectory.latents[k + 1], zt)
            if mask_cfg.adaptive and mask_cfg.source != "segmenter" and k in win:  # attention-based
                # running mean over the window's steps seen so far (each step: mean over layers),
                # kept on the model's device: no wait for the GPU here
                acc = acc + class_maps(store, target_rows, steps, mask_cfg, size, steps=[k])
                n_seen += 1
                a = acc / n_seen
                support = masks.normalize_maps(a) >= mask_cfg.tau_lo  # (B, h, w)
                if near is not None:
                    support = support & near
                own = masks.feather_maps(support, mask_cfg.feather)
                m = torch.maximum(m_ctx, own)
                ctl.set_masks(target=m)
            traj.timesteps.append(int(t))
            traj.x0.append(sampling.to_host(out.pred_original_sample))
            traj.latents.append(sampling.to_host(zt))
            if callback is not None:
                callback({"step": k, "timestep": int(t), "latent": zt,
                          "x0": out.pred_original_sample, "mask": m_used.cpu().numpy().copy()})
    sampling.settle(zt)  # the trajectory's (and masks') host copies have landed
    used = (torch.stack(used).numpy() if used
            else np.zeros((0, *m_ctx.shape), np.float32))
    return zt, traj, used, store


def reach_region(m_ctx: torch.Tensor, reach: float | None) -> torch.Tensor | None:
    """Where the adaptive mask may grow: pixels within reach * h (Euclidean) of the context's
    object {M^c >= 1/2}, (B, h, w) bool on M^c's device; None when unbounded."""
    if reach is None:
        return None
    dist = masks.distance_to(m_ctx >= 0.5)  # (B, h, w), inf where a context mask is empty
    return dist <= reach * m_ctx.shape[-1]


def reference_class_index(bundle, prompt: str) -> int:
    from .prompts import token_index
    return token_index(bundle.tokenizer, prompt, bundle.class_noun)
