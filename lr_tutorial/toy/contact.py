"""The contact sheet: the method against its baselines, image by image, read by the oracle.

Rows are prompts (those that leave the position free first, then those that state one); columns
are vanilla (the prompt without the identifier) | personalized | stage 1 (the layout the method
used) | Layout-and-Retouch. Each image is titled with what the oracle reads (position,
background, size), how many of the prompt's stated attributes it meets, and its identity.

    python -m lr_tutorial toy-report --contact-sheet data/results/shapeworld/contact_sheet.png
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import heldout, oracle, report, world

COLUMNS = ("vanilla", "personalized", "stage 1", "Layout-and-Retouch")
SHEET_PROMPTS = (  # position free (rows 1-3), then position stated (rows 4-6)
    "a sks star on the grass", "a small sks star at night", "a sks star in the snow",
    "a sks star on the left on the beach", "a small sks star at the top in the snow",
    "a big sks star on the right at night",
)


def label(image: np.ndarray, prompt: str) -> str:
    """'left, snow, big\\n3/3 stated, id 0.82': the oracle's reading of one image."""
    facts = oracle.analyze(image)
    match = facts.matches(world.parse_prompt(prompt))
    where = ", ".join(str(getattr(facts, a)) for a in ("position", "background", "size"))
    return (f"{where}\n{sum(match.values())}/{len(match)} stated, "
            f"id {oracle.identity_score(image, facts):.2f}")


def sheet_images(bundle, prompts, seed: int = 0, *, steps: int = 50, config=None) -> dict:
    """{column: (len(prompts), 64, 64, 3) uint8} for the four columns, one seed per prompt."""
    seeds = [seed]
    plain = [heldout.strip_identifier(p) for p in prompts]
    common = dict(steps=steps, progress=False)
    return {
        "vanilla": report.generate(bundle, plain, seeds, "vanilla", **common),
        "personalized": report.generate(bundle, list(prompts), seeds, "personalized", **common),
        "stage 1": report.generate_method(bundle, list(prompts), seeds, "stage1", config=config,
                                          **common),
        "Layout-and-Retouch": report.generate_method(bundle, list(prompts), seeds,
                                                     "layout_and_retouch", config=config, **common),
    }


def draw(columns: dict, prompts, path: str | Path) -> Path:
    """Write the sheet as a PNG (rows: prompts; columns: COLUMNS)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(prompts)
    fig, axes = plt.subplots(n, len(COLUMNS), figsize=(2.0 * len(COLUMNS) + 1.6, 2.15 * n),
                             squeeze=False)
    for r, prompt in enumerate(prompts):
        for c, name in enumerate(COLUMNS):
            ax, img = axes[r, c], columns[name][r]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            shown = heldout.strip_identifier(prompt) if name == "vanilla" else prompt
            ax.set_title(label(img, shown), fontsize=6.5)
            if r == 0:
                ax.text(0.5, 1.32, name, transform=ax.transAxes, ha="center", fontsize=9,
                        fontweight="bold")
        axes[r, 0].set_ylabel(prompt.replace(" on the ", "\non the ").replace(" at the ", "\nat the "),
                              fontsize=7)
    fig.suptitle("oracle reading: position, background, size / stated attributes met / identity",
                 fontsize=8, y=0.995)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def contact_sheet(bundle, path, prompts=SHEET_PROMPTS, seed: int = 0, *, steps: int = 50,
                  config=None) -> Path:
    """Sample the four columns and draw them (about a minute on the toy at 50 steps)."""
    return draw(sheet_images(bundle, prompts, seed, steps=steps, config=config), prompts, path)
