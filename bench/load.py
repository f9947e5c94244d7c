"""Time `load_models("toy")` (issue: under 2 s on a laptop CPU), median of a few cold-ish runs.

    python bench/load.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import torch

    from lr_tutorial import load_models
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        load_models("toy")
        times.append(time.perf_counter() - t0)
    print(f"load_models('toy'): median {statistics.median(times):.2f} s, min {min(times):.2f} s "
          f"over {a.repeats} runs (torch {torch.__version__}, {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
