"""What guidance does to the personalized toy model at night (data/toy/README.md, "Guidance").

Samples "a sks star at night" with the personalized model, 6 seeds, 25 steps, at each guidance
weight given, and prints every image's identity score and the background the oracle reads.
With --grid PATH it also saves the images, one row per weight.

    python data/toy/experiments/guidance_night.py 7.5 3             # the shipped LoRA
    python data/toy/experiments/guidance_night.py 7.5 3 --lora DIR  # another (personalize-toy --out)
"""
import argparse

import numpy as np
from PIL import Image

from lr_tutorial import sampling
from lr_tutorial.models import load_models
from lr_tutorial.toy import oracle

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("guidance", type=float, nargs="+")
ap.add_argument("--lora", default="default")
ap.add_argument("--prompt", default="a sks star at night")
ap.add_argument("--seeds", type=int, default=6)
ap.add_argument("--grid", default=None, help="save the images here (PNG)")
a = ap.parse_args()

bundle = load_models("toy", personalized=a.lora)
rows = []
for g in a.guidance:
    with bundle.using("personalized"):
        z, _ = sampling.sample(bundle, [a.prompt] * a.seeds, list(range(a.seeds)), steps=25,
                               guidance=g)
    images = sampling.decode(bundle, z)
    facts = [oracle.analyze(im) for im in images]
    ids = [oracle.identity_score(im, f) for im, f in zip(images, facts)]
    print(f"guidance {g}: identity {[round(x, 2) for x in ids]} (mean {np.mean(ids):.3f}), "
          f"background {[f.background for f in facts]}")
    rows.append(np.concatenate(list(images), 1))
if a.grid:
    Image.fromarray(np.concatenate(rows, 0)).save(a.grid)
    print(f"wrote {a.grid}")
