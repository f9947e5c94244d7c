"""Where the cached stage 2's extra time goes, per denoising step, from one run.

    python bench/stage2.py --backend sd15-random          # on a GPU: fp16, 512 px, 50 steps, 8 images
    python bench/stage2.py --backend toy                  # toy models, CPU
    python bench/stage2.py --backend sd15-random --latent 8 --steps 8 --images 2   # CPU smoke run

The cached stage 2 runs as many rows per UNet call as plain sampling (the B target rows, x2
under CFG), yet on an H200 its steps cost more than plain sampling's (bench/HISTORY.md, session
18). This times stage 2 (retouch.retouch, inside LayoutAndRetouch with the reference already
cached) per step, as a ratio to a plain personalized step (same rows), with the settings that
add work switched off one at a time:

- default:      LRConfig() as shipped (stage2="cached"; since session 19 a fixed mask);
- adaptive:     MaskConfig(adaptive=True): the target mask is recomputed from the target's
                cross-attention at every step, on the maps' device (the default until session
                18, whose numbers in bench/HISTORY.md have it in every row but "no adaptive");
- kv-model:     LRConfig(kv_device="model"): the caches stay on the GPU (no host copies);
- context-only: SwapConfig(mode="context"): one attention per swapped layer (the context's)
                instead of the masked reference's and the context's.

The other three change the method's work or result: they say what each part costs, not a
setting to use (adaptive: the option's cost). Cases are interleaved (the order rotates every repetition); UNet rows are exact.

Then, whether the steps wait on the GPU or on Python: plain sampling's time per step at 1, 2, 4
and 8 images (if it hardly grows with the rows, the CPU's work per step sets the pace), and with
`--profile-steps K`, torch.profiler over K-step runs of plain sampling and of stage 2 (default
variant): the GPU's busy time per step (sum of kernel times) against the CPU's.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import UNetCounter, machine, median, sync  # noqa: E402
from stage1 import parser, setup  # noqa: E402

import torch  # noqa: E402

VARIANTS = ("default", "adaptive", "kv-model", "context-only")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="also profile plain sampling and stage 2 over runs of this many steps")
    a = ap.parse_args()

    from lr_tutorial import pipeline, sampling
    from lr_tutorial.layout import LayoutConfig
    from lr_tutorial.masks import MaskConfig
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
    from lr_tutorial.swap import SwapConfig

    header = machine()
    bundle, prompts, seeds, ref, device = setup(a)
    counter = UNetCounter(bundle._vanilla_unet, bundle.personal_unet)
    base = LRConfig(layout=LayoutConfig(steps=a.steps, guidance=a.guidance), stage2="cached")
    configs = {"default": base,
               "adaptive": replace(base, mask=MaskConfig(adaptive=True)),
               "kv-model": replace(base, kv_device="model"),
               "context-only": replace(base, swap=SwapConfig(mode="context"))}
    runners = {v: LayoutAndRetouch(bundle, c) for v, c in configs.items()}
    spent = {}  # seconds and rows inside retouch during the current call
    inner = pipeline.retouch

    def timed_retouch(*args, **kwargs):
        sync()
        t0, r0 = time.perf_counter(), counter.rows
        try:
            if "profile" in spent:  # --profile-steps: this call under torch.profiler
                with profiled() as prof:
                    out = inner(*args, **kwargs)
                spent["profile"] = prof
                return out
            return inner(*args, **kwargs)
        finally:
            sync()
            spent["s"], spent["rows"] = time.perf_counter() - t0, counter.rows - r0
    pipeline.retouch = timed_retouch

    def plain(n_images=a.images, steps=a.steps):
        sync()
        t0 = time.perf_counter()
        with bundle.using(bundle.personal_mode):
            sampling.sample(bundle, prompts[:n_images], seeds[:n_images], steps=steps,
                            guidance=a.guidance)
        sync()
        return time.perf_counter() - t0

    plain()
    for v in VARIANTS:  # warm-up: each runner's reference inversion and key/value caches
        runners[v](prompts, ref, seed=seeds)
    times = {v: [] for v in VARIANTS}
    plain_t, rows, steps2 = [], {}, {}
    for r in range(a.reps):
        plain_t.append(plain())
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            res = runners[v](prompts, ref, seed=seeds)
            times[v].append(spent["s"])
            rows[v], steps2[v] = spent["rows"], len(res.target.timesteps)
    plain_step = median(plain_t) / a.steps
    print(f"# {a.backend}: stage 2 (cached, reference already cached) of {a.images} images, "
          f"{a.steps} DDIM steps, CFG {a.guidance}, {device}, {bundle.dtype}, latent "
          f"{bundle.latent_size}{'; LoRA merged (--fuse-lora)' if a.fuse_lora else ''}")
    print(f"# {header}")
    print(f"# {a.reps} interleaved repetitions; plain personalized sampling (no decode): "
          f"{median(plain_t):.3f} s, {plain_step * 1000:.1f} ms per step")
    print(f"{'variant':<14}{'stage 2 s':>10}{'steps':>7}{'ms/step':>9}{'x plain step':>14}"
          f"{'rows/step':>11}")
    for v in VARIANTS:
        per = median(times[v]) / steps2[v]
        print(f"{v:<14}{median(times[v]):>10.3f}{steps2[v]:>7}{per * 1000:>9.1f}"
              f"{per / plain_step:>14.2f}{rows[v] / steps2[v]:>11.1f}")

    sizes = [b for b in (1, 2, 4, 8, 16) if b <= a.images]
    probe = 10
    for b in sizes:  # warm-up at each batch size
        plain(b, probe)
    ms = {b: median([plain(b, probe) for _ in range(2)]) / probe * 1000 for b in sizes}
    print("# plain sampling, ms per step by images per call (rows = 2 x images under CFG): "
          + ", ".join(f"{b}: {ms[b]:.1f}" for b in sizes))

    if a.profile_steps:
        k = a.profile_steps
        short = LayoutAndRetouch(bundle, replace(base, layout=LayoutConfig(
            steps=k, guidance=a.guidance)))
        short(prompts, ref, seed=seeds)  # warm-up: reference work, shapes
        with profiled() as prof:
            plain(a.images, k)
        report("plain sampling", prof, k)
        spent["profile"] = None
        res = short(prompts, ref, seed=seeds)
        report("stage 2 (cached, default)", spent.pop("profile"), len(res.target.timesteps))


@contextlib.contextmanager
def profiled():
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        yield prof
        sync()


def report(what, prof, steps):
    """Busy time per step: the CPU's (self time of every op, profiler overhead included) and
    the GPU's (sum of kernel times); the top 8 ops by each."""
    from torch.autograd import DeviceType
    ev = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in ev) / 1000 / steps
    # the device's own events only (kernels, copies), as the table's "Self CUDA time total":
    # the aten ops that launched them carry the same time again
    gpu = sum(e.self_device_time_total for e in ev if e.device_type == DeviceType.CUDA
              ) / 1000 / steps
    print(f"# profile of {what}, {steps} steps: CPU {cpu:.1f} ms/step (profiled), GPU busy "
          f"{gpu:.1f} ms/step")
    for key in ("self_cpu_time_total",) + (("self_device_time_total",)
                                            if torch.cuda.is_available() else ()):
        print(ev.table(sort_by=key, row_limit=8, max_name_column_width=50))


if __name__ == "__main__":
    main()
