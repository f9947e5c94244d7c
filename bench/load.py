"""Toy sampling speed with other processes busy on the same cores, per thread count.

    python bench/load.py [--busy 2] [--calls 20] [--threads 1,2]

Times `--calls` toy UNet calls of 2 rows (one image under classifier-free guidance: one
denoising step) in a fresh process per thread count, first on the machine as it is, then with
`--busy` extra processes spinning on the CPU. Prints each time, the slowdown each thread count
suffers under the load, and what the automatic choice (lr_tutorial.threads.choose, the default
of every command) picks once the load shows in the load average.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = r"""
import sys, time, torch
from lr_tutorial import load_models
n = int(sys.argv[1]); calls = int(sys.argv[2])
torch.set_num_threads(n)
b = load_models("toy", personalized=None)
z = torch.randn(2, 4, b.latent_size, b.latent_size)
ids = b.tokenizer(["a star", ""], padding="max_length", max_length=b.tokenizer.model_max_length,
                  return_tensors="pt").input_ids
with torch.no_grad():
    e = b.text_encoder(ids)[0]
    b.unet(z, 500, encoder_hidden_states=e)  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        b.unet(z, 500, encoder_hidden_states=e)
print(time.perf_counter() - t0)
"""


def _spin() -> None:
    x = 0
    while True:
        x += 1


def measure(threads: int, calls: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(calls)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, default=2, help="background processes spinning")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", default="",
                    help="thread counts to time (default: 1 and every core)")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="seconds to wait at most for the load average to show the load")
    a = ap.parse_args()
    from lr_tutorial import threads as th
    cores = th.cores()
    counts = [int(x) for x in a.threads.split(",") if x] or sorted({1, cores})
    print(f"{cores} cores, load average {th.load():.2f} before; automatic choice now: "
          f"{th.choose()} threads")
    quiet = {n: measure(n, a.calls) for n in counts}
    for n, t in quiet.items():
        print(f"  as it is, {n} thread(s): {t:.2f} s for {a.calls} calls")
    procs = [mp.Process(target=_spin, daemon=True) for _ in range(a.busy)]
    for p in procs:
        p.start()
    try:
        t0 = time.time()
        while th.load() < 0.8 * a.busy and time.time() - t0 < a.settle:
            time.sleep(2)
        auto = th.choose()
        print(f"with {a.busy} busy processes: load average {th.load():.2f}, automatic choice "
              f"{auto} thread(s)")
        loaded = {n: measure(n, a.calls) for n in sorted(set(counts) | {auto})}
    finally:
        for p in procs:
            p.terminate()
    for n, t in loaded.items():
        ratio = f", {t / quiet[n]:.2f}x its time as it is" if n in quiet else ""
        print(f"  loaded, {n} thread(s): {t:.2f} s{ratio}")
    best = min(loaded.values())
    print(f"ratios under load: torch's default ({cores} threads) {loaded[cores] / best:.2f}x "
          f"the fastest, the automatic choice ({auto}) {loaded[auto] / best:.2f}x the fastest")


if __name__ == "__main__":
    main()
