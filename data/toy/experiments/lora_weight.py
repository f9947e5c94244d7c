"""Stage 1 with the LoRA at a lower weight while the layout is painted? (issue 3, session 20)

Step-blended denoising where the personalized steps run in two parts: the LoRA at weight w
(diffusers' `set_adapters(..., weights=[w])`) for steps [l1 N, l2 N), then at full weight.
The question: does the default LoRA, which redraws a layout it is handed (data/toy/README.md,
"Issue 3"), keep it while it is weakened, and then paint the subject at full weight? Prints
fidelity, identity and the position spread over the first --limit held-out personal prompts x
2 seeds, 25 steps (the quick check of acceptance_sweep.py). [l1, l1, 1.0] is plain stage 1.

    python data/toy/experiments/lora_weight.py '[0.2, 0.2, 1.0]' '[0.2, 0.6, 0.5]' '[0.2, 1.0, 0.5]'
"""
import argparse
import json

import torch

from lr_tutorial import sampling
from lr_tutorial.models import load_models
from lr_tutorial.prompts import strip_identifier
from lr_tutorial.toy import report

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("settings", nargs="+", help="JSON [l1, l2, w]: fractions of N and a LoRA weight")
ap.add_argument("--limit", type=int, default=24)
ap.add_argument("--steps", type=int, default=25)
ap.add_argument("--lora", default="default", help="a LoRA folder (personalize-toy --out)")
a = ap.parse_args()

bundle = load_models("toy", personalized=a.lora)
prompts = report.read_prompts("data/prompts/heldout_personal.txt")[: a.limit]
seeds = [0, 1]
flat = [p for p in prompts for _ in seeds]
flat_seeds = [s for _ in prompts for s in seeds]


@torch.no_grad()
def stage1(l1: float, l2: float, w: float):
    n = a.steps
    k1, k2 = round(l1 * n), round(l2 * n)
    sched = sampling.make_scheduler(bundle, n)
    z = sampling.initial_noise(bundle, flat_seeds)
    uncond = sampling.encode_prompts(bundle, [""] * len(flat))
    common = dict(sched=sched, guidance=bundle.guidance)
    with bundle.using("vanilla"):
        cond = sampling.encode_prompts(bundle, [strip_identifier(p, bundle.identifier) for p in flat])
        z = sampling.denoise(bundle, z, cond, uncond, k_range=range(0, k1), **common)
    with bundle.using("personalized"):
        cond = sampling.encode_prompts(bundle, flat)
        try:
            bundle.unet.set_adapters([bundle.adapter_name], weights=[w])
            z = sampling.denoise(bundle, z, cond, uncond, k_range=range(k1, k2), **common)
        finally:
            bundle.unet.set_adapters([bundle.adapter_name], weights=[1.0])
        z = sampling.denoise(bundle, z, cond, uncond, k_range=range(k2, n), **common)
    return sampling.decode(bundle, z)


for setting in a.settings:
    l1, l2, w = json.loads(setting)
    s = report.summarize(report.score(stage1(l1, l2, w), flat))
    f = " ".join(f"{k[:4]} {v:.2f}" for k, v in s["fidelity"].items())
    print(f"{setting:20s} fidelity {s['fidelity_mean']:.3f} identity {s['identity']:.3f} | {f} | "
          f"positions {s['position_classes']} ({s['centroid_spread_px']:.1f} px)", flush=True)
