"""`make demo`: the toy backend's main job, headless; figures go under outputs/demo/.

`method_comparison.png` has one row per prompt (position free first, then position stated) and
the columns of the contact sheet (lr_tutorial/toy/contact.py): vanilla (the prompt without the
identifier) | personalized | stage 1 (the layout the Layout-and-Retouch run below used, taken
from that run, not sampled again) | Layout-and-Retouch, each image titled with the oracle's
reading. `intermediates.png` shows every intermediate of the first prompt's run, and
`final_images.npy` holds the method's images.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from .models import load_models
from .toy import contact, heldout, report

DEMO_PROMPTS = [  # position free, then position stated
    "a sks star on the grass",
    "a small sks star at night",
    "a sks star on the left in the snow",
    "a small sks star at the top on the grass",
    "a sks star on the right at night",
    "a sks star at the bottom on the beach",
]
DEMO_SEED = 0
FIGURE = "method_comparison.png"


def summary(out: str | Path) -> str:
    """The two lines the demo ends with: where its figure is, and what it shows."""
    return (f"figure: {Path(out) / FIGURE}\n"
            "Each row is one prompt; the columns are the vanilla model (prompt without 'sks'), the "
            "personalized model, the layout stage 1 handed to the method, and Layout-and-Retouch, "
            "each titled with what the oracle reads (position, background, size / stated "
            "attributes met / identity).")


def run(out: str | Path, steps: int = 50, guidance: float | None = None,
        overwrite: bool = False, progress: bool = True) -> Path:
    """Render the figures into `out`, written whole at the end (files.atomic_folder): an
    existing demo output is replaced only with `overwrite`, and a folder holding other files
    is refused before any model loads. Returns the folder (its figure: `out / FIGURE`)."""
    matplotlib.use("Agg")
    from tqdm.auto import tqdm

    from .files import atomic_folder, check_output
    from .layout import LayoutConfig
    from .pipeline import LayoutAndRetouch, LRConfig
    from .viz import result_panel

    out = check_output(out, overwrite, "demo", "the output path")
    bar = tqdm(total=5, desc="demo", disable=not progress)
    bar.set_postfix_str("loading the toy models")
    bundle = load_models("toy")
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=steps, guidance=guidance)))
    prompts, seeds = list(DEMO_PROMPTS), [DEMO_SEED]
    bar.update()
    bar.set_postfix_str("vanilla model")
    common = dict(steps=steps, guidance=guidance, progress=False)
    columns = {"vanilla": report.generate(bundle, [heldout.strip_identifier(p) for p in prompts],
                                          seeds, "vanilla", **common)}
    bar.update()
    bar.set_postfix_str("personalized model")
    columns["personalized"] = report.generate(bundle, prompts, seeds, "personalized", **common)
    bar.update()
    bar.set_postfix_str("Layout-and-Retouch")
    result = lr(prompts, seed=[DEMO_SEED] * len(prompts))
    columns["stage 1"] = result.layout.images  # the layout this very run used
    columns["Layout-and-Retouch"] = result.images
    bar.update()
    bar.set_postfix_str("figures")
    with atomic_folder(out, overwrite, what="demo") as tmp:
        contact.draw(columns, prompts, tmp / FIGURE)
        result_panel(result, bundle, 0).savefig(tmp / "intermediates.png", dpi=110)
        np.save(tmp / "final_images.npy", result.images)
    bar.update()
    bar.close()
    return out
