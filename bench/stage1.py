"""Where stage 1's extra time goes inside the full method, from one run.

    python bench/stage1.py --backend sd15-random          # on a GPU: fp16, 512 px, 50 steps, 8 images
    python bench/stage1.py --backend toy                  # toy models, CPU
    python bench/stage1.py --backend toy --images 1 --reps 5 --fuse-lora   # one image, LoRA merged
    python bench/stage1.py --backend sd15-random --latent 8 --steps 4 --images 2   # CPU smoke run

Inside LayoutAndRetouch stage 1 (the step-blended layout, layout.step_blended) carries three
extras that plain stage 1 does not (bench/HISTORY.md, session 13: 4.17 s against 2.90 s for 8
images on an H200). This times stage 1 (denoising + decode of x^c) with each extra alone and with
all of them, interleaved (the order rotates every repetition), as a median ratio to bare stage 1:

- capture:  the class token's cross-attention at the mask layers (attention.capture), which the
            context masks are made from;
- kv-host:  recording the context's self-attention keys/values at the retouch layers for the
            cached stage 2 (kv.record_kv) into host memory (on a GPU: pinned, side stream);
- kv-model: the same recording kept where it is computed (no copies; LRConfig(kv_device="model"));
- rider:    the reference inversion's row riding stage 1's UNet calls as the method runs it
            (sampling.Inversion, retouch.rideable_steps): with a LoRA every call, the vanilla
            ones through ModelBundle.personal_rows (a hook per LoRA layer), so none of its
            steps runs alone; recording the reference's keys/values for the cached stage 2
            into host memory as it goes (retouch.riding_inversion(kv=...));
- rider-p:  the same, riding the personalized steps' calls only, as before session 23: its first
            lambda1 steps run alone before the timer starts ("alone" column);
- all:      capture + kv-host + rider, as LayoutAndRetouch runs stage 1 with a new reference.

Also prints (a) plain personalized sampling + decode, the unit of bench/pipeline.py, and, for
the rider variants, what riding_inversion's setup took before the timer (the encode, and the
steps that run alone) and the two together as a ratio to bare stage 1 ("+ alone").
UNet rows per case are exact.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import UNetCounter, machine, median, sd15_random, sync  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = ("bare", "capture", "kv-host", "kv-model", "rider", "rider-p", "all", "plain")


def setup(a):
    from lr_tutorial import load_models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.backend == "toy":
        bundle, ref = load_models("toy", device=device), None
        prompts = ["a sks star on the left in the snow", "a sks star at the top at night"]
    else:
        latent = a.latent or (64 if device == "cuda" else 16)
        bundle = sd15_random(latent, device, torch.float16 if device == "cuda" else torch.float32)
        prompts = ["a sks dog on the beach", "a photo of a sks dog"]
        ref = (np.random.default_rng(0).random((1, latent * 8, latent * 8, 3)) * 255
               ).astype(np.uint8)
    if a.fuse_lora:  # every variant, plain sampling included, runs the merged LoRA
        bundle.set_fuse_lora(True)
    prompts = [prompts[i % len(prompts)] for i in range(a.images)]
    return bundle, prompts, list(range(a.images)), ref, device


def make_variants(a, bundle, prompts, seeds, ref):
    """name -> fn() returning the seconds of its timed part (stage 1, or plain sampling)."""
    from lr_tutorial import attention, sampling
    from lr_tutorial.kv import KVCache, record_kv
    from lr_tutorial.layout import LayoutConfig, resolve_steps, step_blended
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
    from lr_tutorial.prompts import check_prompts, token_index
    from lr_tutorial.retouch import (kv_plan, mask_layers, reference_plan, rideable_steps,
                                     riding_inversion)

    cfg = LRConfig(layout=LayoutConfig(steps=a.steps, guidance=a.guidance))
    lr = LayoutAndRetouch(bundle, cfg)
    cfg = lr.resolved_config()
    n, size = cfg.layout.steps, bundle.latent_size
    lambda1 = resolve_steps(cfg.layout.lambda1, n, "lambda1")
    layers, kv_steps = kv_plan(bundle, cfg.swap, n, lr.start_step())
    ref_layers, ref_steps = reference_plan(bundle, cfg.swap, n, lr.start_step())
    cls = check_prompts(bundle, prompts)
    spec = attention.CaptureSpec(layers=mask_layers(bundle.unet, cfg.mask, size), kind="cross",
                                 tokens=[[i] for i in cls])
    _, ref_image, ref_prompt = lr._reference_key(ref)
    ref_idx = token_index(bundle.tokenizer, ref_prompt, bundle.class_noun)
    alone = {"rider": [], "rider-p": [], "all": []}  # seconds of the setup, per rider run

    def stage1(extras, name):
        def run():
            observers, caches = [], []
            with contextlib.ExitStack() as stack:
                rider = None
                if "rider" in extras or "rider-p" in extras:
                    ref_kv = KVCache(ref_layers, ref_steps, store="kv", device="cpu")
                    ride = n - lambda1 if "rider-p" in extras else rideable_steps(bundle, n,
                                                                                  lambda1)
                    sync()
                    t0 = time.perf_counter()
                    rider, _ = stack.enter_context(riding_inversion(
                        bundle, ref_image, ref_prompt, ref_idx, steps=n, mask_cfg=cfg.mask,
                        ride_steps=ride, kv=ref_kv, stop=lr.reference_stop()))
                    sync()
                    alone[name].append(time.perf_counter() - t0)
                    caches.append(ref_kv)  # the inversion's observer: records its row only
                if "capture" in extras:
                    observers.append(stack.enter_context(attention.capture(bundle.unets, spec)))
                for where in ("host", "model"):
                    if f"kv-{where}" in extras:
                        cache = KVCache(layers, kv_steps, store="kv",
                                        device=None if where == "model" else "cpu")
                        observers.append(cache)
                        caches.insert(0, cache)
                if caches:
                    stack.enter_context(record_kv(bundle.unets, *caches))
                sync()
                t0 = time.perf_counter()
                step_blended(bundle, prompts, seeds, cfg.layout, observers=tuple(observers),
                             checked=True, rider=rider)
                sync()
                return time.perf_counter() - t0
        return run

    def plain():
        sync()
        t0 = time.perf_counter()
        with bundle.using(bundle.personal_mode):
            z, _ = sampling.sample(bundle, prompts, seeds, steps=n, guidance=cfg.layout.guidance)
            sampling.decode(bundle, z)
        sync()
        return time.perf_counter() - t0

    all_ = ("capture", "kv-host", "rider")
    out = {"bare": stage1((), "bare"), "plain": plain, "all": stage1(all_, "all")}
    for name in ("capture", "kv-host", "kv-model", "rider", "rider-p"):
        out[name] = stage1((name,), name)
    return {v: out[v] for v in VARIANTS}, alone, len(layers), len(kv_steps)


def parser(doc: str) -> argparse.ArgumentParser:
    """The workload's arguments, shared with bench/stage2.py (which uses `setup` too)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--latent", type=int, default=None,
                    help="sd15-random: latent side (default 64 = 512 px on a GPU, 16 on a CPU)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--fuse-lora", action="store_true",
                    help="merge the LoRA while personalized (ModelBundle.set_fuse_lora), in "
                         "every variant")
    return ap


def main() -> None:
    a = parser(__doc__).parse_args()

    header = machine()
    bundle, prompts, seeds, ref, device = setup(a)
    counter = UNetCounter(bundle._vanilla_unet, bundle.personal_unet)
    variants, alone, n_layers, n_kv = make_variants(a, bundle, prompts, seeds, ref)
    first = {}
    for name, fn in variants.items():  # warm-up: lazy inits, and (kv-host) pinning host memory
        first[name] = fn()
    times = {v: [] for v in VARIANTS}
    rows = {}
    for r in range(a.reps):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            counter.reset()
            times[v].append(variants[v]())
            rows[v] = counter.rows
    bare = times["bare"]
    print(f"# {a.backend}: stage 1 of {a.images} images, {a.steps} DDIM steps, CFG {a.guidance}, "
          f"{device}, {bundle.dtype}, latent {bundle.latent_size}; K/V of {n_layers} layers x "
          f"{n_kv} steps{'; LoRA merged (--fuse-lora)' if a.fuse_lora else ''}")
    print(f"# {header}")
    print(f"# {a.reps} interleaved repetitions; s = median; ratio = median of per-repetition "
          "ratios to bare stage 1")
    print(f"{'variant':<12}{'s':>9}{'x bare':>9}{'rows':>8}{'first run s':>13}"
          f"{'alone s':>9}{'+ alone':>9}")
    for v in VARIANTS:
        ratio = median([t / b for t, b in zip(times[v], bare)])
        line = f"{v:<12}{median(times[v]):>9.3f}{ratio:>9.3f}{rows[v]:>8}{first[v]:>13.3f}"
        if v in alone:  # the setup's runs: the warm-up's first, then one per repetition
            setup_s = alone[v][1:]
            with_alone = median([(t + s) / b for t, s, b in zip(times[v], setup_s, bare)])
            line += f"{median(setup_s):>9.3f}{with_alone:>9.3f}"
        print(line)
    print("alone: riding_inversion's setup before the timer (the encode, and the inversion's "
          "steps that run alone: none for rider with a LoRA, lambda1 for rider-p)")


if __name__ == "__main__":
    main()
