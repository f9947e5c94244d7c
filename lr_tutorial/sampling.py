"""Sampling: prompt encoding, classifier-free guidance, DDIM sampling and DDIM inversion.

The denoising loop is written out (diffusers' scheduler API: `set_timesteps`, `step`), so every
intermediate is visible. Notation follows docs/method.md "Notation": N steps, k = 0..N-1 in denoising order
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

from .config import check_steps, resolve_guidance

StepCallback = Callable[[dict], None]  # receives {"step", "timestep", "latent", "x0"}


@dataclass
class Trajectory:
    """A denoising run: `latents[k]` is z_k (k = 0..N, z_N the result), `x0[k]` the x0
    predicted at step k, `timesteps[k]` = t_k. Tensors live on the CPU. A run that covers only
    steps `start`..N-1 (an inversion stopped where it is no longer read) holds z_start..z_N:
    then `latents[k - start]` is z_k; `latent(k)` indexes by step either way."""
    timesteps: list[int] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)
    start: int = 0

    def __len__(self) -> int:
        return len(self.timesteps)

    def latent(self, k: int) -> torch.Tensor:
        """z_k, for k = start..start + len(latents) - 1; raises outside the run."""
        i = k - self.start
        if not 0 <= i < len(self.latents):
            raise IndexError(f"this trajectory holds z_k for k = {self.start}.."
                             f"{self.start + len(self.latents) - 1}, not k = {k}")
        return self.latents[i]

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def make_scheduler(bundle, steps: int):
    """A private copy of the bundle's scheduler with `steps` inference timesteps."""
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
    if torch.is_tensor(t):  # on z's device without waiting for the GPU's queue (the UNet
        t = t.to(z.device, non_blocking=True)  # would copy it with a wait)
    if uncond is None or guidance == 1.0:
        return unet(z, t, encoder_hidden_states=cond).sample
    tt = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim == 1 else t
    out = unet(torch.cat([z, z]), tt, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """x, detached, on the CPU. From a GPU the copy is asynchronous (into pinned memory), so a
    loop that keeps every step's latents does not stall the GPU once per step; whoever reads
    the copies first calls `settle` (the loops here do, before they return)."""
    x = x.detach()
    if not x.is_cuda:
        return x.cpu()
    try:
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    except RuntimeError:  # the OS refuses to pin: an ordinary, waiting copy
        return x.cpu()
    return out.copy_(x, non_blocking=True)


def to_device(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x (on the host) on like's device and in its dtype, without waiting for the GPU's queue.
    Only for tensors nobody writes to afterwards (a stored trajectory latent, a mask made for
    this step): the copy may still be reading x when this returns."""
    return x.to(like.device, like.dtype, non_blocking=True)


def settle(x: torch.Tensor) -> None:
    """Wait until the work queued on x's device (its asynchronous host copies included) is done."""
    if x.is_cuda:
        torch.cuda.current_stream(x.device).synchronize()


@torch.no_grad()
def denoise(bundle, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
            sched, guidance: float, k_range: range, traj: Trajectory | None = None,
            callback: StepCallback | None = None, observers: tuple = ()) -> torch.Tensor:
    """Run DDIM steps k in `k_range` from z = z_k with the bundle's current UNet; append to
    `traj`. Returns z after the range. Each observer (an attention store, a swap controller)
    hears `on_step(k, t, cfg)` before the step's UNet call, `cfg` telling whether the batch is
    [uncond; cond]."""
    cfg = uncond is not None and guidance != 1.0
    for k in k_range:
        t = sched.timesteps[k]
        for obs in observers:
            obs.on_step(k, int(t), cfg)
        eps = guided_eps(bundle.unet, z, t, cond, uncond, guidance)
        out = sched.step(eps, t, z)
        record_step(traj, callback, k, t, out.prev_sample, out.pred_original_sample)
        z = out.prev_sample
    settle(z)  # the trajectory's host copies have landed
    return z


def record_step(traj: Trajectory | None, callback: StepCallback | None, k: int, t,
                z: torch.Tensor, x0: torch.Tensor) -> None:
    """Append step k's result (z after the step, its x0) to `traj` and tell `callback`."""
    if traj is not None:
        traj.timesteps.append(int(t))
        traj.x0.append(to_host(x0))
        traj.latents.append(to_host(z))
    if callback is not None:
        callback({"step": k, "timestep": int(t), "latent": z, "x0": x0})


def sample(bundle, prompts: list[str], seeds: list[int], *, steps: int = 50,
           guidance: float | None = None, negative: str = "", callback: StepCallback | None = None,
           observers: tuple = ()) -> tuple[torch.Tensor, Trajectory]:
    """Plain text-to-image DDIM sampling with the bundle's current UNet. Returns (z_N, Trajectory).
    guidance None: the bundle's own (ModelBundle.guidance)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt")
    guidance = resolve_guidance(bundle, guidance)
    sched = make_scheduler(bundle, steps)
    cond = encode_prompts(bundle, list(prompts))
    uncond = encode_prompts(bundle, [negative] * len(prompts))
    z = initial_noise(bundle, seeds)
    traj = Trajectory(latents=[to_host(z)])
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


def inversion_step(sched, k: int, z: torch.Tensor, model_output: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM inversion step (docs/method.md "DDIM inversion"): from z_{k+1} at level
    t_{k+1} to the noisier z_k, given the model's output at the target timestep t_k:

        x0  = (z_{k+1} - sqrt(1 - a_{k+1}) eps) / sqrt(a_{k+1})
        z_k = sqrt(a_k) x0 + sqrt(1 - a_k) eps          a_k = alpha_bar(t_k)

    a_N is the scheduler's final alpha. Returns (z_k, x0)."""
    ts, abar = sched.timesteps, sched.alphas_cumprod
    a_k = abar[ts[k]].to(z)
    a_next = (abar[ts[k + 1]] if k + 1 < len(ts) else sched.final_alpha_cumprod).to(z)
    eps = to_eps(model_output, z, a_k, sched.config.prediction_type)
    x0 = (z - (1 - a_next).sqrt() * eps) / a_next.sqrt()
    return a_k.sqrt() * x0 + (1 - a_k).sqrt() * eps, x0


def check_stop(stop, steps: int) -> None:
    if isinstance(stop, bool) or not isinstance(stop, int) or not 0 <= stop < steps:
        raise ValueError(f"stop must be a step in [0, {steps - 1}] (the last step inverted; "
                         f"0: all the way to noise), got {stop!r}")


@torch.no_grad()
def ddim_invert(bundle, z_clean: torch.Tensor, prompt: str | list[str] = "", *, steps: int = 50,
                guidance: float = 1.0, observers: tuple = (), callback: StepCallback | None = None,
                stop: int = 0) -> Trajectory:
    """DDIM inversion: walk a clean latent z_N back to noise along the deterministic DDIM path,
    k = N-1 .. stop, evaluating the model at the target timestep t_k (null-text inversion's and
    MasaCtrl's convention; `inversion_step`). Observers hear on_step(k, t_k, cfg) in inversion
    order. Returns the Trajectory in denoising order (latents[k - stop] = z_k, the last one
    z_clean; x0 the x0 seen at each step; Trajectory.start = stop), ready to be replayed."""
    check_stop(stop, steps)
    sched = make_scheduler(bundle, steps)
    b = z_clean.shape[0]
    cond = encode_prompts(bundle, [prompt] * b if isinstance(prompt, str) else list(prompt))
    uncond = encode_prompts(bundle, [""] * b) if guidance != 1.0 else None
    z = z_clean.to(bundle.device, bundle.dtype)
    latents, x0s = [to_host(z)], []
    for k in reversed(range(stop, steps)):
        t = sched.timesteps[k]
        for obs in observers:
            obs.on_step(k, int(t), uncond is not None)
        z, x0 = inversion_step(sched, k, z, guided_eps(bundle.unet, z, t, cond, uncond, guidance))
        latents.append(to_host(z))
        x0s.append(to_host(x0))
        if callback is not None:
            callback({"step": k, "timestep": int(t), "latent": z, "x0": x0})
    settle(z)  # the host copies have landed
    return Trajectory(timesteps=[int(t) for t in sched.timesteps[stop:]], latents=latents[::-1],
                      x0=x0s[::-1], start=stop)
