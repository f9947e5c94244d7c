"""Look at the images: vanilla, personalized, stage 1 and Layout-and-Retouch, one row each.

Sixteen held-out personal prompts (ten with a stated backdrop or size, then the first six), one
seed, 25 steps; prints each row's per-image identity and writes a PNG grid (columns: prompts).
The session-17 notes in data/toy/README.md describe what these rows show for its LoRAs.

    python data/toy/experiments/method_rows.py --lora LORA --lambda1 0.3 --out rows.png
"""
import argparse
import os

import numpy as np
from PIL import Image

from lr_tutorial.methods import apply_overrides
from lr_tutorial.models import load_models
from lr_tutorial.pipeline import LRConfig
from lr_tutorial.toy import heldout, report

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--lora", default="default", help="a LoRA folder (personalize-toy --out)")
ap.add_argument("--lambda1", type=float, default=0.2)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True, help="the PNG to write (refused if it exists)")
a = ap.parse_args()
if os.path.exists(a.out):
    raise SystemExit(f"{a.out} exists; choose another --out or remove it")

bundle = load_models("toy", personalized=a.lora)
prompts = report.read_prompts("data/prompts/heldout_personal.txt")
pick = [p for p in prompts if any(w in p for w in ("night", "grass", "beach", "small"))][:10] + prompts[:6]
seeds = [a.seed]
cfg = apply_overrides(LRConfig(), {"layout.lambda1": a.lambda1})
rows = {
    "vanilla": report.generate(bundle, [heldout.strip_identifier(p) for p in pick], seeds, "vanilla",
                               steps=25, progress=False),
    "personalized": report.generate(bundle, pick, seeds, "personalized", steps=25, progress=False),
    "stage 1": report.generate_method(bundle, pick, seeds, "stage1", steps=25, config=cfg,
                                      progress=False),
    "Layout-and-Retouch": report.generate_method(bundle, pick, seeds, "layout_and_retouch", steps=25,
                                                 config=cfg, progress=False),
}
for name, images in rows.items():
    scores = report.score(images, pick)
    print(f"{name:>18}", " ".join(f"{s['identity']:.2f}" for s in scores))
for i, p in enumerate(pick):
    print(i, p)
Image.fromarray(np.concatenate([np.concatenate(list(r), 1) for r in rows.values()], 0)).save(a.out)
print(f"wrote {a.out}")
