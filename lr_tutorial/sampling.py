"""Sampling: prompt encoding, classifier-free guidance, DDIM sampling and DDIM inversion.

The denoising loop is written out (diffusers' scheduler API: `set_timesteps`, `step`), so every
intermediate is visible. Notation follows docs/method.md "Notation": N steps, k = 0..N-1 in denoising order
(k = 0 is the noisiest), z_k the latent entering step k, z_N the final latent.

    eps_hat = eps(z_k, t_k, "") + w * (eps(z_k, t_k, y) - eps(z_k, t_k, ""))     (CFG)
    z_{k+1}, x0_k = DDIM(z_k, eps_hat, t_k)                                       (scheduler.step)

Works for epsilon- and v-prediction models alike: the scheduler converts the model output.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .attention import NO_ROWS  # an observer's `rows` when no row of a call is its own
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
            callback: StepCallback | None = None, observers: tuple = (),
            rider: Inversion | None = None) -> torch.Tensor:
    """Run DDIM steps k in `k_range` from z = z_k; append to `traj`. Returns z after the range.

    Each observer (an attention store or swap controller) hears `on_step(k, t, cfg)` before
    the step's UNet call, `cfg` telling whether the batch is [uncond; cond].
    `rider`: an Inversion whose next steps share these UNet calls, its row appended to the
    batch (while it has steps left). The observers on both sides are told which rows are
    theirs (`rows`), so each records its own."""
    cfg = uncond is not None and guidance != 1.0
    n = z.shape[0] * (2 if cfg else 1)  # this loop's rows
    # a personalized rider in a vanilla loop: its rows alone run the personalized model, so it
    # must ride every call of the range (stage 1 hands it the last vanilla steps only)
    mixed = rider is not None and not rider.done and rider.mode != bundle.mode
    if mixed and rider.remaining < len(k_range):
        raise ValueError(f"a {rider.mode} rider in a {bundle.mode} loop must ride all of its "
                         f"{len(k_range)} calls, but has {rider.remaining} steps left: hand it "
                         "the last calls of the loop only")
    with bundle.personal_rows(n) if mixed else contextlib.nullcontext():
        for k in k_range:
            t = sched.timesteps[k]
            for obs in observers:
                obs.on_step(k, int(t), cfg)
            if rider is not None and not rider.done:  # batch [uncond; cond] (or [cond]) + rider
                zr, tr, cr = rider.begin()
                z_in, c_in = (torch.cat([z, z]), torch.cat([uncond, cond])) if cfg else (z, cond)
                t_in = t.reshape(1).expand(n).to(tr.device, tr.dtype, non_blocking=True)
                with _rows(observers, slice(0, n)), _rows(rider.observers, slice(n, None)):
                    out = bundle.unet(torch.cat([z_in, zr]), torch.cat([t_in, tr]),
                                      encoder_hidden_states=torch.cat([c_in, cr])).sample
                rider.finish(out[n:])
                eps = out[:n]
                if cfg:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = guided_eps(bundle.unet, z, t, cond, uncond, guidance)
            out = sched.step(eps, t, z)
            if traj is not None:
                traj.timesteps.append(int(t))
                traj.x0.append(to_host(out.pred_original_sample))
                traj.latents.append(to_host(out.prev_sample))
            if callback is not None:
                callback({"step": k, "timestep": int(t), "latent": out.prev_sample,
                          "x0": out.pred_original_sample})
            z = out.prev_sample
    settle(z)  # the trajectory's host copies have landed
    return z


@contextlib.contextmanager
def _rows(observers, rows: slice):
    """Tell observers (attention stores, key/value caches) which rows of the batch are theirs,
    for the calls inside the block; then restore what they had."""
    before = [getattr(obs, "rows", None) for obs in observers]
    for obs in observers:
        obs.rows = rows
    try:
        yield
    finally:
        for obs, r in zip(observers, before):
            obs.rows = r


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
    inv = Inversion(bundle, z_clean, prompt, steps=steps, guidance=guidance,
                    observers=observers, callback=callback)
    try:
        while not inv.done:
            inv.step_alone()
    finally:
        for obs in observers:
            obs.rows = None
    return inv.trajectory()


class Inversion:
    """ddim_invert one step at a time, so that its UNet calls can also ride along another
    loop's: `denoise(..., rider=inv)` appends the inversion's row to each of its UNet calls
    (one timestep per row) until the inversion is done. The reference inversion of
    Layout-and-Retouch rides stage 1 this way (batch 2B + 1 instead of a separate batch-1
    call per step; lr_tutorial.pipeline). Without classifier-free guidance only (guidance 1,
    the inversion's usual setting).

    Its observers record only in its own calls: between its steps their `rows` is NO_ROWS, so
    an attention store left installed does not record the other loop's calls.

    stop: the last step inverted (k = N-1 .. stop), so the trajectory holds z_stop..z_N
    (Trajectory.start = stop): Layout-and-Retouch reads the reference only from the step its
    target starts at, so it may stop there (LRConfig.reference_inversion="start")."""

    def __init__(self, bundle, z_clean: torch.Tensor, prompt: str | list[str] = "", *,
                 steps: int = 50, guidance: float = 1.0, observers: tuple = (),
                 callback: StepCallback | None = None, stop: int = 0):
        if isinstance(stop, bool) or not isinstance(stop, int) or not 0 <= stop < steps:
            raise ValueError(f"stop must be a step in [0, {steps - 1}] (the last step inverted; "
                             f"0: all the way to noise), got {stop!r}")
        self.bundle, self.guidance, self.prompt = bundle, guidance, prompt
        self.mode = bundle.mode  # the model it inverts with (a loop in another mode mixes rows)
        self.observers, self.callback = tuple(observers), callback
        self.sched = make_scheduler(bundle, steps)
        self.ptype = self.sched.config.prediction_type
        b = z_clean.shape[0]
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        self.cond = encode_prompts(bundle, prompts)
        self.uncond = encode_prompts(bundle, [""] * b) if guidance != 1.0 else None
        self.z = z_clean.to(bundle.device, bundle.dtype)
        self.lat, self.x0s = [to_host(self.z)], []
        for obs in self.observers:  # they sit out every call until this inversion's first
            obs.rows = NO_ROWS
        self.stop = stop
        self.todo = list(reversed(range(stop, steps)))  # k = N-1 .. stop

    @property
    def done(self) -> bool:
        return not self.todo

    @property
    def remaining(self) -> int:
        """Steps (UNet calls) left."""
        return len(self.todo)

    def begin(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next step's UNet inputs (z, t per row, text embeddings); tells the observers the
        step (k, t_k, cfg=False)."""
        if self.guidance != 1.0:
            raise ValueError("an inversion with classifier-free guidance cannot ride another "
                             "loop's calls; run it alone (ddim_invert)")
        k = self.todo[0]
        t = self.sched.timesteps[k]
        for obs in self.observers:
            obs.on_step(k, int(t), False)
            obs.rows = None  # denoise narrows this to the rider's rows
        return (self.z, t.reshape(1).expand(self.z.shape[0]).to(self.z.device, non_blocking=True),
                self.cond)

    def finish(self, model_output: torch.Tensor) -> None:
        """Advance by one step, given the UNet's output for the rows `begin` returned."""
        for obs in self.observers:
            obs.rows = NO_ROWS  # sit out the calls that are not the inversion's
        k = self.todo.pop(0)
        ts, abar = self.sched.timesteps, self.sched.alphas_cumprod
        t, z = ts[k], self.z
        a_next = abar[t].to(z)
        a_cur = (abar[ts[k + 1]] if k + 1 < len(ts) else self.sched.final_alpha_cumprod).to(z)
        eps = to_eps(model_output, z, a_next, self.ptype)
        x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        self.z = z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        self.lat.append(to_host(z))
        self.x0s.append(to_host(x0))
        if self.callback is not None:
            self.callback({"step": k, "timestep": int(t), "latent": z, "x0": x0})

    @torch.no_grad()
    def step_alone(self) -> None:
        """One inversion step in a UNet call of its own (with CFG if guidance != 1)."""
        k = self.todo[0]
        t = self.sched.timesteps[k]
        cfg = self.uncond is not None
        for obs in self.observers:
            obs.on_step(k, int(t), cfg)
            obs.rows = None
        out = guided_eps(self.bundle.unet, self.z, t, self.cond, self.uncond, self.guidance)
        self.finish(out)

    def trajectory(self) -> Trajectory:
        if not self.done:
            raise RuntimeError(f"the inversion still has {len(self.todo)} steps to go")
        settle(self.z)  # its host copies have landed
        ts = self.sched.timesteps
        return Trajectory(timesteps=[int(t) for t in ts[self.stop:]], latents=self.lat[::-1],
                          x0=self.x0s[::-1], start=self.stop)
