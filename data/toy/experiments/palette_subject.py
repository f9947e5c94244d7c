"""Would the LoRA keep the subject at night if the base model knew its colours? (data/toy/README.md)

Trains the shipped LoRA recipe (`toy_recipe()`) on the five reference photos re-rendered with
another two-colour pattern made of palette colours the base model draws on every background, and
scores it like `toy-report --limit 38 --seeds 2 --steps 25`, identity measured against that
pattern. Prints the autoencoder's own ceiling for the pattern, then the LoRA's identity by the
background the prompt states. About 10 minutes on 2 CPU cores.

    python data/toy/experiments/palette_subject.py blue orange
"""
import argparse
import dataclasses

import numpy as np
import torch

from lr_tutorial import sampling
from lr_tutorial.models import load_models
from lr_tutorial.personalize import dreambooth_lora, toy_recipe
from lr_tutorial.toy import heldout, oracle, report, subject, world

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("body", choices=list(world.COLOURS))
ap.add_argument("core", choices=list(world.COLOURS))
ap.add_argument("--limit", type=int, default=38)
a = ap.parse_args()

pattern = world.Pattern(world.COLOURS[a.body], world.COLOURS[a.core])
refs = np.stack([world.render(dataclasses.replace(s, pattern=pattern))
                 for s in subject.reference_scenes()])  # (5, 64, 64, 3) uint8
bundle = load_models("toy", personalized=None)
with torch.no_grad():  # the autoencoder's ceiling: identity of its reconstructions
    rec = sampling.decode(bundle, sampling.encode(bundle, refs))
print("autoencoder reconstructions of the references: identity %.3f"
      % np.mean([oracle.identity_score(r, pattern=pattern) for r in rec]))
dreambooth_lora(bundle, refs, toy_recipe(), progress=True)
prompts = heldout.personal_prompts()[:a.limit]
images = report.generate(bundle, prompts, [0, 1], "personalized", steps=25)
rows = report.score(images, [p for p in prompts for _ in (0, 1)])
for r, img in zip(rows, images):
    r["identity"] = oracle.identity_score(img, pattern=pattern)
s = report.summarize(rows)
print(f"{a.body} body, {a.core} core: identity {s['identity']}, fidelity {s['fidelity']}")
print("identity by background:", s["identity_by"]["background"])
