"""The identity a perfectly layout-faithful personalized model could reach (issue 3, session 15).

Renders each held-out personal prompt's scene with the subject's true look (the attributes the
prompt leaves open drawn at random), passes it through the toy autoencoder and scores it with
the oracle: the identity score of images that follow every stated attribute and carry the
subject exactly, up to what the autoencoder loses. Prints the mean and its breakdown by the
stated background, size and position. Any method's identity on these prompts is bounded by it.

    python data/toy/experiments/identity_ceiling.py     # 76 prompts x 4 draws, ~10 s
"""
import argparse
import collections

import numpy as np
import torch

from lr_tutorial import sampling
from lr_tutorial.models import load_models
from lr_tutorial.toy import oracle, report, world

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--prompts", default="data/prompts/heldout_personal.txt")
ap.add_argument("--draws", type=int, default=4, help="scenes drawn per prompt")
a = ap.parse_args()

bundle = load_models("toy", personalized=None)
rows = []  # (background, size, position, identity of the render, identity after the autoencoder)
for i, prompt in enumerate(report.read_prompts(a.prompts)):
    stated = world.parse_prompt(prompt)
    fixed = {k: stated[k] for k in ("size", "position", "background") if stated.get(k)}
    scenes = [world.subject_scene(np.random.default_rng(1000 * i + d), **fixed)
              for d in range(a.draws)]
    images = np.stack([world.render(s) for s in scenes])  # (draws, 64, 64, 3)
    with torch.no_grad():
        recon = sampling.decode(bundle, sampling.encode(bundle, images))
    rows += [(s.background, s.size, s.position, oracle.identity_score(im), oracle.identity_score(r))
             for s, im, r in zip(scenes, images, recon)]

print(f"{len(rows)} scenes: identity of the renders {np.mean([r[3] for r in rows]):.3f}, "
      f"after the autoencoder {np.mean([r[4] for r in rows]):.3f}")
for col, name in enumerate(("background", "size", "position")):
    groups = collections.defaultdict(list)
    for r in rows:
        groups[r[col]].append(r[4])
    print(f"  by {name}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(groups.items())))
