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


def run(out: str | Path, steps: int = 50, guidance: float | None = None,
        overwrite: bool = False, progress: bool = True) -> Path:
    """Render the figures into `out`, written whole at the end (files.atomic_folder): an
    existing demo output is replaced only with `overwrite`, and a folder holding other files
    is refused before any model loads."""
    matplotlib.use("Agg")
    from tqdm.auto import tqdm

    from .files import atomic_folder, check_output
    from .layout import LayoutConfig
    from .pipeline import LayoutAndRetouch, LRConfig
    from .viz import image_grid, result_panel

    out = check_output(out, overwrite, "demo", "the output path")
    bar = tqdm(total=4, desc="demo", disable=not progress)
    bundle = load_models("toy")
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=steps, guidance=guidance)))
    ref = lr.reference().image
    prompts = [p for p in DEMO_PROMPTS for _ in DEMO_SEEDS]
    seeds = [s for _ in DEMO_PROMPTS for s in DEMO_SEEDS]
    bar.set_postfix_str("personalized model")
    personal = report.generate(bundle, DEMO_PROMPTS, DEMO_SEEDS, "personalized", steps=steps,
                               guidance=guidance, progress=False)
    bar.update()
    bar.set_postfix_str("vanilla model")
    vanilla = report.generate(bundle, [heldout.strip_identifier(p) for p in DEMO_PROMPTS],
                              DEMO_SEEDS, "vanilla", steps=steps, guidance=guidance, progress=False)
    bar.update()
    bar.set_postfix_str("Layout-and-Retouch")
    result = lr(prompts, seed=seeds)
    bar.update()
    bar.set_postfix_str("figures")
    images, titles = [], []
    for i, p in enumerate(prompts):
        images += [ref, personal[i], vanilla[i], result.images[i]]
        titles += [f"reference\n{p}", _title(personal[i], p, "personalized only"),
                   _title(vanilla[i], heldout.strip_identifier(p), "vanilla layout"),
                   _title(result.images[i], p, "Layout-and-Retouch")]
    fig = image_grid(images, titles, ncols=4, scale=1.9,
                     suptitle="titles: oracle position/background, prompt fidelity, identity")
    with atomic_folder(out, overwrite, what="demo") as tmp:
        fig.savefig(tmp / "method_comparison.png", dpi=110)
        result_panel(result, bundle, 0).savefig(tmp / "intermediates.png", dpi=110)
        np.save(tmp / "final_images.npy", result.images)
    bar.update()
    bar.close()
    return out
