"""Why stage 1 runs slower inside bench/pipeline.py's (c) than on its own, on a CPU.

    python bench/allocator.py            # one LayoutAndRetouch kept across runs
    python bench/allocator.py --fresh    # a fresh one per run, as bench/pipeline.py's (c) makes
    python bench/allocator.py --slabs    # fresh runs: caches in slabs (now) against views (before)
    MALLOC_TRIM_THRESHOLD_=8589934592 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TOP_PAD_=268435456 \
        python bench/allocator.py --fresh   # glibc told not to hand memory back to the OS

Toy backend, 8 images (`--images`), 50 steps, the cached stage 2. Interleaves bare stage 1
(layout.step_blended, no extras) with the full method and prints, per repetition, bare stage
1's seconds, the full method's stage 1 (its step_blended call, timed by common.Phases) and the
full method's total. With a fresh LayoutAndRetouch per run each call records its key/value
caches anew and frees the last call's (about 180 MiB of tensors); if bare stage 1 then slows
down too, what costs is the allocator's state, not the method's work (bench/HISTORY.md,
session 22).

--slabs (session 24): fresh runs only, alternating (the order flips every repetition) between
the CPU caches as they are kept now, each entry copied into a 256 MiB slab (KVCache._keep), and
as before session 24, each entry a view of the UNet's own key/value tensor, left where glibc put
it among the freed activations (for those runs KVCache._keep is pointed at that). Prints each
run's stage 1 and total seconds and minor page faults (getrusage), the medians, and the
per-pair ratio of the totals.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Phases, UNetCounter, machine, median  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fresh", action="store_true", help="a fresh LayoutAndRetouch per run")
    ap.add_argument("--slabs", action="store_true",
                    help="fresh runs, the caches in slabs against views (before session 24)")
    ap.add_argument("--images", type=int, default=8, choices=range(1, 9), metavar="1..8",
                    help="prompts x seeds per call (default 8)")
    ap.add_argument("--fuse-lora", action="store_true",
                    help="the LoRA merged while personalized, as `generate` runs it")
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args()
    from lr_tutorial import load_models, pipeline
    from lr_tutorial.layout import LayoutConfig, step_blended
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig

    header = machine()
    bundle = load_models("toy")
    prompts = ["a sks star on the left in the snow", "a sks star at the top at night",
               "a small sks star on the right on the beach", "a sks star at the bottom"] * 2
    seeds = [0] * 4 + [1] * 4
    prompts, seeds = prompts[:a.images], seeds[:a.images]
    bundle.set_fuse_lora(a.fuse_lora)
    layout = LayoutConfig(steps=50, guidance=7.5)
    phases = Phases(UNetCounter(bundle._vanilla_unet, bundle.personal_unet))
    phases.wrap(pipeline, "step_blended", "stage 1")

    def make():
        return LayoutAndRetouch(bundle, LRConfig(layout=layout, stage2="cached"))

    kept = make()
    kept(prompts, seed=seeds)  # warm-up: caches, lazy inits
    if a.slabs:
        return compare_slabs(a, header, make, phases, prompts, seeds)
    out = {"bare stage 1": [], "stage 1 in the method": [], "the method": []}
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step_blended(bundle, prompts, seeds, layout)
        out["bare stage 1"].append(time.perf_counter() - t0)
        lr = make() if a.fresh else kept
        phases.reset()
        t0 = time.perf_counter()
        lr(prompts, seed=seeds)
        out["the method"].append(time.perf_counter() - t0)
        out["stage 1 in the method"].append(phases.time["stage 1"])
        del lr
    print(f"# toy, {a.images} images, 50 steps{', LoRA merged' if a.fuse_lora else ''}; "
          f"{'a fresh' if a.fresh else 'one kept'} LayoutAndRetouch; "
          f"{a.reps} interleaved repetitions, seconds")
    print(f"# {header}")
    for k, v in out.items():
        print(f"{k:<24}" + "".join(f"{x:>7.2f}" for x in v) + f"   median {median(v):.2f}")


def compare_slabs(a, header, make, phases, prompts, seeds) -> None:
    import resource

    from lr_tutorial import kv

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def as_view(self, x):  # KVCache._keep on a CPU before session 24: x itself, no copy
        x = x.detach()
        return x.to(x.device, self.dtype or x.dtype)
    keeps = {"slabs": kv.KVCache._keep, "views": as_view}
    out = {name: [] for name in keeps}
    try:
        for r in range(a.reps):
            for name in (("slabs", "views") if r % 2 == 0 else ("views", "slabs")):
                kv.KVCache._keep = keeps[name]
                lr = make()
                phases.reset()
                f0, t0 = faults(), time.perf_counter()
                lr(prompts, seed=seeds)
                out[name].append((phases.time["stage 1"], time.perf_counter() - t0,
                                  faults() - f0))
                del lr
    finally:
        kv.KVCache._keep = keeps["slabs"]
    print(f"# toy, {a.images} images, 50 steps{', LoRA merged' if a.fuse_lora else ''}; "
          "a fresh LayoutAndRetouch per run; the CPU caches in "
          f"slabs (now) or views (before session 24); {a.reps} interleaved pairs")
    print(f"# {header}")
    print(f"{'caches':<8}{'stage 1 s':>11}{'total s':>10}{'minor faults':>14}")
    for name, runs in out.items():
        for s1, tot, flt in runs:
            print(f"{name:<8}{s1:>11.2f}{tot:>10.2f}{flt:>14d}")
    for name, runs in out.items():
        print(f"{name:<8}{median([x[0] for x in runs]):>11.2f}"
              f"{median([x[1] for x in runs]):>10.2f}{int(median([x[2] for x in runs])):>14d}"
              "   median")
    ratios = [s[1] / v[1] for s, v in zip(out["slabs"], out["views"])]
    print("total, slabs / views per pair: " + " ".join(f"{x:.3f}" for x in ratios)
          + f"; median {median(ratios):.3f}")


if __name__ == "__main__":
    main()
