"""Tensor operations per denoising step, by phase: an exact count that runs on a CPU.

    python bench/ops.py                    # the toy models, 10 steps, 2 images
    python bench/ops.py --backend sd15-random --latent 8

Every aten operation the dispatcher runs is counted (torch's TorchDispatchMode), views included.
On a GPU each non-view operation is at least one kernel launch, and each one costs Python and
dispatcher time on the CPU. So where a GPU is fast enough to wait on Python, as an H200 is for
SD 1.5 (bench/HISTORY.md, session 12), a step's operation count bounds its speed as surely as
its UNet rows do. The count does not depend on the machine or the latent size, only on the
architecture and the code path.

Phases: plain personalized sampling; then one call of the full method with the cached stage 2
and the reference already cached, split into stage 1 and stage 2 (per stage-2 step). Also the
operations stage 2 runs per step beyond plain sampling's, largest first.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import small_workload  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VIEWS = {"view", "_unsafe_view", "expand", "detach", "unsqueeze", "squeeze", "transpose",
         "permute", "slice", "select", "t", "alias", "as_strided", "split", "chunk", "unbind"}


class Count(TorchDispatchMode):
    """Counts the aten operations run inside `with Count() as c:` (c.ops: name -> count)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def kernels(ops: collections.Counter) -> int:
    return sum(n for name, n in ops.items() if name not in VIEWS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("toy", "sd15-random"), default="toy")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--latent", type=int, default=8, help="sd15-random: latent side")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    from lr_tutorial import pipeline, sampling
    from lr_tutorial.layout import LayoutConfig
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig

    bundle, prompts, seeds, ref = small_workload(a.backend, "cpu", torch.float32, a.latent,
                                                 a.images)
    n = a.steps
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=n), stage2="cached"))
    lr(prompts, ref, seed=seeds)  # the reference's inversion and keys/values, once

    plain = Count()
    with plain, bundle.using(bundle.personal_mode):
        sampling.sample(bundle, prompts, seeds, steps=n)
    counted: dict[str, Count] = {}
    originals = {name: getattr(pipeline, name) for name in ("step_blended", "retouch")}

    def counting(name):
        def run(*args, **kwargs):
            with Count() as c:
                out = originals[name](*args, **kwargs)
            counted[name] = c
            return out
        return run
    try:
        for name in originals:
            setattr(pipeline, name, counting(name))
        lr(prompts, ref, seed=seeds)
    finally:
        for name, fn in originals.items():
            setattr(pipeline, name, fn)
    k2 = n - lr.start_step()
    rows = [("plain personalized sampling", plain.ops, n),
            ("stage 1 (mask capture, key/value recording)", counted["step_blended"].ops, n),
            ("stage 2, cached (per retouch step)", counted["retouch"].ops, k2)]
    print(f"# {a.backend}: {a.images} images, {n} steps ({k2} retouch steps), CPU count")
    print(f"{'phase':<46}{'ops/step':>10}{'non-view':>10}")
    for label, ops, steps in rows:
        print(f"{label:<46}{sum(ops.values()) / steps:>10.1f}{kernels(ops) / steps:>10.1f}")
    extra = {k: counted["retouch"].ops[k] / k2 - plain.ops[k] / n
             for k in set(counted["retouch"].ops) | set(plain.ops)}
    print("# stage 2 per step minus plain sampling per step, largest first (non-view):")
    for name, d in sorted(extra.items(), key=lambda t: -abs(t[1])):
        if name not in VIEWS and abs(d) >= 0.5:
            print(f"    {d:+8.1f}  {name}")
            a.top -= 1
            if a.top == 0:
                break


if __name__ == "__main__":
    main()
