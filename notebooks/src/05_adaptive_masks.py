# %% [markdown]
# <<colab-badge>>
#
# # 05 · Adaptive mask blending
#
# **Learning goals**
# - build the subject mask from two imperfect sources: the class token's cross-attention and a
#   segmenter (Segment-Anything on Stable Diffusion; a toy segmenter with SAM's interface here);
# - fuse them with the signed distance transform; blend latents inside the mask.
#
# **Prerequisites**: notebooks 02 and 04. About a minute on a CPU.

# %%
# <<setup>>

# %%
import numpy as np
from lr_tutorial import masks, retouch
from lr_tutorial.notebook import (have_references, pick_backend, prompts_for, reference_images,
                                  show_source, toy_only)
from lr_tutorial.viz import image_grid, overlay
bundle = pick_backend()  # toy without a GPU; Stable Diffusion with one (LR_BACKEND=toy|sd forces it)
refs = reference_images(bundle)  # toy: the star's five photos; SD: the photos in $LR_SD_REFERENCE

# %%
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.layout import LayoutConfig
lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=25)))  # SD: no segmenter, attention-only S
if have_references(refs, "a Layout-and-Retouch run, and every cell that reads its masks"):
    result = lr(prompts_for(bundle, "a big sks star on the right at night"), refs, seed=3)
    ctx = result.masks.context[0]
    x_c = result.layout.images[0]

# %% [markdown]
# ## Two sources, one mask
# 1. $A$: the class token's cross-attention, averaged over heads, layers and a window of steps,
#    min-max normalized (`MaskConfig.attention_fractions`, `attention_window`).
# 2. $S$: the segmenter's mask, prompted from $A$: a box around $A \ge \tau_{lo}$, positive points
#    at its peaks, negative points at its lowest values (`masks.segmenter_prompts`).
# 3. Fusion:
# $$B = (A \ge \tau_{lo}) \wedge S,\qquad M = \max\Big(\mathrm{clip}\big(\tfrac12 + \tfrac{\mathrm{sd}(B)}{2w}, 0, 1\big),\ [A \ge \tau_{hi}]\Big)$$
# with $\mathrm{sd}$ the signed Euclidean distance to $B$'s boundary (positive inside). The
# recipe for one image, `masks.subject_mask`: normalize $A$, prompt the segmenter, fuse. The
# feather and the fusion itself (`masks.fuse`) are exercises 5.1 and 5.2 below.

# %%
show_source(masks.subject_mask)

# %%
from lr_tutorial.widgets import MaskExplorer
explorer = MaskExplorer(x_c, ctx.attention, lr.segmenter) if refs is not None else None
explorer.widget() if explorer else None

# %%
if explorer:
    explorer.to_figure();

# %% [markdown]
# ## The feather
# A hard mask makes a seam when latents are blended; the signed distance ramp gives a soft
# boundary of width $w$ latent pixels.

# %%
import matplotlib.pyplot as plt
b = np.zeros((16, 16), bool); b[4:12, 5:11] = True
fig, ax = plt.subplots(1, 4, figsize=(8, 2))
for a, w in zip(ax, [0, 0.5, 1, 2]):
    a.imshow(masks.feather(b, w), vmin=0, vmax=1, cmap="gray"); a.set_title(f"w = {w}", fontsize=8); a.axis("off")
fig.tight_layout()

# %% [markdown]
# ## Blending, and the per-step option
# For $k < \lambda_3$ the target keeps the context outside the mask:
# $z^t_{k+1} \leftarrow M_k z^t_{k+1} + (1 - M_k) z^c_{k+1}$, in `lr_tutorial/retouch.py`:

# %%
show_source(retouch.latent_blend)

# %% [markdown]
# The paper's "adaptive mask
# blending" is the fusion above: attention and segmenter, each fixing the other's errors.
# `MaskConfig(adaptive=True)` adds our own per-step update: $M_k$ grows with the target's
# class-token attention, $M_{k+1} = \max(M^c, \mathrm{feather}(A^t_{\le k} \ge \tau_{lo}))$, so that
# a subject that changes shape while being retouched is not clipped (`adaptive_reach` bounds how
# far beyond the context's object it may grow). It is off by default: the target's attention has
# no segmenter to clean it, and on the toy the update cost both identity and fidelity
# (docs/results.md, the ablation "per-step mask update"). Here is what it does, against the
# fixed mask:

# %%
if refs is not None:
    from lr_tutorial.masks import MaskConfig
    grow = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=25), mask=MaskConfig(adaptive=True)))
    grown = grow(prompts_for(bundle, "a big sks star on the right at night"), refs, seed=3)
    k0 = grow.start_step()  # the target leaves the context here; per_step[i] is the mask of step k0 + i
    per = grown.masks.per_step[:, 0]  # (N - k0, h, w)
    ks = [0, len(per) // 3, 2 * len(per) // 3, len(per) - 1]
    image_grid([overlay(grown.images[0], per[i]) for i in ks]
               + [grown.images[0], overlay(result.images[0], result.masks.per_step[-1, 0])],
               [f"adaptive M at k={k0 + i}" for i in ks] + ["adaptive result", "fixed M (default)"],
               scale=1.3);

# %%
# NBVAL_CHECK_OUTPUT
if have_references(refs, "the mask areas"):
    print(f"adaptive mask area at k={k0}: {per[0].mean():.2f}, at the last step: {per[-1].mean():.2f}; "
          f"fixed: {result.masks.per_step[-1, 0].mean():.2f} (fraction of the latent)")

# %% [markdown]
# How close do the masks come to the object? The intersection over union (IoU) with the object
# mask the oracle reads from the layout image, for the attention support alone and the fused mask:

# %%
# NBVAL_CHECK_OUTPUT
from lr_tutorial.toy import oracle
def iou(a, b):
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union
if toy_only(bundle, "the IoU with the object mask the oracle reads"):
    truth = masks.resize(oracle.analyze(x_c).mask.astype(np.float32), 16) >= 0.5
    print(f"attention only: {iou(ctx.attention >= 0.3, truth):.2f}   fused: {iou(ctx.mask >= 0.5, truth):.2f}")

# %% [markdown]
# ## Exercises
# **5.1** Write the feather: from a boolean mask `binary` (h, w) and a width $w$, the soft mask
# $\mathrm{clip}(\tfrac12 + \mathrm{sd} / (2w), 0, 1)$, with $\mathrm{sd}$ the signed distance to
# the boundary, positive inside, each side's distance shifted by $\tfrac12$ to lie on the boundary.
# A width of 0, an empty or a full mask give the binary mask back.

# %%
from scipy import ndimage
from lr_tutorial import exercises

def feather(binary, width):
    # ndimage.distance_transform_edt(binary): each pixel's distance to the nearest False pixel
    raise exercises.YourTurn("feather")

feather = exercises.attempt(feather)

# %% [markdown]
# **5.2** Write the fusion, the equation at the top: $B = (A \ge \tau_{lo}) \wedge S$, then
# $M = \max(\mathrm{feather}(B, w), [A \ge \tau_{hi}])$, for an attention map `attn` ($A$, (h, w),
# normalized) and a segmenter mask `seg` ($S$, bool, the same size). Use your `feather`.

# %%
def fuse(attn, seg, tau_lo, tau_hi, width):
    raise exercises.YourTurn("fuse")

fuse = exercises.attempt(fuse)

# %% [markdown]
# Plugged in together (`exercises.plugged`), your feather and fusion make every mask of a new
# run of the method, the reference's $M^r$ and the context's $M^c$:

# %%
if have_references(refs, "the method with your masks"):
    with exercises.plugged(feather), exercises.plugged(fuse):
        yours = LayoutAndRetouch(bundle, lr.config)(prompts_for(bundle, "a big sks star on the right at night"),
                                                     refs, seed=3)
    mine = yours.masks.context[0]
    image_grid([overlay(x_c, mine.mask), overlay(x_c, ctx.mask), yours.images[0], result.images[0]],
               ["your M^c", "the package's M^c", "with your masks", "the package's"], scale=1.5);

# %%
# NBVAL_CHECK_OUTPUT
if have_references(refs, "the comparison with the package's masks"):
    print("your feather and fusion give the package's mask:", bool(np.allclose(mine.mask, ctx.mask, atol=1e-3)))
    print("and the method's image:", np.abs(yours.images[0].astype(int) - result.images[0].astype(int)).max() <= 2)

# %% [markdown]
# The package's feather and fusion, the ones yours stood in for. `masks.feather` takes one
# (h, w) map and calls `feather_maps`, which feathers a batch of maps on their own device (a GPU
# during stage 2) with an exact signed distance of its own, no round trip through SciPy:

# %%
show_source(masks.feather_maps)

# %%
show_source(masks.fuse)
