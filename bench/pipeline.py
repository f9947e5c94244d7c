"""Per-image cost of Layout-and-Retouch against plain personalized sampling, from one run.

    python bench/pipeline.py --backend toy                                   # toy models, CPU
    python bench/pipeline.py --backend sd15-random --latent 16 --steps 10 --images 2   # CPU
    python bench/pipeline.py --backend sd15-random          # on a GPU: fp16, 512 px, 50 steps
    python bench/pipeline.py --backend toy --profile torch   # where each engine's time goes

sd15-random is Stable Diffusion 1.5's real UNet/VAE architecture (and CLIP ViT-L's text-encoder
shape) with random weights and a random rank-4 LoRA: no download, real cost.

For `--images` prompts x seeds sharing one reference, with the same steps and guidance, it runs
(a) plain personalized sampling (+ decode), (b) stage 1 only (step-blended layout + decode),
(c) the full method on the fast engine (LRConfig(engine="fast"): the reference inversion riding
stage 1's UNet calls, stage 2 on the target rows reading cached keys/values),
(d) the full method on the reference engine (LRConfig(engine="reference"), the default: the
plain inversion, three branches per stage-2 call, one reference row for all targets),
(c') the fast engine with a LayoutAndRetouch kept across runs, so its reference work
(inversion and keys/values) is already done, (c*) (c) with LRConfig(reference_inversion=
"start"): the reference inverted only to the target's first step, and reports (e) stage 2 alone
(retouch + final decode, timed inside (c) and (d)). Each run of (c) and (d) starts from a fresh
LayoutAndRetouch, so it pays the reference work once for its images: the reference's DDIM
inversion (on the fast engine one more row in stage 1's UNet calls; with a full DreamBooth UNet
its first lambda1 steps run alone: the "reference inversion" phase), which on the fast engine
also records the reference's keys/values (the "reference K/V" phase shows only where a known
reference's keys/values are replayed). The per-image cost amortized over 8 images is
(c') + ((c) - (c')) x images / 8; for (d) the same with its own kept reference inversion.

Timing: the cases are interleaved (the order rotates every repetition) and each ratio to (a) is
the median of the per-repetition ratios, so a load that drifts during the run (another job on
the CPU) hits numerator and denominator alike. UNet rows (batch rows through the UNet, counted
by a forward hook) are exact and machine-independent.

Memory: on a GPU, torch.cuda.max_memory_allocated per case (absolute peak, weights included).
On a CPU, each case runs twice more in a fresh process and the second run reports its peak RSS
growth (VmHWM, reset before the run, minus the RSS before it; glibc's mmap threshold is pinned
in those processes so freed tensors are returned to the OS and the peak is the run's own). The
timed runs keep glibc's default allocator behaviour, as a user's process has it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Phases, UNetCounter, exact_malloc_env, machine, median,  # noqa: E402
                    peak_rss_bytes, reset_peak_rss, rss_bytes, sd15_random, sync, timed)

import numpy as np  # noqa: E402
import torch  # noqa: E402

CASES = ("plain", "stage1", "fast", "reference", "warm", "reference_warm", "start")
LABELS = {"plain": "(a) plain personalized", "stage1": "(b) stage 1 only",
          "fast": "(c) L&R, fast engine", "reference": "(d) L&R, reference engine",
          "warm": "(c') fast engine, reference already inverted",
          "reference_warm": "(d') reference engine, reference already inverted",
          "start": "(c*) (c), inversion stopped at the start"}
WARM = {"fast": "warm", "reference": "reference_warm", "start": "warm"}  # amortized over 8
PHASES = ("reference inversion", "reference K/V", "stage 1", "masks", "stage 2", "final decode")


def setup(a):
    from lr_tutorial import load_models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.backend == "toy":
        bundle = load_models("toy", device=device)
        prompts = ["a sks star on the left in the snow", "a sks star at the top at night",
                   "a small sks star on the right on the beach", "a sks star at the bottom"]
        ref = None  # the toy subject's reference photos
    else:
        latent = a.latent or (64 if device == "cuda" else 16)
        bundle = sd15_random(latent, device, torch.float16 if device == "cuda" else torch.float32)
        prompts = ["a sks dog on the beach", "a photo of a sks dog", "a sks dog in the snow",
                   "a red sks dog"]
        ref = (np.random.default_rng(0).random((1, latent * 8, latent * 8, 3)) * 255).astype(np.uint8)
    if a.fuse_lora:  # every case, plain sampling included, runs the merged LoRA
        bundle.set_fuse_lora(True)
    prompts = [prompts[i % len(prompts)] for i in range(a.images)]
    seeds = [i // len(set(prompts)) for i in range(a.images)]  # prompts x seeds
    return bundle, prompts, seeds, ref, device


def make_cases(a, bundle, prompts, seeds, ref):
    from lr_tutorial import sampling
    from lr_tutorial.layout import LayoutConfig, step_blended
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig

    layout = LayoutConfig(steps=a.steps, guidance=a.guidance)
    chunks = [(prompts[i:i + a.batch], seeds[i:i + a.batch]) for i in range(0, len(prompts), a.batch)]
    mode = "personalized" if bundle.has_personal else "vanilla"

    def plain():
        with bundle.using(mode):
            for p, s in chunks:
                z, _ = sampling.sample(bundle, p, s, steps=a.steps, guidance=a.guidance)
                sampling.decode(bundle, z)

    def stage1():
        for p, s in chunks:
            step_blended(bundle, p, s, layout)

    def config(engine, inversion="full"):
        fast = dict(kv_device=a.kv_device, kv_store=a.kv_store) if engine == "fast" else {}
        return LRConfig(layout=layout, engine=engine, reference_inversion=inversion, **fast)

    def full(engine, inversion="full"):
        def run():  # fresh: pays the reference work
            lr = LayoutAndRetouch(bundle, config(engine, inversion))
            for p, s in chunks:
                lr(p, ref, seed=s)
        return run

    held = {}

    def warm(engine):
        def run():  # one LayoutAndRetouch kept across runs: its reference work is already done
            if engine not in held:  # (the first run, a warm-up, fills its caches)
                held[engine] = LayoutAndRetouch(bundle, config(engine))
            for p, s in chunks:
                held[engine](p, ref, seed=s)
        return run

    return {"plain": plain, "stage1": stage1, "fast": full("fast"), "reference": full("reference"),
            "warm": warm("fast"), "reference_warm": warm("reference"),
            "start": full("fast", "start")}


def instrument(counter):
    """Time the phases of both engines' calls by wrapping the functions they call."""
    from lr_tutorial import masks, pipeline, sampling
    from lr_tutorial.fast import pipeline as fast
    from lr_tutorial.fast import riding
    ph = Phases(counter)
    ph.wrap(pipeline, "invert_reference", "reference inversion")
    # the fast engine's inversion steps that run alone (none with a LoRA: they all ride stage 1)
    ph.wrap(riding.Inversion, "step_alone", "reference inversion")
    ph.wrap(fast, "reference_kv", "reference K/V")
    ph.wrap(pipeline, "step_blended", "stage 1")  # includes the x^c decode
    ph.wrap(fast, "step_blended_riding", "stage 1")
    for module in (pipeline, fast):
        ph.wrap(module, "aggregate", "masks")
        ph.wrap(module, "retouch", "stage 2")
    ph.wrap(masks, "subject_mask", "masks")
    ph.wrap(fast, "retouch_cached", "stage 2")
    ph.wrap(sampling, "decode", "final decode")  # outermost calls only: the final decode
    return ph


def memory_case(a) -> None:
    """--memory-case NAME: in this fresh process, run one case twice (the first run takes the
    one-time allocations: thread pools, lazy buffers) and print the second run's peak RSS
    growth."""
    bundle, prompts, seeds, ref, device = setup(a)
    fn = make_cases(a, bundle, prompts, seeds, ref)[a.memory_case]
    fn()
    before = rss_bytes()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): use --no-memory")
    fn()
    out = {"peak": peak_rss_bytes() - before}
    print("MEMORY " + json.dumps(out))


def memory(a, device, cases) -> dict[str, int]:
    if device == "cuda":  # in-process: the allocator's own peak
        out = {}
        for name, fn in cases.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            out[name] = torch.cuda.max_memory_allocated()
        return out
    out = {}
    for name in cases:
        args = [sys.executable, __file__, "--memory-case", name, "--backend", a.backend,
                "--steps", str(a.steps), "--images", str(a.images), "--batch", str(a.batch),
                "--guidance", str(a.guidance), "--kv-device", a.kv_device,
                "--kv-store", a.kv_store] \
            + (["--latent", str(a.latent)] if a.latent else []) \
            + (["--fuse-lora"] if a.fuse_lora else [])
        res = subprocess.run(args, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("MEMORY ")]
        if not line:
            raise RuntimeError(f"memory run of {name} failed:\n{res.stderr[-2000:]}")
        out[name] = json.loads(line[0][7:])["peak"]
    return out


def profile(a, cases) -> None:
    """--profile: one run of each engine (the reference: three branches per stage-2 UNet call;
    the fast: the target alone), each under a profiler; the top entries by
    self time. torch: aten ops (self CPU time); cprofile: Python functions (tottime)."""
    for name, when in (("reference", "reference engine"), ("fast", "fast engine")):
        print(f"\n## {when}: {LABELS[name]} ({a.images} images, {a.steps} steps, "
              f"reference inversion included), top {a.profile_top} by self time, {a.profile}")
        if a.profile == "torch":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile
            acts = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(ProfilerActivity.CUDA)
            with torch_profile(activities=acts) as prof:
                cases[name]()
                sync()
            table = prof.key_averages().table
            print(table(sort_by="self_cpu_time_total", row_limit=a.profile_top,
                        max_name_column_width=60))
            if torch.cuda.is_available():  # where the GPU's time goes
                print(f"\n## {when}: top {a.profile_top} by self GPU time")
                print(table(sort_by="self_device_time_total", row_limit=a.profile_top,
                            max_name_column_width=60))
        else:
            import cProfile
            import io
            import pstats
            pr = cProfile.Profile()
            pr.runcall(cases[name])
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(a.profile_top)
            text = out.getvalue()
            print(text[text.find("   ncalls"):].rstrip())  # the table, without pstats' preamble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=8, help="prompts x seeds sharing a reference")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default: all)")
    ap.add_argument("--latent", type=int, default=None,
                    help="sd15-random: latent side (default 64 = 512 px on a GPU, 16 on a CPU)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--fuse-lora", action="store_true",
                    help="merge the LoRA into the UNet weights while personalized "
                         "(ModelBundle.set_fuse_lora), in every case")
    ap.add_argument("--kv-device", choices=("auto", "host", "model"), default="auto",
                    help="LRConfig.kv_device of the fast engine: where the key/value caches live")
    ap.add_argument("--kv-store", choices=("auto", "kv", "hidden"), default="auto",
                    help="LRConfig.kv_store of the fast engine: keys/values or layer inputs")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--profile", choices=("torch", "cprofile"), default=None,
                    help="instead of timing: profile one run of (d), the reference engine, and "
                         "(c), the fast engine, with torch.profiler or cProfile; top entries")
    ap.add_argument("--profile-top", type=int, default=10, help="entries per profile table")
    ap.add_argument("--memory-case", choices=CASES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.batch = a.batch or a.images
    if a.memory_case:  # only the memory processes pin glibc's mmap threshold: timed under it,
        exact_malloc_env()  # every large tensor is a fresh mmap + page faults (up to 1.7x slower
        return memory_case(a)  # stage 1 with K/V recording), which no user run pays
    if a.profile:
        bundle, prompts, seeds, ref, device = setup(a)
        cases = make_cases(a, bundle, prompts, seeds, ref)
        print(f"# profile, {a.backend}: {a.images} images, {a.steps} steps, {device}; {machine()}")
        cases["plain"]()  # warm-up (allocator, lazy inits)
        return profile(a, cases)

    header = machine()
    bundle, prompts, seeds, ref, device = setup(a)
    counter = UNetCounter(bundle._vanilla_unet, bundle.personal_unet)
    cases = make_cases(a, bundle, prompts, seeds, ref)
    phases = instrument(counter)
    cases["plain"]()  # warm-up (allocator, lazy inits)
    # fills the kept LayoutAndRetouch's reference caches; timed: the process's first cached
    # run, which also allocates (on a GPU: pins) the host memory every later run reuses
    first_s, _ = timed(cases["warm"], counter)
    cases["reference_warm"]()  # inverts the reference engine's kept reference

    times = {c: [] for c in CASES}
    rows: dict[str, int] = {}
    ph_time = {c: {} for c in ("fast", "reference")}
    ph_rows = {c: {} for c in ("fast", "reference")}
    t_start = time.perf_counter()
    for r in range(a.reps):
        order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
        for c in order:
            phases.reset()
            t, n = timed(cases[c], counter)
            times[c].append(t)
            rows[c] = n
            if c in ph_time:
                for k, v in phases.time.items():
                    ph_time[c].setdefault(k, []).append(v)
                ph_rows[c] = dict(phases.rows)
    total_wall = time.perf_counter() - t_start
    mem = {} if a.no_memory else memory(a, device, cases)

    n = a.images
    ratio = {c: median([t / p for t, p in zip(times[c], times["plain"])]) for c in CASES}
    per = {c: median(times[c]) / n for c in CASES}
    base_rows = rows["plain"] / n

    def line(label, s, r, tr):
        print(f"{label:<50}{s:>9.3f}{r:>12.1f}{tr:>10.2f}{r / base_rows:>10.2f}")

    print(f"# {a.backend}: {n} images ({len(set(prompts))} prompts x {len(set(seeds))} seeds) "
          f"sharing one reference, {a.batch} per call, {a.steps} DDIM steps, CFG {a.guidance}, "
          f"{device}, {bundle.dtype}, latent {bundle.latent_size}, kv_device {a.kv_device}, "
          f"kv_store {a.kv_store}"
          f"{', LoRA merged (--fuse-lora)' if a.fuse_lora else ''}")
    print(f"# {header}")
    print(f"# {a.reps} interleaved repetitions in {total_wall:.0f} s; s/image = median; "
          "time ratio = median of per-repetition ratios to (a)")
    print(f"{'case':<50}{'s/image':>9}{'rows/image':>12}{'time x(a)':>10}{'rows x(a)':>10}")
    for c in CASES:
        line(LABELS[c] + (f", over {n}" if c in ("fast", "reference", "start") else ""),
             per[c], rows[c] / n, ratio[c])
    print(f"{'    first cached run in this process (warm-up)':<50}{first_s / n:>9.3f}"
          f"{'':>12}{first_s / median(times['plain']):>10.2f}   (its host caches allocated"
          f"{', pinned' if device == 'cuda' else ''}: later runs reuse them)")
    for c in ("fast", "reference"):  # (e) and the one-time reference work, from the phases
        pt = {k: median(v) for k, v in ph_time[c].items()}
        pr = ph_rows[c]
        plain_t = median(times["plain"])
        s2 = [a_ + b_ for a_, b_ in zip(ph_time[c].get("stage 2", []), ph_time[c].get("final decode", []))]
        s2_ratio = median([x / p for x, p in zip(s2, times["plain"])])
        line(f"(e) stage 2 alone ({c} engine: retouch + decode)",
             median(s2) / n, (pr.get("stage 2", 0) + pr.get("final decode", 0)) / n, s2_ratio)
        # the one-time reference work = (c) - (c'), measured, spread over 8 images
        for cc in ((c, "start") if c == "fast" else (c,)):
            w = WARM[cc]
            ref_s, ref_r = per[cc] - per[w], (rows[cc] - rows[w]) / n  # per image
            line(f"    {LABELS[cc][:4]} {cc}: amortized over 8 images", per[w] + ref_s * n / 8,
                 rows[w] / n + ref_r * n / 8, ratio[w] + (ratio[cc] - ratio[w]) * n / 8)
        print(f"    {c} phases (s per run of {n} images / UNet rows / share of plain's time):")
        for k in PHASES:
            if k in pt:
                print(f"      {k:<22}{pt[k]:>8.3f} s{pr.get(k, 0):>8} rows{pt[k] / plain_t:>8.2f}x")
        other = median(times[c]) - sum(pt.values())
        print(f"      {'other (text, checks)':<22}{other:>8.3f} s")
    if mem:
        what = ("peak allocated on the GPU (weights included)" if device == "cuda" else
                "peak RSS growth over the models, fresh process per case")
        print(f"# memory, {what}:")
        for c in CASES:
            print(f"{LABELS[c]:<40}{mem[c] / 2**20:>10.1f} MiB{mem[c] / max(mem['plain'], 1):>8.2f}x(a)")


if __name__ == "__main__":
    main()
