"""What one Layout-and-Retouch call spends switching models and attention processors, from one run.

    python bench/switch.py --backend toy                       # toy models, CPU
    python bench/switch.py --backend sd15-random                # on a GPU: SD 1.5, fp16, 512 px
    python bench/switch.py --backend sd15-random --latent 8     # CPU smoke run

A call of the full method (one image, cached stage 2, the LoRA merged: `--fuse-lora` in
bench/pipeline.py, the default of `python -m lr_tutorial generate`) switches the bundle between
vanilla and personalized (ModelBundle.using) and installs and restores attention processors
(attention.processors: the capture, key/value recording and swap) several times. This counts
both in one call, then times one of each, interleaved (the order rotates every repetition),
the way the library does it now and the way it did before session 24:

- mode now:     `with bundle.using("personalized"): pass` from vanilla: the merged weights
                W + s B A, computed once and kept, copied in, and W copied back
                (ModelBundle._merge);
- mode before:  the same round trip with the merge recomputed every time, as _merge/_unmerge did:
                each LoRA layer's W cloned, peft's `merge` (W += s B A), then `unmerge` and the
                clone copied back;
- procs now:    attention.processors(unet, {the swap's layers}) in and out: each module's own
                `Attention.set_processor`;
- procs before: the same through `unet.set_attn_processor(dict)` in and out, which walks every
                module of the UNet each time.

Prints ms per switch, and ms per call (x the counts: one of the call's `using` blocks enters
vanilla, which costs less than the round trip timed here) against the call's own wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, sd15_random, sync  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

CASES = ("mode now", "mode before", "procs now", "procs before")


def setup(a):
    from lr_tutorial import load_models
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.backend == "toy":
        bundle, ref, prompt = load_models("toy", device=device), None, "a sks star in the snow"
    else:
        latent = a.latent or (64 if device == "cuda" else 8)
        bundle = sd15_random(latent, device, torch.float16 if device == "cuda" else torch.float32)
        ref = (np.random.default_rng(0).random((1, latent * 8, latent * 8, 3)) * 255).astype(np.uint8)
        prompt = "a sks dog on the beach"
    bundle.set_fuse_lora(True)
    return bundle, ref, prompt, device


def count_switches(bundle, run):
    """(mode switches, processor installs) in one run(): ModelBundle._apply and
    attention.processors calls, counted by wrapping them for this run only."""
    from lr_tutorial import attention, swap
    from lr_tutorial.models import ModelBundle
    counts = {"mode": 0, "procs": 0}
    apply, procs = ModelBundle._apply, attention.processors  # swap.py imports it by name

    def counted_apply(self, mode):
        counts["mode"] += 1
        return apply(self, mode)

    def counted_procs(*args, **kwargs):
        counts["procs"] += 1
        return procs(*args, **kwargs)
    ModelBundle._apply = counted_apply
    attention.processors = swap.processors = counted_procs
    try:
        run()
    finally:
        ModelBundle._apply = apply
        attention.processors = swap.processors = procs
    return counts["mode"] // 2, counts["procs"]  # using() applies twice: enter and exit


def mode_before(bundle):
    """The personalized round trip as before session 24 (bundle vanilla, fuse_lora on)."""
    name = bundle.adapter_name
    layers = bundle._peft_layers()
    with torch.no_grad():
        saved = []
        for layer in layers:  # _lora_switch(True): adapters on, then _merge
            layer.enable_adapters(True)
        for layer in layers:
            weight = layer.get_base_layer().weight
            saved.append((layer, weight, weight.detach().clone()))
            layer.merge(adapter_names=[name])
        for layer, weight, w0 in saved:  # _lora_switch(False): _unmerge, adapters off
            layer.unmerge()
            weight.copy_(w0)
        for layer in layers:
            layer.enable_adapters(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--latent", type=int, default=None,
                    help="sd15-random: latent side (default 64 on a GPU, 8 on a CPU)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    ap.add_argument("--iters", type=int, default=5, help="switches per timing")
    a = ap.parse_args()

    from lr_tutorial import attention, swap
    from lr_tutorial.layout import LayoutConfig
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig

    header = machine()
    bundle, ref, prompt, device = setup(a)
    cfg = LRConfig(layout=LayoutConfig(steps=a.steps))

    def full():
        LayoutAndRetouch(bundle, cfg)([prompt], ref, seed=[0])
    full()  # warm-up: the first merge, lazy inits
    n_mode, n_procs = count_switches(bundle, full)
    walls = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        full()
        sync()
        walls.append(time.perf_counter() - t0)
    wall = median(walls)

    unet = bundle.unet
    ctl = swap.SwapController(unet, swap.SwapConfig(), a.steps)
    paths = sorted(ctl.structure | ctl.retouch)
    originals = attention.current_processors(unet)
    procs = {p: swap.SwapProcessor(ctl, p, originals[p + ".processor"]) for p in paths}

    def mode_now():
        with bundle.using("personalized"):
            pass

    def procs_now():
        with attention.processors(unet, procs):
            pass

    def procs_before():
        new = dict(originals)
        new.update({p + ".processor": proc for p, proc in procs.items()})
        unet.set_attn_processor(new)
        unet.set_attn_processor(dict(originals))

    fns = {"mode now": mode_now, "mode before": lambda: mode_before(bundle),
           "procs now": procs_now, "procs before": procs_before}
    with bundle.using("vanilla"):
        for fn in fns.values():
            fn()
        mode_now()  # "mode before" wrote W: the kept merge is made again here, untimed
        times = {c: [] for c in CASES}
        for r in range(a.reps):
            for c in CASES[r % len(CASES):] + CASES[:r % len(CASES)]:
                sync()
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    fns[c]()
                sync()
                times[c].append((time.perf_counter() - t0) / a.iters * 1000)
                if c == "mode before":  # its writes to W look like a changed base weight to
                    mode_now()  # the kept merge: redo it here, untimed, as a user's run would
    assert attention.current_processors(unet) == originals

    print(f"# {a.backend}: one image, {a.steps} DDIM steps, {device}, {bundle.dtype}, "
          f"LoRA merged (fuse_lora), {len(bundle._peft_layers())} LoRA layers, "
          f"{len(originals)} attention layers, the swap's {len(paths)}")
    print(f"# {header}")
    print(f"# one Layout-and-Retouch call: {wall:.3f} s wall, {n_mode} mode switches "
          f"(bundle.using blocks), {n_procs} processor installs; {a.reps} interleaved "
          f"repetitions of {a.iters}, ms = median")
    print(f"{'case':<14}{'ms each':>10}{'x per call':>12}{'ms per call':>13}{'share of call':>15}")
    for c in CASES:
        n = n_mode if c.startswith("mode") else n_procs
        ms = median(times[c])
        print(f"{c:<14}{ms:>10.2f}{n:>12}{ms * n:>13.1f}{ms * n / 1000 / wall:>14.1%}")
    saved = sum((median(times[f"{k} before"]) - median(times[f"{k} now"]))
                * (n_mode if k == "mode" else n_procs) for k in ("mode", "procs"))
    print(f"saved per call: {saved:.1f} ms ({saved / 1000 / wall:.1%} of the call now)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
