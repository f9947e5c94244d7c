"""Layout-and-Retouch settings against issue 3's acceptance bars, on a quick prompt subset.

For each setting (dotted LRConfig overrides as JSON, e.g. '{"layout.lambda1": 0.6,
"start_step": 0}'), runs stage 1 and the full method on the first --limit held-out personal
prompts x --seeds seeds and prints fidelity (mean over stated attributes), identity and the
per-attribute fidelity, next to the vanilla and personalized rows and the two 90% bars.

    python data/toy/experiments/acceptance_sweep.py '{}' '{"layout.lambda1": 0.6, "start_step": 0}'
    python data/toy/experiments/acceptance_sweep.py '{}' --lora DIR --stage1   # another LoRA
"""
import argparse
import json

from lr_tutorial.methods import apply_overrides
from lr_tutorial.models import load_models
from lr_tutorial.pipeline import LRConfig
from lr_tutorial.toy import heldout, report

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("settings", nargs="+", help="JSON dicts of dotted LRConfig overrides")
ap.add_argument("--prompts", default="data/prompts/heldout_personal.txt")
ap.add_argument("--limit", type=int, default=24)
ap.add_argument("--seeds", type=int, default=2)
ap.add_argument("--steps", type=int, default=25)
ap.add_argument("--stage1", action="store_true", help="also score stage 1 of each setting")
ap.add_argument("--lora", default="default", help="a LoRA folder (personalize-toy --out)")
ap.add_argument("--grid", default=None, help="save the first setting's images here (PNG)")
ap.add_argument("--skip-baselines", action="store_true", help="skip the vanilla and "
                "personalized rows (stage 2 changes do not touch them) and so the bars")
ap.add_argument("--by", action="store_true", help="also print each row's identity by the "
                "background and size its prompts state")
a = ap.parse_args()

bundle = load_models("toy", personalized=a.lora)
prompts = report.read_prompts(a.prompts)[: a.limit]
seeds = list(range(a.seeds))
flat = [p for p in prompts for _ in seeds]


def line(name, rows):
    s = report.summarize(rows)
    f = " ".join(f"{k[:4]} {v:.2f}" for k, v in s["fidelity"].items())
    spread = (f" | positions {s['position_classes']} ({s['centroid_spread_px']:.1f} px)"
              if s.get("centroid_spread_px") is not None else "")
    print(f"{name:58s} fidelity {s['fidelity_mean']:.3f} identity {s['identity']:.3f} | {f}"
          f"{spread}", flush=True)
    if a.by:
        print("    identity by " + "; ".join(
            f"{k}: " + ", ".join(f"{g} {v:.2f}" for g, v in groups.items())
            for k, groups in report.identity_by(rows).items()))
    return s


if not a.skip_baselines:
    van = line("vanilla", report.score(report.generate(
        bundle, [heldout.strip_identifier(p) for p in prompts], seeds, "vanilla", steps=a.steps,
        progress=False), [heldout.strip_identifier(p) for p in flat]))
    per = line("personalized", report.score(report.generate(
        bundle, prompts, seeds, "personalized", steps=a.steps, progress=False), flat))
    print(f"bars: fidelity >= {0.9 * van['fidelity_mean']:.3f}, "
          f"identity >= {0.9 * per['identity']:.3f}")
for i, setting in enumerate(a.settings):
    cfg = apply_overrides(LRConfig(), json.loads(setting))
    methods = ("stage1", "layout_and_retouch") if a.stage1 else ("layout_and_retouch",)
    for m in methods:
        imgs = report.generate_method(bundle, prompts, seeds, m, steps=a.steps, config=cfg,
                                      progress=False)
        line(f"{m[:6]} {setting}", report.score(imgs, flat))
        if a.grid and i == 0 and m == "layout_and_retouch":
            import numpy as np
            from PIL import Image
            n = len(seeds) * 8  # images a row; the last row is padded with white
            imgs = list(imgs) + [np.full_like(imgs[0], 255)] * (-len(imgs) % n)
            Image.fromarray(np.concatenate([np.concatenate(imgs[j:j + n], 1)
                                            for j in range(0, len(imgs), n)], 0)).save(a.grid)
