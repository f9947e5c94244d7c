"""What the reference inversion's row costs in one of stage 1's vanilla UNet calls, from one run.

    python bench/mixed_rows.py --backend toy                 # toy models, CPU
    python bench/mixed_rows.py --backend toy --fuse-lora     # the LoRA merged, as `generate`
    python bench/mixed_rows.py --backend sd15-random          # on a GPU: SD 1.5, fp16, 512 px
    python bench/mixed_rows.py --backend sd15-random --latent 8 --iters 2   # CPU smoke run

Since session 23 the reference inversion rides stage 1's vanilla calls too: the call holds the
2B vanilla rows plus the inversion's row, which alone runs the LoRA (ModelBundle.personal_rows,
a forward hook per LoRA layer adding B A x to that row). Before, those lambda1 inversion steps
ran alone, one personalized row per call. Per call (ms, median of interleaved repetitions; the
order rotates every repetition; mode switches happen outside the timer, once per phase as in
the method):

- vanilla:        the 2B vanilla rows alone (stage 1 without the inversion);
- mixed:          2B + 1 rows, the last one personalized through personal_rows (the method now:
                  with --fuse-lora, that row recomputed with each layer's merged weight);
- mixed-BAx:      with --fuse-lora only: the same call through the B A x update instead
                  (`personal_rows(n, merged=False)`, what fuse_lora took before session 26);
- apart:          vanilla, plus the inversion's step in a call of its own (1 personalized row),
                  timed in the same repetition (the method before session 23);
- vanilla+1:      2B + 1 rows, all vanilla: what the extra row costs without the LoRA;
- peft-mixed:     2B + 1 rows through peft's mixed-batch inference (`adapter_names`, one per
                  row, passed to every LoRA layer by a forward pre-hook): the library's own way,
                  measured to show why personal_rows does not use it.

Prints each as ms per call and as a ratio to `vanilla`; "saved per step" is apart - mixed, what
riding saves for each of the lambda1 inversion steps (x lambda1 per new reference).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, sd15_random, sync  # noqa: E402

import torch  # noqa: E402

CASES = ("vanilla", "mixed", "mixed-BAx", "apart", "vanilla+1", "peft-mixed")


@contextlib.contextmanager
def peft_mixed(bundle, names):
    """The LoRA on, and every LoRA layer called with `adapter_names` (peft's mixed batch)."""
    layers = bundle._peft_layers()

    def inject(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}
    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(True)
        yield
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.enable_adapters(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--images", type=int, default=8, help="B: 2B vanilla rows per call (CFG)")
    ap.add_argument("--latent", type=int, default=None, help="sd15-random: default 64 on a GPU, "
                    "16 on a CPU")
    ap.add_argument("--iters", type=int, default=5, help="calls per timing")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--fuse-lora", action="store_true",
                    help="merge the LoRA while personalized (ModelBundle.set_fuse_lora)")
    a = ap.parse_args()
    from lr_tutorial import load_models, sampling

    device = "cuda" if torch.cuda.is_available() else "cpu"
    header = machine()
    if a.backend == "toy":
        bundle = load_models("toy", device=device)
    else:
        bundle = sd15_random(a.latent or (64 if device == "cuda" else 16), device,
                             torch.float16 if device == "cuda" else torch.float32)
    if bundle.personalization != "lora":
        raise SystemExit(f"needs a LoRA bundle, got {bundle.personalization}")
    bundle.set_fuse_lora(a.fuse_lora)
    cases = CASES if a.fuse_lora else tuple(c for c in CASES if c != "mixed-BAx")
    n, size = 2 * a.images, bundle.latent_size
    c_in = bundle.unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n + 1, c_in, size, size, generator=g).to(bundle.device, bundle.dtype)
    t = torch.full((n + 1,), 500, device=bundle.device)
    with bundle.using("vanilla"):
        cond_v = sampling.encode_prompts(bundle, ["a photo"] * n)
    with bundle.using("personalized"):
        cond_p = sampling.encode_prompts(bundle, [f"a {bundle.identifier} {bundle.class_noun}"])
    cond = torch.cat([cond_v, cond_p])

    @torch.no_grad()
    def timed(mode, rows, ctx=contextlib.nullcontext):
        with bundle.using(mode), ctx():
            sync()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                bundle.unet(z[rows], t[rows], encoder_hidden_states=cond[rows])
            sync()
        return (time.perf_counter() - t0) / a.iters * 1e3

    all_rows, vanilla_rows, own = slice(0, n + 1), slice(0, n), slice(n, n + 1)
    runs = {
        "vanilla": lambda: timed("vanilla", vanilla_rows),
        "mixed": lambda: timed("vanilla", all_rows, lambda: bundle.personal_rows(n)),
        "mixed-BAx": lambda: timed("vanilla", all_rows,
                                   lambda: bundle.personal_rows(n, merged=False)),
        "apart": lambda: timed("vanilla", vanilla_rows) + timed("personalized", own),
        "vanilla+1": lambda: timed("vanilla", all_rows),
        "peft-mixed": lambda: timed("vanilla", all_rows, lambda: peft_mixed(
            bundle, ["__base__"] * n + [bundle.adapter_name])),
    }
    for c in cases:  # warm-up: kernels and attention graphs for each shape
        runs[c]()
    times = {c: [] for c in cases}
    for rep in range(a.reps):
        k = rep % len(cases)
        for c in cases[k:] + cases[:k]:
            times[c].append(runs[c]())
    print(f"# {a.backend}: {n} vanilla rows (+1 for the inversion), latent {size}, {device}, "
          f"{bundle.dtype}, LoRA {'merged' if a.fuse_lora else 'not merged'}; {a.iters} calls per "
          f"timing, {a.reps} interleaved repetitions, median")
    print(f"# {header}")
    print(f"{'case':<12}{'ms/call':>10}{'x vanilla':>11}")
    for c in cases:
        ratio = median([x / v for x, v in zip(times[c], times["vanilla"])])
        print(f"{c:<12}{median(times[c]):>10.2f}{ratio:>11.3f}")
    saved = median([p - m for p, m in zip(times["apart"], times["mixed"])])
    print(f"saved per inversion step by riding (apart - mixed): {saved:.2f} ms")


if __name__ == "__main__":
    main()
