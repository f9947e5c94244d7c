"""How much layout does stage 1 give back, and at what cost in identity, as lambda1 grows?
(README, "Results (toy backend)")

For each lambda1 (a fraction of the steps), `toy.report.toy_report` on the first 38 held-out
personal prompts x 2 seeds, 25 steps, the toy's guidance, with the stage-1 and
Layout-and-Retouch rows; prints fidelity, identity and the position classes of every row.

    python data/toy/experiments/lambda1_check.py 0.4,0.6
"""
import sys

from lr_tutorial import load_models
from lr_tutorial.layout import LayoutConfig
from lr_tutorial.pipeline import LRConfig
from lr_tutorial.toy import report

if len(sys.argv) != 2:
    sys.exit(__doc__)
bundle = load_models("toy")
prompts = report.read_prompts("data/prompts/heldout_personal.txt")[:38]
for lambda1 in [float(x) for x in sys.argv[1].split(",")]:
    r = report.toy_report(bundle, prompts, [0, 1], steps=25, progress=False,
                          methods=("stage1", "layout_and_retouch"),
                          config=LRConfig(layout=LayoutConfig(lambda1=lambda1)))
    for row in ("vanilla", "personalized", "stage1", "layout_and_retouch"):
        x = r[row]
        print(f"lambda1 {lambda1} {row:<20} fidelity {x['fidelity_mean']:.3f} {x['fidelity']} "
              f"identity {x['identity']:.3f} positions {x['position_classes']} "
              f"(max share {x['position_max_share']})", flush=True)
