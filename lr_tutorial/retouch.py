"""Stage 2: retouch by multi-source attention swap, with adaptive mask blending.

Three branches share one UNet call per step (x2 for classifier-free guidance), batch order
[reference; context; target] (docs/method.md stage 2):
- reference r: the DDIM inversion of x^r, replayed: z^r_k is read from its trajectory;
- context c:   the stage-1 trajectory, replayed: z^c_k is read, never recomputed;
- target t:    starts from z^c at `start_step` and is denoised by eps* with y^p, its
               self-attention reading from the other two (attention.SwapProcessor).

    z^t_{k+1} = DDIM(z^t_k, CFG(eps*, [z^r_k, z^c_k, z^t_k], t_k))[target]
    z^t_{k+1} = M_k z^t_{k+1} + (1 - M_k) z^c_{k+1}        for k < lambda3
    M_{k+1}   = max(M^c, feather(norm(mean_{j<=k} A^t_j) >= tau_lo))   (adaptive)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import attention, masks, sampling
from .layout import resolve_steps


@dataclass
class ReferenceInversion:
    """x^r, its inversion trajectory (denoising order), the class-token attention map seen
    while inverting, and its fused subject mask M^r. Reusable across prompts and seeds."""
    image: np.ndarray
    prompt: str
    trajectory: sampling.Trajectory
    attention: np.ndarray
    mask: masks.FusedMask


def mask_layers(unet, cfg: masks.MaskConfig, latent_size: int) -> list[str]:
    sizes = sorted({max(1, int(round(f * latent_size))) for f in cfg.attention_fractions})
    return attention.select_layers(unet, "*", "cross", resolutions=sizes, latent_size=latent_size)


def window(cfg: masks.MaskConfig, n: int) -> list[int]:
    lo, hi = cfg.attention_window
    return list(range(int(round(lo * n)), max(int(round(hi * n)), int(round(lo * n)) + 1)))


def aggregate(store, rows: slice, n_steps: int, cfg: masks.MaskConfig, size: int,
              steps: list[int] | None = None) -> np.ndarray:
    """Mean class-token map (rows of the store's batch) over the window's steps: (B, size, size)."""
    steps = steps if steps is not None else window(cfg, n_steps)
    present = [s for s in steps if s in set(store.steps())]
    return store.cross_map(0, size, steps=present)[rows].numpy()


@torch.no_grad()
def invert_reference(bundle, image: np.ndarray, prompt: str, class_index: int, *, steps: int,
                     mask_cfg: masks.MaskConfig, segmenter=None, guidance: float = 1.0,
                     ) -> ReferenceInversion:
    """DDIM-invert x^r with the personalized model and build its subject mask M^r."""
    z = sampling.encode(bundle, image[None])
    spec = attention.CaptureSpec(layers=mask_layers(bundle.unet, mask_cfg, bundle.latent_size),
                                 kind="cross", tokens=[class_index])
    with bundle.using("personalized" if bundle.has_personal else "vanilla"), \
            attention.capture(bundle.unet, spec) as store:
        traj = sampling.ddim_invert(bundle, z, prompt, steps=steps, guidance=guidance,
                                    observers=(store,))
    attn = aggregate(store, slice(0, 1), steps, mask_cfg, bundle.latent_size)[0]
    fused = masks.subject_mask(image, attn, segmenter, mask_cfg)
    return ReferenceInversion(image, prompt, traj, attn, fused)


@torch.no_grad()
def retouch(bundle, layout, reference: ReferenceInversion, context_masks: np.ndarray,
            class_indices: list[int], *, swap_cfg: attention.SwapConfig,
            mask_cfg: masks.MaskConfig, steps: int, guidance: float, start_step: int = 0,
            callback=None, observers: tuple = (),
            ) -> tuple[torch.Tensor, sampling.Trajectory, np.ndarray, object]:
    """Denoise the target branch. Returns (z^t_N, target trajectory, masks used per step
    (N - start, B, h, w), the attention store of the class token for all three branches).
    Extra observers (e.g. a user's attention store, already capturing) hear every step."""
    b = len(layout.prompt)
    size = bundle.latent_size
    sched = sampling.make_scheduler(bundle, steps)
    l3 = resolve_steps(mask_cfg.lambda3, steps, "lambda3")
    ref_class = reference_class_index(bundle, reference.prompt)
    cond_p = sampling.encode_prompts(bundle, layout.prompt)
    cond = torch.cat([sampling.encode_prompts(bundle, [reference.prompt] * b), cond_p, cond_p])
    uncond = sampling.encode_prompts(bundle, [""] * (3 * b))
    m_ctx = torch.as_tensor(context_masks, dtype=torch.float32)  # (B, h, w)
    ctl = attention.SwapController(bundle.unet, swap_cfg, steps, size)
    ctl.set_masks(target=m_ctx, reference=torch.as_tensor(reference.mask.mask)[None])
    spec = attention.CaptureSpec(layers=mask_layers(bundle.unet, mask_cfg, size), kind="cross",
                                 tokens=[[ref_class]] * b + [[i] for i in class_indices] * 2)
    win = set(window(mask_cfg, steps))
    m = m_ctx.clone()
    zt = layout.trajectory.latents[start_step].to(bundle.device, bundle.dtype)
    traj = sampling.Trajectory(latents=[zt.detach().cpu()])
    used = []
    with bundle.using("personalized" if bundle.has_personal else "vanilla"), \
            attention.swap(bundle.unet, ctl), attention.capture(bundle.unet, spec) as store:
        for k in range(start_step, steps):
            t = sched.timesteps[k]
            zr = reference.trajectory.latents[k].to(zt).expand(b, -1, -1, -1)
            zc = layout.trajectory.latents[k].to(zt)
            for obs in (ctl, store, *observers):
                obs.on_step(k, int(t), guidance != 1.0)
            eps = sampling.guided_eps(bundle.unet, torch.cat([zr, zc, zt]), t, cond, uncond,
                                      guidance)[2 * b:]
            out = sched.step(eps, t, zt)
            zt = out.prev_sample
            used.append(m.numpy().copy())
            if k < l3:
                mm = m[:, None].to(zt)
                zt = mm * zt + (1 - mm) * layout.trajectory.latents[k + 1].to(zt)
            if mask_cfg.adaptive and mask_cfg.source != "segmenter" and k in win:  # attention-based
                seen = sorted(s for s in store.steps() if s in win)
                a = aggregate(store, slice(2 * b, 3 * b), steps, mask_cfg, size, steps=seen)
                own = np.stack([masks.feather(masks.normalize(ai) >= mask_cfg.tau_lo,
                                              mask_cfg.feather) for ai in a])
                m = torch.maximum(m_ctx, torch.as_tensor(own))
                ctl.set_masks(target=m)
            traj.timesteps.append(int(t))
            traj.x0.append(out.pred_original_sample.detach().cpu())
            traj.latents.append(zt.detach().cpu())
            if callback is not None:
                callback({"step": k, "timestep": int(t), "latent": zt,
                          "x0": out.pred_original_sample, "mask": used[-1]})
    return zt, traj, np.stack(used), store


def reference_class_index(bundle, prompt: str) -> int:
    from .prompts import token_index
    return token_index(bundle.tokenizer, prompt, bundle.class_noun)
