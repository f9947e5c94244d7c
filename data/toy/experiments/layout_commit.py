"""When does the vanilla model commit to a layout, and to a colour? (issue 3, sessions 15-16)

Step-blended denoising hands the personalized model the latent after lambda1 vanilla steps; it
can only keep a layout that is already decided there. This probe finds where the vanilla model
decides: it denoises prompt A ("a star on the left") for the first k of N steps and prompt B
("a star on the right") for the rest, and counts the seeds whose star ends where A put it. The
step where most seeds keep A's position is where the layout is committed. The colour pairs
("a blue star", then "a red star") ask the same of the object's colour (session 16): the
personalized model that takes over at lambda1 must recolour the vanilla star into the subject's
look, which it can only do where the colour is not yet fixed.

    python data/toy/experiments/layout_commit.py               # 25 steps, 8 seeds, ~4 min
    LR_TUTORIAL_DATA=FOLDER python data/toy/experiments/layout_commit.py   # other toy weights
"""
import argparse

from lr_tutorial import sampling
from lr_tutorial.layout import resolve_guidance
from lr_tutorial.models import load_models
from lr_tutorial.toy import oracle

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--steps", type=int, default=25)
ap.add_argument("--seeds", type=int, default=8)
ap.add_argument("--switch-at", type=int, nargs="+", default=[0, 2, 4, 5, 6, 8, 10, 12, 15, 25])
a = ap.parse_args()

PAIRS = [  # (prompt A, prompt B, the attribute, the value A asks for)
    ("a star on the left", "a star on the right", "position", "left"),
    ("a star at the top", "a star at the bottom", "position", "top"),
    ("a small star on the left on the grass", "a small star on the right on the grass", "position", "left"),
    ("a blue star", "a red star", "colour", "blue"),
    ("a yellow star at night", "a purple star at night", "colour", "yellow"),
    ("a orange star on the grass", "a blue star on the grass", "colour", "orange"),
]
bundle = load_models("toy", personalized=None)
guidance = resolve_guidance(bundle, None)
seeds = list(range(a.seeds))
uncond = sampling.encode_prompts(bundle, [""] * len(seeds))
with bundle.using("vanilla"):
    for first, second, attr, where in PAIRS:
        cond_a = sampling.encode_prompts(bundle, [first] * len(seeds))
        cond_b = sampling.encode_prompts(bundle, [second] * len(seeds))
        counts = []
        for k in a.switch_at:
            sched = sampling.make_scheduler(bundle, a.steps)
            z = sampling.initial_noise(bundle, seeds)
            z = sampling.denoise(bundle, z, cond_a, uncond, sched=sched, guidance=guidance,
                                 k_range=range(0, k))
            z = sampling.denoise(bundle, z, cond_b, uncond, sched=sched, guidance=guidance,
                                 k_range=range(k, a.steps))
            kept = sum(getattr(oracle.analyze(im), attr) == where for im in sampling.decode(bundle, z))
            counts.append(f"k={k} ({k / a.steps:.2f} N, t={int(sched.timesteps[k]) if k < a.steps else 0}): {kept}/{len(seeds)}")
        print(f"{first!r} for k steps, then {second!r}: seeds ending {where}")
        print("  " + "; ".join(counts), flush=True)
