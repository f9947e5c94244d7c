"""Does the personalized model recolour the star the vanilla steps drew? (issue 3, session 16)

Stage 1 hands the personalized model a latent in which the vanilla model has drawn a star of
some colour; the subject is teal with an orange core, a look the grammar cannot name. This
groups the identity of stage 1 and of Layout-and-Retouch by the colour the vanilla model gives
the same prompt (without the identifier) and seed, read by the oracle. High identity only where
the vanilla star was orange means the personalized model keeps the colour it was handed.

    python data/toy/experiments/identity_by_vanilla_colour.py --lora data/toy/lora_split600 --lambda1 0.3
"""
import argparse
import collections

from lr_tutorial.methods import apply_overrides
from lr_tutorial.models import load_models
from lr_tutorial.pipeline import LRConfig
from lr_tutorial.toy import heldout, oracle, report

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--lora", default="default", help="a LoRA folder (personalize-toy --out)")
ap.add_argument("--lambda1", type=float, default=0.2)
ap.add_argument("--prompts", default="data/prompts/heldout_personal.txt")
ap.add_argument("--limit", type=int, default=24)
ap.add_argument("--seeds", type=int, default=2)
ap.add_argument("--steps", type=int, default=25)
a = ap.parse_args()

bundle = load_models("toy", personalized=a.lora)
prompts = report.read_prompts(a.prompts)[: a.limit]
seeds = list(range(a.seeds))
flat = [p for p in prompts for _ in seeds]
vanilla = report.generate(bundle, [heldout.strip_identifier(p) for p in prompts], seeds, "vanilla",
                          steps=a.steps, progress=False)
colours = [oracle.analyze(im).colour for im in vanilla]  # prompt-major, like the method's images
cfg = apply_overrides(LRConfig(), {"layout.lambda1": a.lambda1})
for method in ("stage1", "layout_and_retouch"):
    images = report.generate_method(bundle, prompts, seeds, method, steps=a.steps, config=cfg,
                                    progress=False)
    by = collections.defaultdict(list)
    for colour, row in zip(colours, report.score(images, flat)):
        by[str(colour)].append(row["identity"])
    print(f"{method} (lambda1 {a.lambda1}): identity by the vanilla star's colour: " + "; ".join(
        f"{c} {sum(v) / len(v):.2f} ({len(v)})" for c, v in sorted(by.items())), flush=True)
