"""How often each case makes the CPU wait for the GPU, counted exactly, and where.

    python bench/syncs.py                          # on a GPU: the toy models, 10 steps, 2 images
    python bench/syncs.py --backend sd15-random    # SD 1.5's architecture (random weights)

On a GPU as fast as an H200 a step's Python work takes about as long as its kernels, so every
wait leaves the GPU idle until Python catches up (bench/HISTORY.md, session 12). This counts the
synchronising operations torch reports under `torch.cuda.set_sync_debug_mode("warn")` (blocking
copies between host and GPU, `.item()`, `nonzero`, ...), per case and per denoising step, and
lists the lines of code they come from. The count is exact and the same on any GPU, like the
UNet rows of bench/pipeline.py. The intended waits, one `sampling.settle` per loop (a stream's
`synchronize`), may be counted too, depending on the torch version; they show up as their own
line in the list of sites.

Cases: (a) plain personalized sampling, (b) stage 1, (c) the full method with the cached stage 2
and the reference already cached, (d) with the batched stage 2. Each case runs once untimed
first (one-time work: caches, the reference's inversion), then once counted.
"""
from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, small_workload  # noqa: E402

import torch  # noqa: E402


def cases(bundle, prompts, seeds, ref, steps):
    from lr_tutorial import sampling
    from lr_tutorial.layout import LayoutConfig, step_blended
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig

    layout = LayoutConfig(steps=steps)
    cached = LayoutAndRetouch(bundle, LRConfig(layout=layout, stage2="cached"))
    batched = LayoutAndRetouch(bundle, LRConfig(layout=layout, stage2="batched"))

    def plain():
        with bundle.using(bundle.personal_mode):
            z, _ = sampling.sample(bundle, prompts, seeds, steps=steps)
            sampling.decode(bundle, z)

    return {"(a) plain personalized": plain,
            "(b) stage 1 only": lambda: step_blended(bundle, prompts, seeds, layout),
            "(c) L&R, cached stage 2 (reference cached)": lambda: cached(prompts, ref, seed=seeds),
            "(d) L&R, batched stage 2": lambda: batched(prompts, ref, seed=seeds)}


def count(fn) -> collections.Counter:
    """Synchronising operations during fn(), by the line of Python that issued them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = collections.Counter()
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--latent", type=int, default=16, help="sd15-random: latent side")
    ap.add_argument("--top", type=int, default=8, help="sites listed per case")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/syncs.py counts waits for a GPU: it needs CUDA (none here)")
    bundle, prompts, seeds, ref = small_workload(a.backend, "cuda", torch.float16, a.latent,
                                                 a.images)
    print(f"# {a.backend}: {a.images} images, {a.steps} steps, {bundle.dtype}; {machine()}")
    print(f"{'case':<46}{'waits':>8}{'per step':>10}")
    for name, fn in cases(bundle, prompts, seeds, ref, a.steps).items():
        fn()  # one-time work first (the reference's inversion and keys/values, caches)
        sites = count(fn)
        total = sum(sites.values())
        print(f"{name:<46}{total:>8}{total / a.steps:>10.1f}")
        for site, n in sites.most_common(a.top):
            print(f"    {n:>6}  {site}")


if __name__ == "__main__":
    main()
