"""Where the cached stage 2's extra time goes, per denoising step, from one run.

    python bench/stage2.py --backend sd15-random          # on a GPU: fp16, 512 px, 50 steps, 8 images
    python bench/stage2.py --backend toy                  # toy models, CPU
    python bench/stage2.py --backend sd15-random --latent 8 --steps 8 --images 2   # CPU smoke run

The cached stage 2 runs as many rows per UNet call as plain sampling (the B target rows, x2
under CFG), yet on an H200 its steps cost more than plain sampling's (bench/README.md). This
times stage 2 (retouch.retouch, inside LayoutAndRetouch with the reference already cached) per
step, as a ratio to a plain personalized step (same rows), with the settings that add work
switched off one at a time:

- default:      LRConfig() as shipped (stage2="cached");
- no-adaptive:  MaskConfig(adaptive=False): the target mask is not recomputed from the target's
                cross-attention at every step (no read of the maps on the host per step);
- kv-model:     LRConfig(kv_device="model"): the caches stay on the GPU (no host copies);
- context-only: SwapConfig(mode="context"): one attention per swapped layer (the context's)
                instead of the masked reference's and the context's.

The last three change the method's work or result: they say what each part costs, not a
setting to use. Cases are interleaved (the order rotates every repetition); UNet rows are exact.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import UNetCounter, machine, median, sync  # noqa: E402
from stage1 import setup  # noqa: E402

import torch  # noqa: E402

VARIANTS = ("default", "no-adaptive", "kv-model", "context-only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--latent", type=int, default=None,
                    help="sd15-random: latent side (default 64 = 512 px on a GPU, 16 on a CPU)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
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
               "no-adaptive": replace(base, mask=MaskConfig(adaptive=False)),
               "kv-model": replace(base, kv_device="model"),
               "context-only": replace(base, swap=SwapConfig(mode="context"))}
    runners = {v: LayoutAndRetouch(bundle, c) for v, c in configs.items()}
    spent = {}  # seconds and rows inside retouch during the current call
    inner = pipeline.retouch

    def timed_retouch(*args, **kwargs):
        sync()
        t0, r0 = time.perf_counter(), counter.rows
        try:
            return inner(*args, **kwargs)
        finally:
            sync()
            spent["s"], spent["rows"] = time.perf_counter() - t0, counter.rows - r0
    pipeline.retouch = timed_retouch

    def plain():
        sync()
        t0 = time.perf_counter()
        with bundle.using(bundle.personal_mode):
            sampling.sample(bundle, prompts, seeds, steps=a.steps, guidance=a.guidance)
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
          f"{bundle.latent_size}")
    print(f"# {header}")
    print(f"# {a.reps} interleaved repetitions; plain personalized sampling (no decode): "
          f"{median(plain_t):.3f} s, {plain_step * 1000:.1f} ms per step")
    print(f"{'variant':<14}{'stage 2 s':>10}{'steps':>7}{'ms/step':>9}{'x plain step':>14}"
          f"{'rows/step':>11}")
    for v in VARIANTS:
        per = median(times[v]) / steps2[v]
        print(f"{v:<14}{median(times[v]):>10.3f}{steps2[v]:>7}{per * 1000:>9.1f}"
              f"{per / plain_step:>14.2f}{rows[v] / steps2[v]:>11.1f}")


if __name__ == "__main__":
    main()
