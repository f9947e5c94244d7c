"""Stage 2: retouch by multi-source attention swap, with adaptive mask blending
(docs/method.md "Stage 2" and "Adaptive mask blending").

Three branches share one UNet call per step (x2 for classifier-free guidance), batch
[reference (one row for every target); context (B); target (B)]:
- reference r: the DDIM inversion of x^r (`invert_reference`). At step k the reference row is the
               very evaluation the inversion made at t_k, eps*(z^r_{k+1}, t_k, y^r), in both CFG
               halves [ours]; z^r_N .. z^r_start is all stage 2 reads, so the inversion may stop
               at the target's first step (`reference_stop`);
- context c:   the stage-1 trajectory, replayed: z^c_k is read, never recomputed;
- target t:    starts from z^c at `start_step` and is denoised by eps* with y^p, its
               self-attention reading from the other two (swap.py).

    z^t_{k+1} = DDIM(z^t_k, CFG(eps*, [z^r_{k+1}, z^c_k, z^t_k], t_k))[target]
    z^t_{k+1} = M_k z^t_{k+1} + (1 - M_k) z^c_{k+1}        for k < lambda3       (latent_blend)
    M_{k+1}   = max(M^c, feather(norm(mean_{j<=k} A^t_j) >= tau_lo  &  near))   (AdaptiveMask,
    near      = distance to {M^c >= 1/2} <= adaptive_reach * h                    an option)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import attention, masks, sampling, swap
from .config import resolve_steps
from .masks import MaskConfig
from .prompts import token_index


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


def mask_layers(unet, cfg: MaskConfig, latent_size: int) -> list[str]:
    return cfg.layers(unet, latent_size)


def reference_stop(cfg: MaskConfig, n: int, start: int) -> int:
    """The last step the reference is inverted to with LRConfig.reference_inversion="start":
    the target's first step `start` (stage 2 reads the reference row at steps k >= start, the
    inversion's call at t_k; the steps before it would only walk the photo on to full noise),
    or the mask window's last step if the window ends before `start`, so that M^r sees at least
    one of its steps [ours]."""
    return min(start, cfg.window(n)[-1])


def aggregate(store, rows: slice, n_steps: int, cfg: MaskConfig, size: int,
              steps: list[int] | None = None) -> np.ndarray:
    """Mean class-token map (rows of the store's batch) over the window's steps: (B, size, size)."""
    # .cpu(): while a capture with offload="end" runs, its maps are still on the GPU
    return class_maps(store, rows, n_steps, cfg, size, steps).cpu().numpy()


def class_maps(store, rows: slice, n_steps: int, cfg: MaskConfig, size: int,
               steps: list[int] | None = None) -> torch.Tensor:
    """`aggregate`, left where the maps are (on a GPU: no wait for it): (B, size, size) float32."""
    steps = steps if steps is not None else cfg.window(n_steps)
    present = [s for s in steps if s in set(store.steps())]
    return store.cross_map(0, size, steps=present)[rows]


@torch.no_grad()
def invert_reference(bundle, image: np.ndarray, prompt: str, class_index: int, *, steps: int,
                     mask_cfg: MaskConfig, segmenter=None, guidance: float = 1.0,
                     stop: int = 0) -> ReferenceInversion:
    """DDIM-invert x^r with the personalized model (docs/method.md "DDIM inversion"), from
    z^r_N down to z^r_stop (0: to full noise), capturing the class token's cross-attention, and
    build its subject mask M^r from it ("Adaptive mask blending")."""
    z = sampling.encode(bundle, image[None])
    spec = attention.CaptureSpec(layers=mask_cfg.layers(bundle.unet, bundle.latent_size),
                                 kind="cross", tokens=[class_index])
    with attention.capture(bundle.unets, spec) as store, bundle.using(bundle.personal_mode):
        # the prompt is encoded in this mode: a learned identifier embedding exists there only
        traj = sampling.ddim_invert(bundle, z, prompt, steps=steps, guidance=guidance,
                                    observers=(store,), stop=stop)
    return reference_result(bundle, image, prompt, traj, store, steps, mask_cfg, segmenter)


def reference_result(bundle, image: np.ndarray, prompt: str, traj: sampling.Trajectory, store,
                     n: int, mask_cfg: MaskConfig, segmenter=None) -> ReferenceInversion:
    """The ReferenceInversion of an inversion of n steps: its trajectory, the class token's
    mean attention over the window (the steps it ran), and the fused subject mask M^r."""
    attn = aggregate(store, slice(0, 1), n, mask_cfg, bundle.latent_size)[0]
    fused = masks.subject_mask(image, attn, segmenter, mask_cfg)
    return ReferenceInversion(image, prompt, traj, attn, fused)


def latent_blend(z_t: torch.Tensor, z_c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Latent blending (docs/method.md "Adaptive mask blending"): z^t <- M z^t + (1 - M) z^c,
    the context's background kept and only the subject region retouched.
    z_t, z_c: (B, C, h, w); m: (B, h, w) in [0, 1]."""
    m = m[:, None].to(z_t.dtype)
    return m * z_t + (1 - m) * z_c


def reach_region(m_ctx: torch.Tensor, reach: float | None) -> torch.Tensor | None:
    """Where the adaptive mask may grow: pixels within reach * h (Euclidean) of the context's
    object {M^c >= 1/2}, (B, h, w) bool on M^c's device; None when unbounded."""
    if reach is None:
        return None
    dist = masks.distance_to(m_ctx >= 0.5)  # (B, h, w), inf where a context mask is empty
    return dist <= reach * m_ctx.shape[-1]


class AdaptiveMask:
    """MaskConfig.adaptive [ours]: the target mask re-grown after each step of the attention
    window from the target's own class-token attention, united with the context's:

        M_{k+1} = max(M^c, feather(norm(mean_{j<=k} A^t_j) >= tau_lo  &  near))

    The running mean stays on the model's device (no wait for a GPU)."""

    def __init__(self, m_ctx: torch.Tensor, cfg: MaskConfig, steps: int):
        self.m_ctx, self.cfg, self.steps = m_ctx, cfg, steps
        self.window = set(cfg.window(steps))
        self.near = reach_region(m_ctx, cfg.adaptive_reach) if cfg.adaptive else None
        self.total, self.seen = 0.0, 0

    def updates(self, k: int) -> bool:
        return self.cfg.adaptive and self.cfg.source != "segmenter" and k in self.window

    def update(self, store, rows: slice, k: int, size: int) -> torch.Tensor:
        """M_{k+1} (B, h, w), from the target rows' maps of step k in `store`."""
        self.total = self.total + class_maps(store, rows, self.steps, self.cfg, size, steps=[k])
        self.seen += 1
        support = masks.normalize_maps(self.total / self.seen) >= self.cfg.tau_lo
        if self.near is not None:
            support = support & self.near
        return torch.maximum(self.m_ctx, masks.feather_maps(support, self.cfg.feather))


class Target:
    """The target branch across stage 2's steps: z^t, its trajectory, the mask M_k that the
    swap and the blending use (the controller's target mask), and the masks used per step."""

    def __init__(self, bundle, layout, context_masks: np.ndarray, ctl: swap.SwapController,
                 mask_cfg: MaskConfig, steps: int, start_step: int, callback=None):
        self.layout, self.ctl, self.callback = layout, ctl, callback
        self.m = m_ctx = torch.as_tensor(context_masks, dtype=torch.float32).to(bundle.device)
        ctl.set_masks(target=m_ctx)
        self.lambda3 = resolve_steps(mask_cfg.lambda3, steps, "lambda3")
        self.adaptive = AdaptiveMask(m_ctx, mask_cfg, steps)
        self.size = bundle.latent_size
        self.z = layout.trajectory.latent(start_step).to(bundle.device, bundle.dtype)
        self.trajectory = sampling.Trajectory(latents=[sampling.to_host(self.z)], start=start_step)
        self.used: list[torch.Tensor] = []

    def step(self, k: int, t, out, store, rows: slice) -> None:
        """After step k's UNet call and DDIM step `out`: blend for k < lambda3, grow the
        adaptive mask, record."""
        m, z = self.m, out.prev_sample
        self.used.append(sampling.to_host(m))
        if k < self.lambda3:
            z = latent_blend(z, sampling.to_device(self.layout.trajectory.latent(k + 1), z), m)
        if self.adaptive.updates(k):
            self.m = self.adaptive.update(store, rows, k, self.size)  # a new tensor: m is kept
            self.ctl.set_masks(target=self.m)
        self.z = z
        sampling.record_step(self.trajectory, None, k, t, z, out.pred_original_sample)
        if self.callback is not None:
            self.callback({"step": k, "timestep": int(t), "latent": z,
                           "x0": out.pred_original_sample, "mask": m.cpu().numpy().copy()})

    def masks_used(self) -> np.ndarray:
        """(N - start, B, h, w): the target mask of each step."""
        sampling.settle(self.z)  # the trajectory's (and masks') host copies have landed
        return (torch.stack(self.used).numpy() if self.used
                else np.zeros((0, *self.m.shape), np.float32))


def branch_prompts(bundle, prompts: list[str], reference_prompt: str):
    """(cond, uncond) text embeddings of the batch [reference (1); context (B); target (B)]:
    y^r, y^p, y^p; the reference row is the inversion's evaluation, y^r, in both halves [ours]."""
    with bundle.using(bundle.personal_mode):  # y^p with the identifier's learned embedding
        cond_p = sampling.encode_prompts(bundle, prompts)
        cond_r = sampling.encode_prompts(bundle, [reference_prompt])
    uncond = sampling.encode_prompts(bundle, [""] * (2 * len(prompts)))
    return torch.cat([cond_r, cond_p, cond_p]), torch.cat([cond_r, uncond])


def check_reference_reaches(reference: ReferenceInversion, start_step: int) -> None:
    if reference.trajectory.start > start_step:
        raise ValueError(f"the reference was inverted down to step {reference.trajectory.start}, "
                         f"but the target starts at step {start_step} and reads it from there: "
                         f"invert it with stop <= {start_step} (retouch.reference_stop)")


@torch.no_grad()
def retouch(bundle, layout, reference: ReferenceInversion, context_masks: np.ndarray,
            class_indices: list[int], *, swap_cfg: swap.SwapConfig, mask_cfg: MaskConfig,
            steps: int, guidance: float, start_step: int = 0, callback=None,
            observers: tuple = ()) -> tuple[torch.Tensor, sampling.Trajectory, np.ndarray, object]:
    """Stage 2: denoise the target branch with the swap and the blending (module docstring).
    Returns (z^t_N, the target's trajectory, the masks used per step (N - start, B, h, w), the
    class token's attention store of the batch [reference (1); context (B); target (B)]).
    Extra observers (e.g. a user's attention store, already capturing) hear every step."""
    check_reference_reaches(reference, start_step)
    b, size = len(layout.prompt), bundle.latent_size
    sched = sampling.make_scheduler(bundle, steps)
    cond, uncond = branch_prompts(bundle, layout.prompt, reference.prompt)
    ctl = swap.SwapController(bundle.unet, swap_cfg, steps, size)
    ctl.shared_reference = True
    ctl.set_masks(reference=torch.as_tensor(reference.mask.mask)[None])
    target = Target(bundle, layout, context_masks, ctl, mask_cfg, steps, start_step, callback)
    tokens = [[token_index(bundle.tokenizer, reference.prompt, bundle.class_noun)]] + \
        [[i] for i in class_indices] * 2
    spec = attention.CaptureSpec(layers=mask_cfg.layers(bundle.unet, size), kind="cross",
                                 tokens=tokens)
    rows = slice(1 + b, 1 + 2 * b)  # the target's
    with bundle.using(bundle.personal_mode), swap.swap(bundle.unet, ctl), \
            attention.capture(bundle.unet, spec) as store:
        for k in range(start_step, steps):
            t = sched.timesteps[k]
            for obs in (ctl, store, *observers):
                obs.on_step(k, int(t), guidance != 1.0)
            zt = target.z
            zr = sampling.to_device(reference.trajectory.latent(k + 1), zt)  # (1, C, h, w)
            zc = sampling.to_device(layout.trajectory.latent(k), zt)
            eps = sampling.guided_eps(bundle.unet, torch.cat([zr, zc, zt]), t, cond, uncond,
                                      guidance)[rows]
            target.step(k, t, sched.step(eps, t, zt), store, rows)
    return target.z, target.trajectory, target.masks_used(), store
