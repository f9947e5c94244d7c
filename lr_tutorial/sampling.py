"""Sampling: prompt encoding, classifier-free guidance, DDIM sampling and DDIM inversion.

The denoising loop is written out (diffusers' scheduler API: `set_timesteps`, `step`), so every
intermediate is visible. Notation follows docs/method.md: N steps, k = 0..N-1 in denoising order
(k = 0 is the noisiest), z_k the latent entering step k, z_N the final latent.

    eps_hat = eps(z_k, t_k, "") + w * (eps(z_k, t_k, y) - eps(z_k, t_k, ""))     (CFG)
    z_{k+1}, x0_k = DDIM(z_k, eps_hat, t_k)                                       (scheduler.step)

Works for epsilon- and v-prediction models alike: the scheduler converts the model output.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

StepCallback = Callable[[dict], None]  # receives {"step", "timestep", "latent", "x0"}


@dataclass
class Trajectory:
    """A denoising run: `latents[k]` is z_k (k = 0..N, z_N the result), `x0[k]` the x0
    predicted at step k, `timesteps[k]` = t_k. Tensors live on the CPU."""
    timesteps: list[int] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def make_scheduler(bundle, steps: int):
    """A private copy of the bundle's scheduler with `steps` inference timesteps."""
    from .layout import check_steps
    check_steps(steps)
    sched = copy.deepcopy(bundle.scheduler)
    sched.set_timesteps(steps)
    return sched


def prompt_ids(bundle, prompts: list[str]) -> torch.Tensor:
    """Token ids (B, L) of prompts, padded to the tokenizer's max length, on the text encoder's
    device (it may be offloaded)."""
    tok = bundle.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(bundle.text_encoder.device)


@torch.no_grad()
def encode_prompts(bundle, prompts: list[str]) -> torch.Tensor:
    """Text embeddings (B, L, D) of prompts, padded to the tokenizer's max length."""
    return bundle.text_encoder(prompt_ids(bundle, prompts))[0].to(bundle.device, bundle.dtype)


def initial_noise(bundle, seeds: list[int]) -> torch.Tensor:
    """z_0 for each seed, drawn on the CPU from its own generator: the same seed gives the
    same noise whatever the batch and device."""
    c = bundle.unet.config.in_channels
    h = w = bundle.latent_size
    z = [torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(z).to(bundle.device, bundle.dtype) * bundle.scheduler.init_noise_sigma


def guided_eps(unet, z: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance: float) -> torch.Tensor:
    """Classifier-free guidance, both halves in one UNet call: batch [uncond rows; cond rows].
    z: (B, C, h, w); t: one timestep, or (B,) with a timestep per row."""
    if uncond is None or guidance == 1.0:
        return unet(z, t, encoder_hidden_states=cond).sample
    tt = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim == 1 else t
    out = unet(torch.cat([z, z]), tt, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def denoise(bundle, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
            sched, guidance: float, k_range: range, traj: Trajectory | None = None,
            callback: StepCallback | None = None, observers: tuple = ()) -> torch.Tensor:
    """Run DDIM steps k in `k_range` from z = z_k; append to `traj`. Returns z after the range.

    Each observer (an attention store or swap controller) hears `on_step(k, t, cfg)` before
    the step's UNet call, `cfg` telling whether the batch is [uncond; cond]."""
    cfg = uncond is not None and guidance != 1.0
    for k in k_range:
        t = sched.timesteps[k]
        for obs in observers:
            obs.on_step(k, int(t), cfg)
        eps = guided_eps(bundle.unet, z, t, cond, uncond, guidance)
        out = sched.step(eps, t, z)
        if traj is not None:
            traj.timesteps.append(int(t))
            traj.x0.append(out.pred_original_sample.detach().cpu())
            traj.latents.append(out.prev_sample.detach().cpu())
        if callback is not None:
            callback({"step": k, "timestep": int(t), "latent": out.prev_sample,
                      "x0": out.pred_original_sample})
        z = out.prev_sample
    return z


def sample(bundle, prompts: list[str], seeds: list[int], *, steps: int = 50,
           guidance: float = 7.5, negative: str = "", callback: StepCallback | None = None,
           observers: tuple = ()) -> tuple[torch.Tensor, Trajectory]:
    """Plain text-to-image DDIM sampling with the bundle's current UNet. Returns (z_N, Trajectory)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt")
    from .layout import check_guidance
    check_guidance(guidance)
    sched = make_scheduler(bundle, steps)
    cond = encode_prompts(bundle, list(prompts))
    uncond = encode_prompts(bundle, [negative] * len(prompts))
    z = initial_noise(bundle, seeds)
    traj = Trajectory(latents=[z.detach().cpu()])
    z = denoise(bundle, z, cond, uncond, sched=sched, guidance=guidance, k_range=range(steps),
                traj=traj, callback=callback, observers=observers)
    return z, traj


@torch.no_grad()
def decode(bundle, z: torch.Tensor) -> np.ndarray:
    """Latents (B, 4, h, w) -> uint8 images (B, H, W, 3)."""
    vae = bundle.vae
    x = vae.decode(z.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode(bundle, images: np.ndarray) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> latents (B, 4, h, w) (posterior mean, scaled)."""
    vae = bundle.vae
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return (z * vae.config.scaling_factor).to(bundle.device, bundle.dtype)


def to_eps(model_output: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    """The noise prediction eps from an epsilon- or v-prediction model's output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
        return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * z
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@torch.no_grad()
def ddim_invert(bundle, z_clean: torch.Tensor, prompt: str | list[str] = "", *, steps: int = 50,
                guidance: float = 1.0, observers: tuple = (), callback: StepCallback | None = None,
                ) -> Trajectory:
    """DDIM inversion: walk a clean latent z_N back to noise along the deterministic DDIM path.

    Convention (null-text inversion's and MasaCtrl's): to go from level t_{k+1} to the noisier
    t_k, evaluate the model at the *target* timestep t_k on the current latent:

        eps = eps(z_{k+1}, t_k, y);  x0 = (z_{k+1} - sqrt(1 - a_{k+1}) eps) / sqrt(a_{k+1})
        z_k = sqrt(a_k) x0 + sqrt(1 - a_k) eps

    with a_k = alpha_bar(t_k) and a_N = the scheduler's final alpha. Observers hear
    on_step(k, t_k) in inversion order (k = N-1 .. 0). Returns the Trajectory in denoising order
    (latents[k] = z_k, latents[N] = z_clean; x0[k] the x0 seen at step k), ready to be replayed.
    """
    sched = make_scheduler(bundle, steps)
    ts, abar = sched.timesteps, sched.alphas_cumprod
    ptype = sched.config.prediction_type
    b = z_clean.shape[0]
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    cond = encode_prompts(bundle, prompts)
    uncond = encode_prompts(bundle, [""] * b) if guidance != 1.0 else None
    cfg = uncond is not None
    z = z_clean.to(bundle.device, bundle.dtype)
    lat, x0s = [z.detach().cpu()], []
    for k in reversed(range(steps)):
        t = ts[k]
        a_next = abar[t].to(z)
        a_cur = (abar[ts[k + 1]] if k + 1 < steps else sched.final_alpha_cumprod).to(z)
        for obs in observers:
            obs.on_step(k, int(t), cfg)
        out = guided_eps(bundle.unet, z, t, cond, uncond, guidance)
        eps = to_eps(out, z, a_next, ptype)
        x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        lat.append(z.detach().cpu())
        x0s.append(x0.detach().cpu())
        if callback is not None:
            callback({"step": k, "timestep": int(t), "latent": z, "x0": x0})
    return Trajectory(timesteps=[int(t) for t in ts], latents=lat[::-1], x0=x0s[::-1])
