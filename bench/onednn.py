"""oneDNN or torch's own CPU convolutions for the UNet (ModelBundle.set_unet_onednn), from one run.

    python bench/onednn.py                         # the toy models: convolutions, modules, calls
    python bench/onednn.py --sd-latent 16          # also SD 1.5's UNet and VAE (random weights)
    python bench/onednn.py --rows 2,3,4,5,6,8,12,17 --no-calls   # the toy UNet forward by rows
    python bench/onednn.py --call-images 8         # whole calls of 8 images (16-17 rows a call)

On a CPU, torch runs a float32 convolution through oneDNN (torch.backends.mkldnn.enabled, on by
default) or, with the flag off, through its own im2col + GEMM kernels. oneDNN reorders the
weights into its blocked layout on every call: a fixed cost that only large convolutions pay
back. This times, with the flag on and off, interleaved (the order alternates every
repetition; each number is the median over repetitions):

1. every convolution of one toy UNet forward (batch 2: the two CFG rows), each module called
   alone on the input it gets in that forward, summed, and the same for the smallest one;
2. whole modules: the toy UNet's forward (batch 2), the toy VAE's decode and encode (batch 2),
   and with --sd-latent, SD 1.5's UNet (batch 2) and VAE decode (batch 1) at that latent size;
   with --rows, the toy UNet's forward at each of those batch sizes (the LoRA merged): where
   oneDNN starts to pay, the toy's TOY_ONEDNN_MIN_ROWS;
3. whole calls on the toy bundle, through the library's switch: plain personalized sampling
   and the full Layout-and-Retouch (50 steps, the LoRA merged, a fresh reference) of
   `--call-images` images in one call (default 1), with `bundle.set_unet_onednn(True)`
   (torch's default) and `False`; the toy's default (since session 26) is False for its
   calls of fewer than TOY_ONEDNN_MIN_ROWS rows and True for the others.

Prints ms per item and the ratio off / on (below 1: faster without oneDNN). `--profile N`:
instead, the top N aten operations by self CPU time of 20 toy UNet forwards (batch 3: the CFG
rows and the riding reference row) under torch.profiler, with the flag on and then off.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median  # noqa: E402

import torch  # noqa: E402


def timed(fn, iters: int) -> float:
    """ms per call of fn, over `iters` calls after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def compare(items: dict, reps: int, flag) -> dict:
    """{name: (ms on, ms off)}: each item timed with flag(True) and flag(False), interleaved."""
    out = {name: ([], []) for name in items}
    for r in range(reps):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            flag(on)
            for name, (fn, iters) in items.items():
                out[name][0 if on else 1].append(timed(fn, iters))
    flag(True)
    return {name: (median(a), median(b)) for name, (a, b) in out.items()}


def report(title: str, res: dict) -> None:
    print(f"\n{title}")
    print(f"{'':<46}{'oneDNN ms':>11}{'off ms':>10}{'off/on':>8}")
    for name, (on, off) in res.items():
        print(f"{name:<46}{on:>11.2f}{off:>10.2f}{off / on:>8.2f}")


def set_global(on: bool) -> None:
    torch.backends.mkldnn.enabled = on


def conv_inputs(unet, *args, **kwargs) -> list:
    """(conv module, its input) for every Conv2d call of one forward."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].clone())))
             for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6, help="interleaved repetitions")
    ap.add_argument("--call-reps", type=int, default=4, help="repetitions of the whole calls")
    ap.add_argument("--sd-latent", type=int, default=0, help="also SD 1.5 at this latent size")
    ap.add_argument("--no-calls", action="store_true", help="skip the whole calls (part 3)")
    ap.add_argument("--rows", default="", help="also the toy UNet forward (LoRA merged) at these "
                    "batch sizes, e.g. 2,3,4,6,8,17")
    ap.add_argument("--call-images", type=int, default=1, help="images per whole call (part 3)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="only profile the toy UNet forward, top N operations, flag on and off")
    a = ap.parse_args()
    from lr_tutorial import load_models, sampling
    from lr_tutorial.models import TOY_ONEDNN_MIN_ROWS
    from lr_tutorial.pipeline import LayoutAndRetouch

    print(f"# {machine()}")
    g = torch.Generator().manual_seed(0)
    bundle = load_models("toy")
    unet, vae = bundle._vanilla_unet, bundle.vae
    bundle.set_unet_onednn(True)  # part 1 and 2 set the flag themselves
    t = torch.tensor(500)
    if a.profile:
        x3 = torch.randn(3, 4, 16, 16, generator=g)
        for on in (True, False):
            profile_unet(unet, x3, t, bundle_context(bundle, 3), on, a.profile)
        return
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = bundle_context(bundle, 2)
    convs = conv_inputs(unet, x, t, encoder_hidden_states=ctx)

    def all_convs():
        with torch.no_grad():
            for m, inp in convs:
                m(inp)
    smallest = min(convs, key=lambda c: c[1].numel() * c[0].weight.numel())
    res = compare({f"{len(convs)} convolutions of one toy UNet forward": (all_convs, 10),
                   f"the smallest, {tuple(smallest[1].shape)} -> {smallest[0].out_channels} ch":
                   (lambda: smallest[0](smallest[1]), 200)}, a.reps, set_global)
    with torch.no_grad():
        report("1. the toy UNet's convolutions, each called alone (ms, summed)", res)

    img = torch.randn(2, 3, bundle.image_size, bundle.image_size, generator=g)
    z = torch.randn(2, 4, bundle.latent_size, bundle.latent_size, generator=g)
    items = {"toy UNet forward, batch 2": (lambda: unet(x, t, encoder_hidden_states=ctx), 20),
             "toy VAE decode, batch 2": (lambda: vae.decode(z), 10),
             "toy VAE encode, batch 2": (lambda: vae.encode(img), 10)}
    if a.sd_latent:
        from common import sd15_unet
        from diffusers import AutoencoderKL
        s = a.sd_latent
        sd_unet = sd15_unet(s).eval()
        sd_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                               down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4,
                               layers_per_block=2, sample_size=s * 8).eval()
        xs, cs = torch.randn(2, 4, s, s, generator=g), torch.randn(2, 77, 768, generator=g)
        zs = torch.randn(1, 4, s, s, generator=g)
        items[f"SD 1.5 UNet forward, batch 2, latent {s}"] = (
            lambda: sd_unet(xs, t, encoder_hidden_states=cs), 1)
        items[f"SD 1.5 VAE decode, batch 1, latent {s}"] = (lambda: sd_vae.decode(zs), 1)
    with torch.no_grad():
        report("2. whole modules (ms per call)", compare(items, a.reps, set_global))
    if a.rows:
        bundle.set_fuse_lora(True)
        by_rows = {}
        for n in (int(r) for r in a.rows.split(",")):
            xn = torch.randn(n, 4, bundle.latent_size, bundle.latent_size, generator=g)
            cn = bundle_context(bundle, n)
            by_rows[f"toy UNet forward, {n} rows"] = (
                lambda xn=xn, cn=cn: unet(xn, t, encoder_hidden_states=cn), max(3, 40 // n))
        with torch.no_grad(), bundle.using("personalized"):
            report("2b. the toy UNet forward by its rows, LoRA merged (ms per call; the toy's "
                   f"default: oneDNN from {TOY_ONEDNN_MIN_ROWS} rows)",
                   compare(by_rows, a.reps, set_global))

    if a.no_calls:
        return
    ref = None  # the toy subject's reference photos
    n = a.call_images
    prompts = ["a sks star on the left in the snow", "a sks star at the top at night"] * n
    prompts, seeds = prompts[:n], list(range(n))

    def plain():
        with bundle.using("personalized"):
            zz, _ = sampling.sample(bundle, prompts, seeds, steps=50)
            sampling.decode(bundle, zz)

    def full():  # a fresh LayoutAndRetouch: it pays the reference work
        LayoutAndRetouch(bundle)(prompts, ref, seed=seeds)
    bundle.set_fuse_lora(True)
    res = compare({f"plain personalized sampling, {n} images (50 steps)": (plain, 1),
                   f"Layout-and-Retouch, {n} images, new reference": (full, 1)},
                  a.call_reps, bundle.set_unet_onednn)
    bundle.set_unet_onednn(True, TOY_ONEDNN_MIN_ROWS)
    report(f"3. whole calls on the toy bundle, LoRA merged (ms per call of {n} images; "
           "set_unet_onednn: on = torch's default, off = never)", res)


def profile_unet(unet, x, t, ctx, on: bool, top: int) -> None:
    """The top aten operations by self CPU time of 20 forwards, after 5 unprofiled ones."""
    from torch.profiler import ProfilerActivity, profile
    set_global(on)
    with torch.no_grad():
        for _ in range(5):
            unet(x, t, encoder_hidden_states=ctx)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                unet(x, t, encoder_hidden_states=ctx)
    set_global(True)
    print(f"\ntoy UNet forward, batch {len(x)}, 20 calls, oneDNN {'on' if on else 'off'}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                    max_name_column_width=48))


def bundle_context(bundle, n: int) -> torch.Tensor:
    """(n, tokens, D) text embeddings of a toy prompt."""
    from lr_tutorial import sampling
    return sampling.encode_prompts(bundle, ["a sks star on the left in the snow"] * n)


if __name__ == "__main__":
    main()
