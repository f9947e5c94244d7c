"""Attention capture for the timestep scrubber: wall-time overhead and stored bytes, against the
estimate the capture spec gives before the run, from one run.

    python bench/attention.py --backend sd15 --steps 3      # CPU: 512 px, 3 steps, bytes -> 50
    python bench/attention.py --backend sd15                # GPU: fp16, 512 px, 50 steps
    python bench/attention.py --backend toy                 # toy models, 50 steps
    python bench/attention.py --backend sd15 --latent 16 --steps 2 --reps 1   # a quick check

sd15 is Stable Diffusion 1.5's real UNet (bench/common.py SD15_UNET_CONFIG, random weights, no
download) at `--latent` (64 = 512 px) with 77 x 768 text embeddings (random: the text encoder
is not what is measured), CFG batch 2 ([uncond; cond] in one call, as sampling.guided_eps).

The capture is what the scrubber shows: every step, cross-attention of all the
prompt's tokens at every layer, heads averaged (`--heads all` keeps them, as notebook 02's
scrubber cell does), fp16 on the CPU; plus notebook 02's self-attention cell: the layers at
16 x 16 (`--self-resolution`), at one step (N - 5).

Wall time: a denoising loop (UNet + DDIM step) without and with the capture, interleaved
(the order alternates every repetition); the overhead is the median of the per-repetition
ratios, so a load that drifts (another job on the CPU) hits both alike. Each step is timed
too, so a run of a few steps extrapolates to `--extrapolate-to` steps: N cross-capture steps
plus the one step that also captures self-attention.

Bytes: "actual" counts every storage the store holds once (a view would keep its parent
alive); with fewer steps than `--extrapolate-to`, the per-step cross-attention bytes are
scaled to that many steps and the (one-step) self-attention bytes added: printed as
extrapolated, next to the measured run's own estimate/actual ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SD15_TEXT_LENGTH, machine, median, sd15_unet, sync  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

MB = 1e6


def setup(a):
    """(unet, cond, uncond, scheduler, latent, description). cond/uncond: (1, L, D)."""
    from lr_tutorial import sampling
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if a.backend == "toy":
        from lr_tutorial import load_models
        bundle = load_models("toy", device=device)
        cond = sampling.encode_prompts(bundle, ["a sks star on the left in the snow"])
        uncond = sampling.encode_prompts(bundle, [""])
        unet, sched, latent = bundle.unet, bundle.scheduler, bundle.latent_size
        what = "toy UNet (trained weights)"
    else:
        from diffusers import DDIMScheduler
        latent = a.latent
        unet = sd15_unet(latent).to(device)
        unet = unet.half() if dtype == torch.float16 else unet
        g = torch.Generator().manual_seed(1)
        emb = torch.randn(2, SD15_TEXT_LENGTH, unet.config.cross_attention_dim, generator=g)
        uncond, cond = emb.to(device, dtype).chunk(2)  # (1, 77, 768) each
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        what = "SD 1.5 UNet (random weights)"
    return unet, cond, uncond, sched, latent, f"{what}, {device} {dtype}"


class StepClock:
    """An observer that stamps the start of every step; `durations(end)` -> seconds per step."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step(self, k, t=None, cfg=False):
        sync()
        self.stamps.append(time.perf_counter())

    def durations(self, end: float) -> list[float]:
        s = self.stamps + [end]
        return [b - a for a, b in zip(s, s[1:])]


def denoise(unet, cond, uncond, sched, latent, steps, guidance, observers=()) -> list[float]:
    """N DDIM steps with CFG in one UNet call (batch 2); returns seconds per step."""
    from lr_tutorial.sampling import guided_eps
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, latent, latent, generator=g).to(cond.device, cond.dtype)  # (1, 4, h, w)
    clock = StepClock()
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            for obs in (clock, *observers):
                obs.on_step(k, int(t), True)
            eps = guided_eps(unet, z, t, cond, uncond, guidance)  # UNet on (2, 4, h, w)
            z = sched.step(eps, t, z).prev_sample
        sync()
    return clock.durations(time.perf_counter())


def held_bytes(store) -> int:
    """Bytes the store really holds: each distinct storage once."""
    held = {}
    for m in store.maps.values():
        held[m.untyped_storage().data_ptr()] = m.untyped_storage().nbytes()
    return sum(held.values())


def specs(a, steps: int):
    """The scrubber's cross-attention capture and notebook 02's self-attention capture."""
    from lr_tutorial.attention import CaptureSpec
    cross = CaptureSpec(kind="cross", heads=a.heads, offload=a.offload)  # every layer, step, token
    self_ = CaptureSpec(kind="self", resolutions=[a.self_resolution], steps=[max(steps - 5, 0)],
                        offload=a.offload)
    return cross, self_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15"), default="sd15",
                    help="sd15: SD 1.5's UNet with random weights; toy: load_models('toy')")
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps run (default: 50 on a GPU or toy, 3 for sd15 on a CPU)")
    ap.add_argument("--latent", type=int, default=64, help="sd15: latent side (64 = 512 px)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each case")
    ap.add_argument("--offload", choices=("end", "step"), default="end",
                    help="CaptureSpec.offload: maps move to the CPU when the capture ends "
                         "(default) or as each is recorded (one synchronising copy per layer)")
    ap.add_argument("--heads", choices=("mean", "all"), default="mean",
                    help="cross-attention heads averaged (the scrubber) or kept (notebook 02)")
    ap.add_argument("--self-resolution", type=int, default=16,
                    help="side of the self-attention layers captured at step N - 5 (notebook 02)")
    ap.add_argument("--extrapolate-to", type=int, default=50,
                    help="steps of the run the bytes and overhead are extrapolated to")
    ap.add_argument("--guidance", type=float, default=7.5)
    a = ap.parse_args()
    gpu = torch.cuda.is_available()
    a.steps = a.steps or (50 if gpu or a.backend == "toy" else 3)
    from lr_tutorial import attention, swap

    header = machine()
    unet, cond, uncond, sched, latent, what = setup(a)
    cross, self_ = specs(a, a.steps)
    n_tokens = cond.shape[1]
    # the estimates, before any run: this run's steps, and the extrapolated run's
    est = {n: cross.estimate(unet, n, batch=1, latent_size=latent, n_tokens=n_tokens)
           + specs(a, n)[1].estimate(unet, n, batch=1, latent_size=latent, n_tokens=n_tokens)
           for n in (a.steps, a.extrapolate_to)}
    n_cross = len(cross.match(unet, latent))
    n_self = len(self_.match(unet, latent))

    def run(captured: bool):
        if not captured:
            return denoise(unet, cond, uncond, sched, latent, a.steps, a.guidance), None
        with attention.capture(unet, cross, latent) as cs, \
                attention.capture(unet, self_, latent) as ss:
            d = denoise(unet, cond, uncond, sched, latent, a.steps, a.guidance, (cs, ss))
        return d, (cs, ss)

    denoise(unet, cond, uncond, sched, latent, 1, a.guidance)  # warm-up (allocator, lazy inits)
    with attention.capture(unet, cross, latent) as warm:
        denoise(unet, cond, uncond, sched, latent, 1, a.guidance, (warm,))
    times = {False: [], True: []}  # per repetition: a list of seconds per step
    t0 = time.perf_counter()
    for r in tqdm(range(a.reps), desc="interleaved repetitions"):
        for captured in ((False, True) if r % 2 == 0 else (True, False)):
            d, stores = run(captured)
            times[captured].append(d)
            if stores:
                last = stores
    wall = time.perf_counter() - t0
    cs, ss = last
    cross_b, self_b = held_bytes(cs), held_bytes(ss)
    assert cs.nbytes + ss.nbytes == cross_b + self_b, "the store under-reports what it holds"
    actual = cross_b + self_b
    x_steps = a.extrapolate_to
    cross_per_step = cross_b / a.steps
    actual_x = cross_per_step * x_steps + self_b  # the self capture is one step either way
    kself = self_.steps[0]

    # wall time: whole-run ratio, and per step (cross-only steps; the self step apart)
    ratio = median([sum(c) / sum(p) for c, p in zip(times[True], times[False])])
    plain_step = median([x for d in times[False] for x in d])
    cross_step = median([x for d in times[True] for k, x in enumerate(d) if k != kself])
    self_extra = median([d[kself] for d in times[True]]) - cross_step
    ratio_x = (x_steps * cross_step + self_extra) / (x_steps * plain_step)

    px = f" = {latent * 8} px" if a.backend == "sd15" else ""
    print(f"# {a.backend}: {what}, latent {latent}{px}, text {n_tokens} tokens, CFG batch 2, "
          f"{a.steps} DDIM steps run")
    print(f"# {header}")
    print(f"# capture: cross-attention at every step, {n_cross} layers, all {n_tokens} tokens, "
          f"heads {a.heads}, {cross.dtype} on the CPU (offload {a.offload}); self-attention at "
          f"{a.self_resolution}x{a.self_resolution} ({n_self} layers) at step N - 5")
    print(f"# {a.reps} interleaved repetitions in {wall:.0f} s; ratios are medians of "
          "per-repetition ratios")
    col = f"extrapolated to {x_steps}" if x_steps != a.steps else "(same run)"
    print(f"{'':<38}{f'measured, {a.steps} steps':>22}{col:>24}")
    print(f"{'s/step, no capture (median)':<38}{plain_step:>22.3f}")
    print(f"{'s/step, capture (cross-only steps)':<38}{cross_step:>22.3f}")
    print(f"{'s, self-capture step extra':<38}{self_extra:>22.3f}")
    if cond.is_cuda:  # per-step clocks time the CPU's queueing of asynchronous GPU work
        print(f"{'wall time, capture / no capture':<38}{ratio:>21.3f}x{'- (GPU: see below)':>24}")
        print("# on a GPU only the whole-run ratio counts: the per-step times above are how long "
              "the CPU took to queue each step, not the GPU's time")
    else:
        print(f"{'wall time, capture / no capture':<38}{ratio:>21.3f}x{ratio_x:>23.3f}x")
    print(f"{'stored MB (actual)':<38}{actual / MB:>22.2f}{actual_x / MB:>24.2f}")
    print(f"{'  of which cross / self MB':<38}{f'{cross_b / MB:.2f} / {self_b / MB:.2f}':>22}"
          f"{f'{cross_per_step * x_steps / MB:.2f} / {self_b / MB:.2f}':>24}")
    print(f"{'estimate MB (spec, before the run)':<38}{est[a.steps] / MB:>22.2f}"
          f"{est[x_steps] / MB:>24.2f}")
    print(f"{'estimate / actual':<38}{est[a.steps] / actual:>22.3f}{est[x_steps] / actual_x:>24.3f}"
          + ("  (vs the extrapolated bytes)" if x_steps != a.steps else ""))
    # the scrubber on a Layout-and-Retouch result records stage 2's three branches
    lam2 = swap.SwapController(unet, swap.SwapConfig(), x_steps, latent).lambda2
    lr_est = cross.estimate(unet, x_steps - lam2, batch=3, latent_size=latent, n_tokens=n_tokens)
    print(f"# estimate only: the same cross capture on a Layout-and-Retouch result (stage 2: "
          f"3 branches x {x_steps - lam2} steps after lambda2 = {lam2}): {lr_est / MB:.1f} MB")


if __name__ == "__main__":
    main()
