# %% [markdown]
# <<colab-badge>>
#
# # 01 · Vanilla vs personalized: the diversity problem, measured
#
# **Learning goals**
# - see what DreamBooth-style personalization does to a text-to-image model: it learns the subject
#   and forgets how to place it;
# - measure it: prompt fidelity per attribute, identity, and where the subject lands.
#
# **Prerequisites**: Python, what a diffusion model samples (noise -> image in N steps).
# Runs in about a minute on a laptop CPU with the toy backend.

# %%
# <<setup>>

# %%
import matplotlib.pyplot as plt
import numpy as np
from lr_tutorial.notebook import pick_backend, prompts_for, real_scores, reference_images, toy_only
bundle = pick_backend()  # toy without a GPU; Stable Diffusion with one (LR_BACKEND=toy|sd forces it)
# On Stable Diffusion the prompts use the bundle's subject (prompts_for), the reference photos come
# from $LR_SD_REFERENCE, and the cells that need ShapeWorld's oracle say they skip (toy_only).

# %% [markdown]
# ## The toy world
# ShapeWorld images are 64x64: one shape, with a colour, size and position, on a background.
# Our models have exactly Stable Diffusion's architecture, only tiny. The personal subject is a
# teal star, a colour no caption can name: its identifier is `sks`, its class noun `star`.
# These are its five "photos", DreamBooth style: centred and large, three on a plain backdrop,
# one at night, one on grass.

# %%
from lr_tutorial.toy import subject, world, oracle
from lr_tutorial.viz import image_grid
refs = reference_images(bundle)  # toy: subject.reference_images(); SD: the photos in $LR_SD_REFERENCE
if refs is not None:
    image_grid(refs, [f"reference {i}" for i in range(len(refs))], scale=1.4);

# %% [markdown]
# The personalized model is the vanilla model plus a LoRA fine-tuned on these five photos with
# the prompt "a sks star" (`lr_tutorial.personalize.dreambooth_lora`). `bundle.using(...)`
# switches the LoRA off (vanilla, $\epsilon$) and on (personalized, $\epsilon^*$).
#
# Below, each prompt is sampled by the vanilla model *without* the identifier ($y^{-p}$) and by
# the personalized model *with* it ($y^{p}$), from the same noise seeds.

# %%
from lr_tutorial.toy import report
from lr_tutorial.prompts import strip_identifier
prompts = prompts_for(bundle, ["a sks star on the left in the snow", "a sks star at the top on the grass",
                               "a small sks star on the right at night"])
seeds = [0, 1, 2]
rows, titles, by_mode = [], [], {"vanilla": [], "personalized": []}
for p in prompts:
    v = report.generate(bundle, [strip_identifier(p, bundle.identifier)], seeds, "vanilla", steps=25, progress=False)
    q = report.generate(bundle, [p], seeds, "personalized", steps=25, progress=False)
    rows += list(v) + list(q)
    by_mode["vanilla"] += list(v); by_mode["personalized"] += list(q)
    for img in list(v) + list(q):  # the oracle's readout: ShapeWorld images only
        f = oracle.analyze(img) if bundle.backend == "toy" else None
        titles.append(f"{f.position}/{f.background}\nid {oracle.identity_score(img, f):.2f}" if f else "")
fig = image_grid(rows, titles, ncols=6, scale=1.3)
fig.suptitle("left 3: vanilla on y^-p  |  right 3: personalized on y^p", fontsize=8);

# %% [markdown]
# ## Measuring it
# The oracle (`lr_tutorial.toy.oracle.analyze`) reads shape, colour, size, position and
# background back from any image, and `identity_score` compares the object's pattern with the
# subject's (1 = the subject, 0 = a plain object). Prompt fidelity for an attribute is the share
# of images whose attribute matches the prompt, over the prompts that state it.
#
# $$\text{fidelity}_a = \frac{1}{|P_a|}\sum_{(y, x) \in P_a} [\,\text{oracle}_a(x) = y_a\,]$$

# %%
from lr_tutorial.toy import heldout
if toy_only(bundle, "the oracle's fidelity on 24 held-out ShapeWorld prompts; CLIP / DINO scores instead"):
    test_prompts = heldout.personal_prompts()[:24]
    res = report.toy_report(bundle, test_prompts, seeds=[0, 1], steps=25, progress=False)
else:  # Stable Diffusion: T_CLIP (prompt fidelity) and I_DINO (identity) on the 18 images above
    for name, imgs in by_mode.items():
        ps = [strip_identifier(p, bundle.identifier) if name == "vanilla" else p for p in prompts for _ in seeds]
        s = real_scores(bundle, np.stack(imgs), ps, refs)
        if s:
            print(f"{name:>13}: T_CLIP {s['text']:.3f}  I_DINO "
                  + ("n/a (no reference photos)" if s["identity"] is None else f"{s['identity']:.3f}"))

# %%
if toy_only(bundle, "position / background fidelity and identity per model"):
    for name in ("vanilla", "personalized"):
        r = res[name]
        f = r["fidelity"]
        print(f"{name:>13}: position {f['position']:.2f}  background {f['background']:.2f}  "
              f"size {f['size']:.2f}  identity {r['identity']:.2f}")

# %%
# NBVAL_CHECK_OUTPUT
if toy_only(bundle, "the comparison of the two models"):  # the claims, not the digits, are checked
    v, p = res["vanilla"], res["personalized"]
    print("personalized keeps the subject (identity > vanilla + 0.2):", p["identity"] > v["identity"] + 0.2)
    print("and loses size fidelity (> 0.2 below vanilla):", p["fidelity"]["size"] < v["fidelity"]["size"] - 0.2)
    print("and position fidelity:", p["fidelity"]["position"] < v["fidelity"]["position"])
    print("and background fidelity:", p["fidelity"]["background"] < v["fidelity"]["background"])

# %% [markdown]
# The vanilla model follows the prompt but draws stars in other colours (identity near 0).
# The personalized model draws *our* star, but it has learnt "centred, large, on one of the
# photos' backdrops" together with the subject: it puts the star in the centre, draws it big
# and sometimes swaps the asked-for backdrop for a photo's, whatever the prompt says. That is the
# problem Layout-and-Retouch addresses. Where does the subject land when the prompt does not
# say?

# %%
if toy_only(bundle, "the histogram of positions the oracle reads"):
    fig, ax = plt.subplots(1, 2, figsize=(7, 2.2), sharey=True)
    for a, name in zip(ax, ("vanilla", "personalized")):
        h = res[name]["position_hist"]
        a.bar(list(h), list(h.values()), color="tab:blue" if name == "vanilla" else "tab:orange")
        a.set_title(f"{name}: position when omitted", fontsize=9)
    fig.tight_layout()

# %% [markdown]
# ## Exercise
# **1.1** Layout-and-Retouch's first stage hands the first, noisiest steps to the vanilla model,
# on the prompt *without* the identifier: the vanilla model has never seen `sks`, so it must
# read $y^{-p}$ ("a sks dog on the beach" -> "a dog on the beach"). Write
# `strip_identifier(prompt, identifier)`: drop the whole word `identifier`, keep every other word,
# single spaces. Run the cell: it checks your function, and until you write it the notebook goes
# on with the package's.

# %%
from lr_tutorial import exercises

def strip_identifier(prompt, identifier):
    # a sks star on the left -> a star on the left (hint: prompt.split())
    raise exercises.YourTurn("strip_identifier")

strip_identifier = exercises.attempt(strip_identifier)

# %% [markdown]
# Your function now stands in for the package's inside stage 1 (`exercises.plugged`). With
# $\lambda_1 = N$ every step is a vanilla step, so stage 1 gives exactly the vanilla samples of
# the grid above, as long as the vanilla model reads $y^{-p}$:

# %%
from lr_tutorial.layout import LayoutConfig, step_blended
with exercises.plugged(strip_identifier):
    stage1 = step_blended(bundle, prompts, [0] * len(prompts), LayoutConfig(lambda1=1.0, steps=25))
for p, v in zip(prompts, stage1.vanilla_prompt):
    print(f"{p!r} -> the vanilla model reads {v!r}")
image_grid(stage1.images, stage1.vanilla_prompt, scale=1.4);

# %%
# NBVAL_CHECK_OUTPUT
same = all(np.abs(img.astype(int) - by_mode["vanilla"][3 * i].astype(int)).max() <= 2  # float rounding
           for i, img in enumerate(stage1.images))
print("stage 1 with lambda1 = N and your strip_identifier gives the vanilla samples above:", same)
