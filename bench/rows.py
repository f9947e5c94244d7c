"""What one UNet call costs by its rows: is a row that rides a call (the reference inversion's
in stage 1, 16 -> 17 rows at 8 images with CFG) worth its share of the rows, or more?

    python bench/rows.py                                   # on a GPU: SD 1.5, fp16, 512 px
    python bench/rows.py --latent 8 --rows 2 3 4 --iters 2 # CPU smoke run

Times SD 1.5's UNet (random weights, the LoRA adapter on, as in personalized sampling) at each
row count, interleaved (the order rotates every repetition), median ms per call, and each as a
ratio to the first row count and to its rows' share of it. bench/HISTORY.md, session 22.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, sd15_random, sync  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 17, 18, 20, 1, 2])
    ap.add_argument("--latent", type=int, default=None, help="default 64 on a GPU, 16 on a CPU")
    ap.add_argument("--iters", type=int, default=10, help="calls per timing")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    latent = a.latent or (64 if device == "cuda" else 16)
    header = machine()
    bundle = sd15_random(latent, device, dtype)
    unet = bundle.unet
    g = torch.Generator(device="cpu").manual_seed(0)

    def inputs(r):
        x = torch.randn(r, 4, latent, latent, generator=g).to(device, dtype)
        c = torch.randn(r, 77, 768, generator=g).to(device, dtype)
        return x, torch.full((r,), 500, device=device), c

    batches = {r: inputs(r) for r in a.rows}

    @torch.no_grad()
    def run(r):
        x, t, c = batches[r]
        sync()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            unet(x, t, encoder_hidden_states=c)
        sync()
        return (time.perf_counter() - t0) / a.iters * 1e3

    with bundle.using(bundle.personal_mode):
        for r in a.rows:  # warm-up: kernels and attention graphs for each shape
            run(r)
        times = {r: [] for r in a.rows}
        for rep in range(a.reps):
            k = rep % len(a.rows)
            for r in a.rows[k:] + a.rows[:k]:
                times[r].append(run(r))
    base = a.rows[0]
    print(f"# SD 1.5 UNet, random weights, LoRA on, {device}, {dtype}, latent {latent}; "
          f"{a.iters} calls per timing, {a.reps} interleaved repetitions, median")
    print(f"# {header}")
    print(f"{'rows':>5}{'ms/call':>10}{'x ' + str(base) + ' rows':>12}{'x its share':>13}")
    for r in a.rows:
        ms = median(times[r])
        ratio = median([t / b for t, b in zip(times[r], times[base])])
        print(f"{r:>5}{ms:>10.2f}{ratio:>12.3f}{ratio * base / r:>13.3f}")


if __name__ == "__main__":
    main()
