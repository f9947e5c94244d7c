"""How many CPU threads torch may use: the cores that are free now, not all of them.

torch starts one thread per core. When other processes keep those cores busy, its threads wait
for each other at every parallel region and a run is many times slower than on one thread
(`python bench/load.py` measures both under a background load). `choose()` takes the cores
this process may run on, minus the load already on them (the 1-minute load average), at least
one; `LR_TUTORIAL_THREADS` or `--threads N` (or `apply(N)` in Python) overrides it.
"""
from __future__ import annotations

import os


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def load() -> float:
    """Runnable processes on the machine, averaged over the last minute (0 where unknown)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose(requested: int | None = 0) -> int:
    """`requested` if > 0; else LR_TUTORIAL_THREADS if set; else the free cores: cores()
    minus the current load, rounded, at least 1 and at most cores()."""
    if requested:
        return int(requested)
    env = os.environ.get("LR_TUTORIAL_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"LR_TUTORIAL_THREADS={env!r} is not a whole number; give e.g. 1, "
                             "or unset it for the automatic choice") from None
        if n < 1:
            raise ValueError(f"LR_TUTORIAL_THREADS={env!r} must be 1 or more")
        return n
    c = cores()
    return max(1, min(c, int(c - load() + 0.5)))


def apply(requested: int | None = 0) -> int:
    """Set torch's intra-op threads to choose(requested); returns the number."""
    import torch
    n = choose(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
