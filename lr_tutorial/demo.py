"""`make demo`: the toy backend's main job, headless; figures go under outputs/demo/.

For several prompts and seeds: reference photo | personalized only | vanilla layout (stage 1
with lambda1 = N, i.e. the vanilla model on y^-p) | Layout-and-Retouch, with the oracle's
scores in the titles; plus one panel of every intermediate of the first run.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from .models import load_models
from .toy import heldout, oracle, report, world

DEMO_PROMPTS = [
    "a sks star on the left in the snow",
    "a small sks star at the top on the grass",
    "a sks star on the right at night",
    "a sks star at the bottom on the beach",
]
DEMO_SEEDS = [0, 1]


def _title(img, prompt: str, label: str) -> str:
    facts = oracle.analyze(img)
    match = facts.matches(world.parse_prompt(prompt))
    return (f"{label}\n{facts.position}/{facts.background} "
            f"fid {sum(match.values())}/{len(match)} id {oracle.identity_score(img, facts):.2f}")


def run(out: Path, steps: int = 50, guidance: float | None = None) -> Path:
    matplotlib.use("Agg")
    from .layout import LayoutConfig
    from .pipeline import LayoutAndRetouch, LRConfig
    from .viz import image_grid, result_panel

    out.mkdir(parents=True, exist_ok=True)
    bundle = load_models("toy")
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=steps, guidance=guidance)))
    ref = lr.reference().image
    prompts = [p for p in DEMO_PROMPTS for _ in DEMO_SEEDS]
    seeds = [s for _ in DEMO_PROMPTS for s in DEMO_SEEDS]
    personal = report.generate(bundle, DEMO_PROMPTS, DEMO_SEEDS, "personalized", steps=steps,
                               guidance=guidance, progress=False)
    vanilla = report.generate(bundle, [heldout.strip_identifier(p) for p in DEMO_PROMPTS],
                              DEMO_SEEDS, "vanilla", steps=steps, guidance=guidance, progress=False)
    result = lr(prompts, seed=seeds)
    images, titles = [], []
    for i, p in enumerate(prompts):
        images += [ref, personal[i], vanilla[i], result.images[i]]
        titles += [f"reference\n{p}", _title(personal[i], p, "personalized only"),
                   _title(vanilla[i], heldout.strip_identifier(p), "vanilla layout"),
                   _title(result.images[i], p, "Layout-and-Retouch")]
    fig = image_grid(images, titles, ncols=4, scale=1.9,
                     suptitle="titles: oracle position/background, prompt fidelity, identity")
    fig.savefig(out / "method_comparison.png", dpi=110)
    result_panel(result, bundle, 0).savefig(out / "intermediates.png", dpi=110)
    np.save(out / "final_images.npy", result.images)
    return out
