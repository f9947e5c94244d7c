"""`make demo`: the toy backend's main job, headless; figures go under outputs/.

For now (foundation): vanilla vs personalized samples on several prompts and seeds, oracle
scores in the titles: the diversity problem the method fixes, visible at a glance.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

from .models import load_models
from .toy import heldout, oracle, report, world

DEMO_PROMPTS = [
    "a sks star on the left in the snow",
    "a small sks star at the top on the grass",
    "a sks star on the right at night",
    "a sks star at the bottom on the beach",
]
DEMO_SEEDS = [0, 1, 2]


def _title(img, prompt: str) -> str:
    facts = oracle.analyze(img)
    match = facts.matches(world.parse_prompt(prompt))
    ok = sum(match.values())
    return f"{facts.position}/{facts.background}\nfid {ok}/{len(match)} id {oracle.identity_score(img, facts):.2f}"


def run(out: Path, steps: int = 50, guidance: float = 7.5) -> Path:
    matplotlib.use("Agg")
    from .viz import image_grid

    out.mkdir(parents=True, exist_ok=True)
    bundle = load_models("toy")
    images, titles, labels = [], [], []
    for prompt in DEMO_PROMPTS:
        for mode, p in (("vanilla", heldout.strip_identifier(prompt)), ("personalized", prompt)):
            imgs = report.generate(bundle, [p], DEMO_SEEDS, mode, steps=steps, guidance=guidance,
                                   progress=False)
            images += list(imgs)
            titles += [_title(im, p) for im in imgs]
            labels.append(f"{mode}\n{p}")
    fig = image_grid(images, titles, ncols=len(DEMO_SEEDS), row_labels=None,
                     suptitle="vanilla (prompt without sks) vs personalized (with sks); "
                              "titles: oracle position/background, prompt fidelity, identity")
    for r, label in enumerate(labels):
        fig.axes[r * len(DEMO_SEEDS)].set_ylabel(label, fontsize=5)
    path = out / "vanilla_vs_personalized.png"
    fig.savefig(path, dpi=130)
    return out
