"""Which images change their shape or size reading between stage 1 and Layout-and-Retouch.

Runs stage 1 and the full method on the quick check (the first 24 held-out personal prompts x
2 seeds, 25 steps) with one setting, prints every image whose oracle reading of shape or size
differs between the two, and writes those images as a PNG (top row stage 1, bottom row the
method). Then prints the oracle's template IoU of a cleanly rendered star rotated by 0-36
degrees (the reference photos' stars are rotated by up to 12): data/toy/README.md, session 19.

    LR_TUTORIAL_DATA=D python data/toy/experiments/retouch_shape.py --lora LORA \
        --setting '{"layout.lambda1": 0.4}' --out changed.png
"""
import argparse
import json
import os

import numpy as np
from PIL import Image

from lr_tutorial.methods import apply_overrides
from lr_tutorial.models import load_models
from lr_tutorial.pipeline import LRConfig
from lr_tutorial.toy import oracle, report, world

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--lora", default="default", help="a LoRA folder (personalize-toy --out)")
ap.add_argument("--setting", default="{}", help="JSON dict of dotted LRConfig overrides")
ap.add_argument("--out", required=True, help="the PNG to write (refused if it exists)")
a = ap.parse_args()
if os.path.exists(a.out):
    raise SystemExit(f"{a.out} exists; choose another --out or remove it")

bundle = load_models("toy", personalized=a.lora)
prompts = report.read_prompts("data/prompts/heldout_personal.txt")[:24]
seeds = [0, 1]
flat = [p for p in prompts for _ in seeds]
cfg = apply_overrides(LRConfig(), json.loads(a.setting))
s1 = report.generate_method(bundle, prompts, seeds, "stage1", steps=25, config=cfg, progress=False)
lr = report.generate_method(bundle, prompts, seeds, "layout_and_retouch", steps=25, config=cfg,
                            progress=False)
rows1, rows2 = report.score(s1, flat), report.score(lr, flat)
changed = [i for i, (x, y) in enumerate(zip(rows1, rows2))
           if (x["read"]["shape"], x["read"]["size"]) != (y["read"]["shape"], y["read"]["size"])]
for i in changed:
    x, y = rows1[i], rows2[i]
    print(f"{i:3d} {flat[i]:48s} stage 1: {x['read']['shape']} {x['read']['size']} "
          f"({x['identity']:.2f})  ->  L&R: {y['read']['shape']} {y['read']['size']} ({y['identity']:.2f})")
for name, rows in (("stage 1", rows1), ("L&R", rows2)):
    print(f"{name}: shape fidelity {np.mean([r['match']['shape'] for r in rows]):.3f}")
if changed:
    grid = np.concatenate([np.concatenate([s1[i] for i in changed], 1),
                           np.concatenate([lr[i] for i in changed], 1)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(a.out)
    print(f"wrote {a.out}: {len(changed)} of {len(flat)} images")

print("template IoU of a rendered star, rotated:")
for rot in (0, 6, 12, 18, 24, 36):
    m = world.shape_mask("star", (32, 32), 16, rotation=rot) > 0.5
    ys, xs = np.nonzero(m)
    canon = oracle._crop_canon(m, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    ious = {s: oracle._iou(canon, oracle._template(s)) for s in world.SHAPES}
    print(f"  {rot:2d} deg: " + ", ".join(f"{s} {v:.2f}" for s, v in ious.items()))
