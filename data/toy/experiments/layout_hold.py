"""Does the personalized model keep a layout the vanilla model started? (issue 3, session 10)

Stage 1 (step-blended denoising) for a few prompts at lambda1 = 0, 0.2, ..., 1.0 N, 4 seeds,
25 steps: prints each image's identity and the position the oracle reads. A personalized model
that follows a committed layout keeps the vanilla model's position once lambda1 is past the
steps where layout is decided; the shipped toy LoRA pulls the subject back to the centre until
late (data/toy/README.md, "Issue 3"). With --grid PATH it saves the images, one row per lambda1.

    python data/toy/experiments/layout_hold.py
    python data/toy/experiments/layout_hold.py --lora DIR      # another LoRA
"""
import argparse

import numpy as np

from lr_tutorial.layout import LayoutConfig, step_blended
from lr_tutorial.models import load_models
from lr_tutorial.toy import oracle

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--lora", default="default")
ap.add_argument("--prompts", nargs="+", default=[
    "a small sks star on the left", "a sks star on the left at night",
    "a sks star at the top in the snow", "a small sks star on the right on the beach"])
ap.add_argument("--grid", default=None)
a = ap.parse_args()

bundle = load_models("toy", personalized=a.lora)
seeds = [0, 1, 2, 3]
rows = []
for p in a.prompts:
    for lam in (0, 0.2, 0.4, 0.6, 0.8, 1.0):
        images = step_blended(bundle, [p] * len(seeds), seeds, LayoutConfig(lambda1=lam, steps=25)).images
        facts = [oracle.analyze(im) for im in images]
        ids = [round(oracle.identity_score(im, f), 2) for im, f in zip(images, facts)]
        print(f"{p!r:48s} lambda1 {lam:.1f} N: positions {[f.position for f in facts]}, "
              f"identity {ids}", flush=True)
        rows.append(np.concatenate(list(images), 1))
if a.grid:
    from PIL import Image
    Image.fromarray(np.concatenate(rows, 0)).save(a.grid)
    print(f"wrote {a.grid}")
