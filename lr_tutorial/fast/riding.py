"""The reference inversion riding stage 1's UNet calls (fast engine).

The reference's DDIM inversion (sampling.ddim_invert, docs/method.md "DDIM inversion") needs one
UNet call per step on one row; stage 1 makes one call per step on 2B rows. Here the inversion
runs one step at a time (`Inversion`), its row appended to stage 1's calls
(`denoise_riding`, `step_blended_riding`): the same evaluations, N calls fewer. In stage 1's
vanilla steps only that row runs the personalized model (ModelBundle.personal_rows: a LoRA's
hook on those rows); with a full DreamBooth UNet the inversion's first lambda1 steps run alone.
Every observer records only its own rows (`rows`: attention.NO_ROWS between its calls).
Tested equal to the plain inversion and stage 1 within float rounding (tests/test_fast.py).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import attention, sampling
from ..attention import NO_ROWS
from ..config import LayoutConfig, resolve_steps
from ..layout import LayoutResult
from ..masks import MaskConfig
from ..prompts import check_prompts, strip_identifier
from .kv import KVCache, record_kv


class Inversion:
    """ddim_invert one step at a time, so that its UNet calls can also ride along another
    loop's: `denoise_riding(..., rider=inv)` appends the inversion's row to each of its UNet calls
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
                 callback: sampling.StepCallback | None = None, stop: int = 0):
        sampling.check_stop(stop, steps)
        self.bundle, self.guidance, self.prompt = bundle, guidance, prompt
        self.mode = bundle.mode  # the model it inverts with (a loop in another mode mixes rows)
        self.observers, self.callback = tuple(observers), callback
        self.sched = sampling.make_scheduler(bundle, steps)
        b = z_clean.shape[0]
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        self.cond = sampling.encode_prompts(bundle, prompts)
        self.uncond = sampling.encode_prompts(bundle, [""] * b) if guidance != 1.0 else None
        self.z = z_clean.to(bundle.device, bundle.dtype)
        self.lat, self.x0s = [sampling.to_host(self.z)], []
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
        t = self.sched.timesteps[k]
        z, x0 = sampling.inversion_step(self.sched, k, self.z, model_output)
        self.z = z
        self.lat.append(sampling.to_host(z))
        self.x0s.append(sampling.to_host(x0))
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
        out = sampling.guided_eps(self.bundle.unet, self.z, t, self.cond, self.uncond, self.guidance)
        self.finish(out)

    def trajectory(self) -> Trajectory:
        if not self.done:
            raise RuntimeError(f"the inversion still has {len(self.todo)} steps to go")
        sampling.settle(self.z)  # its host copies have landed
        ts = self.sched.timesteps
        return sampling.Trajectory(timesteps=[int(t) for t in ts[self.stop:]], latents=self.lat[::-1],
                          x0=self.x0s[::-1], start=self.stop)


@torch.no_grad()
def denoise_riding(bundle, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
            sched, guidance: float, k_range: range, traj: sampling.Trajectory | None = None,
            callback=None, observers: tuple = (),
            rider: Inversion | None = None) -> torch.Tensor:
    """sampling.denoise, with `rider`: an Inversion whose next steps share these UNet calls, its row appended to the
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
                eps = sampling.guided_eps(bundle.unet, z, t, cond, uncond, guidance)
            out = sched.step(eps, t, z)
            sampling.record_step(traj, callback, k, t, out.prev_sample, out.pred_original_sample)
            z = out.prev_sample
    sampling.settle(z)  # the trajectory's host copies have landed
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


def step_blended_riding(bundle, prompts: list[str], seeds: list[int], config: LayoutConfig | None = None,
                        *, callback=None, observers: tuple = (), decode: bool = True,
                        checked: bool = False, rider: Inversion | None = None) -> LayoutResult:
    """layout.step_blended, with `rider`: an Inversion made with the personalized model (the reference inversion,
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
                         "(riding_inversion(ride_steps=rideable_steps(...)))")
    if l1 > 0:
        with bundle.using("vanilla"):
            cond = sampling.encode_prompts(bundle, vanilla_prompts)
            for ks, r in ((range(0, l1 - early), None), (range(l1 - early, l1), rider)):
                if len(ks):
                    z = denoise_riding(bundle, z, cond, uncond, k_range=ks, rider=r, **common)
    if l1 < n:
        with bundle.using(bundle.personal_mode):
            cond = sampling.encode_prompts(bundle, list(prompts))
            z = denoise_riding(bundle, z, cond, uncond, k_range=range(l1, n), rider=rider,
                                 **common)
    images = sampling.decode(bundle, z) if decode else None
    return LayoutResult(images, traj, l1, list(prompts), vanilla_prompts)


def rideable_steps(bundle, n: int, lambda1: int) -> int:
    """How many of stage 1's n UNet calls the reference inversion (personalized model) can
    ride: all n where one call can mix vanilla and personalized rows (ModelBundle.mixes_rows:
    a LoRA, through ModelBundle.personal_rows; textual inversion), so no inversion call runs
    alone; else (a full DreamBooth UNet) the n - lambda1 personalized ones [ours]."""
    return n if bundle.mixes_rows else n - lambda1


@contextlib.contextmanager
def riding_inversion(bundle, image: np.ndarray, prompt: str, class_index: int, *, steps: int,
                     mask_cfg: MaskConfig, ride_steps: int, guidance: float = 1.0,
                     kv: KVCache | None = None, stop: int = 0):
    """`with riding_inversion(...) as (inv, store):` retouch.invert_reference's inversion
    (steps N-1 .. stop: `steps - stop` UNet calls), started so that its last calls ride the
    `ride_steps` UNet calls of another loop (`denoise_riding(..., rider=inv)`: stage 1's
    calls, `rideable_steps`, in the pipeline). Runs the calls that do not fit there alone first,
    `max(0, steps - stop - ride_steps)`, with the personalized model, and keeps the class
    token's capture open for the riding steps. Then `retouch.reference_result(...)`.

    kv: a KVCache (reference_plan's layers and steps) that records the reference branch's
    keys/values from the inversion's own UNet calls: here for the steps that run alone, and,
    with `record_kv(..., kv)` around the other loop, for the riding ones (it is one of the
    inversion's observers, so it records the inversion's row only)."""
    if kv is not None and guidance != 1.0:
        raise ValueError("the reference's keys/values are recorded from an inversion without "
                         "classifier-free guidance (guidance=1.0, the inversion's usual "
                         f"setting), got guidance={guidance}")
    z = sampling.encode(bundle, image[None])
    spec = attention.CaptureSpec(layers=mask_cfg.layers(bundle.unet, bundle.latent_size),
                                 kind="cross", tokens=[class_index])
    with attention.capture(bundle.unets, spec) as store:
        observers = (store,) if kv is None else (store, kv)
        with bundle.using(bundle.personal_mode), \
                (record_kv(bundle.unets, kv) if kv is not None else contextlib.nullcontext()):
            # the prompt is encoded here: a learned identifier embedding exists in this mode only
            inv = Inversion(bundle, z, prompt, steps=steps, guidance=guidance,
                                     observers=observers, stop=stop)
            for _ in range(max(0, steps - stop - ride_steps)):
                inv.step_alone()
        yield inv, store
