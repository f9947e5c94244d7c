# %% [markdown]
# <<colab-badge>>
#
# # 02 · Inside the UNet: cross- and self-attention, captured and scrubbed
#
# **Learning goals**
# - find every attention layer of a Stable Diffusion UNet by its module path, and its resolution;
# - record attention maps with an explicit capture spec, knowing the memory cost *before* the run;
# - scrub a run step by step: latent, predicted $x_0$, the attention of any token, layer and head.
#
# **Prerequisites**: notebook 01; scaled dot-product attention. About a minute on a CPU.

# %%
# <<setup>>

# %%
import numpy as np
from lr_tutorial import attention, sampling
from lr_tutorial.notebook import have_references, pick_backend, prompts_for, reference_images
bundle = pick_backend()  # toy without a GPU; Stable Diffusion with one (LR_BACKEND=toy|sd forces it)
R = min(16, bundle.latent_size)  # the side of the maps we look at: the toy's latent, one of SD's resolutions

# %% [markdown]
# ## Where attention lives
# Each transformer block of the UNet has a self-attention `attn1` (queries, keys and values all
# from the image) and a cross-attention `attn2` (keys and values from the text encoder's tokens).
# diffusers names every one by its module path; `unet.attn_processors` lists them, and
# `unet.set_attn_processor({path: processor})` lets us replace the computation of any of them.
# No call counting, no hard-coded layer totals: a path is an address.

# %%
# NBVAL_CHECK_OUTPUT
for path in attention.attention_layers(bundle.unet):
    print(f"{attention.layer_resolution(bundle.unet, path):>3} x{attention.layer_resolution(bundle.unet, path):<3} {path}")

# %% [markdown]
# ## Capturing cross-attention
# For a query pixel $i$ and token $j$, cross-attention weights are
# $$A_{ij} = \mathrm{softmax}_j\!\left(\frac{q_i \cdot k_j}{\sqrt d}\right),\quad q = W_q h,\; k = W_k\, \mathrm{text}.$$
# Column $j$ of $A$, reshaped to the layer's grid, is the map of where token $j$ is drawn.
# A `CaptureSpec` says what to keep: layers (glob patterns or resolutions), steps, tokens, heads
# averaged or kept. `spec.estimate` gives the bytes before the run; layers not captured keep
# the fused attention kernel.

# %%
# NBVAL_CHECK_OUTPUT
prompt = prompts_for(bundle, "a sks star on the left in the snow")  # SD: the bundle's identifier and class noun
spec = attention.CaptureSpec(kind="cross", heads="mean")
steps = 25
# given the bundle, the estimate knows the text length (cross-attention's keys: 16 toy, 77 SD)
print(f"estimate before the run: {spec.estimate(bundle, steps, batch=1) / 1e6:.2f} MB")
with bundle.using("personalized"), attention.capture(bundle.unet, spec) as store:
    z, traj = sampling.sample(bundle, [prompt], [0], steps=steps, observers=(store,))
print(f"stored after the run:    {store.nbytes / 1e6:.2f} MB in {len(store.maps)} maps")

# %% [markdown]
# The lines that do it (`lr_tutorial/attention.py`, `CaptureProcessor`): project, softmax, store,
# then finish the layer exactly as diffusers would:
# ```python
# q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
# probs = attention_probs(attn, q, k)          # (B, heads, HW, tokens)
# store.add(self.path, probs)                  # heads averaged, tokens selected, CPU, fp16
# return output(attn, probs @ v, hidden_states)
# ```

# %%
from lr_tutorial.viz import image_grid, overlay
from lr_tutorial.prompts import token_index
img = sampling.decode(bundle, z)[0]
tokens = bundle.tokenizer.convert_ids_to_tokens(bundle.tokenizer(prompt).input_ids)
panels, titles = [img], ["image"]
for j, tok in enumerate(tokens[1:-1], start=1):
    m = store.cross_map(j, R, steps=range(steps // 2, steps)).numpy()[0]
    panels.append(overlay(img, (m - m.min()) / (m.max() - m.min() + 1e-8), (255, 200, 0), 0.7))
    titles.append(tok)
image_grid(panels, titles, ncols=len(panels), scale=1.3);

# %% [markdown]
# The class noun `star` lights up the object; the identifier `sks` does too (it was trained
# with it); words like `left` or `snow` spread over the background. Stage 2's masks start
# from the class token's map.
#
# ## Self-attention
# Self-attention maps are $HW \times HW$: for one query pixel, where in the image does it look?
# They carry *structure*, which is why stage 2 swaps them. We capture them at one resolution only
# (their size grows with the fourth power of the side).

# %%
spec_self = attention.CaptureSpec(kind="self", resolutions=[R], steps=[steps - 5])
print(f"self-attention estimate: {spec_self.estimate(bundle, steps) / 1e6:.2f} MB")
with bundle.using("personalized"), attention.capture(bundle.unet, spec_self) as sstore:
    sampling.sample(bundle, [prompt], [0], steps=steps, observers=(sstore,))
layer = sstore.layers()[-1]
sa = sstore.maps[(layer, steps - 5)].float()[0]  # (HW, HW)
# a pixel on the object: where the class token's cross-attention (R x R) peaks
q = int(store.cross_map(token_index(bundle.tokenizer, prompt, bundle.class_noun), R).numpy()[0].argmax())
image_grid([img, overlay(img, sa[q].view(R, R).numpy() / sa[q].max().item(), (0, 120, 255), 0.8)],
           ["image", f"where one object pixel looks\n{layer.split('.transformer')[0]}"], scale=1.8);

# %% [markdown]
# ## Scrubbing a whole run
# `TimestepScrubber` shows, for every denoising step and every branch of Layout-and-Retouch
# (reference, context, target), the latent, the predicted $x_0$, the cross-attention overlay of
# a chosen token / layer / head, and the target's mask. Frames are precomputed, so the slider is
# instant. Where no widget front end runs (GitHub, nbviewer), `to_figure()` draws the same frames.

# %%
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.layout import LayoutConfig
from lr_tutorial.widgets import TimestepScrubber
refs = reference_images(bundle)  # toy: the star's photos; SD: the photos in $LR_SD_REFERENCE
if have_references(refs, "the scrubber over a Layout-and-Retouch run"):
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=25)))
    # every cross-attention layer on the toy; on SD only the R x R ones (all of them: gigabytes)
    res_ = None if bundle.backend == "toy" else [R]
    result = lr(prompt, refs, seed=0, capture=attention.CaptureSpec(kind="cross", heads="all", resolutions=res_))
    scrubber = TimestepScrubber(result, bundle)
scrubber.widget() if refs is not None else None

# %%
if have_references(refs, "the scrubber's frames"):
    scrubber.to_figure(steps=[0, 5, 10, 15, 20, 24]);

# %% [markdown]
# ## Exercise
# **2.1** Every map above is a row of attention weights. Write the function that computes them,
# `attention_probs(q, k, scale)`: queries `q` of shape (B, heads, Nq, d) and keys `k` of shape
# (B, heads, Nk, d) give the weights (B, heads, Nq, Nk), softmax over the keys of the scaled
# dot products, $\mathrm{softmax}_j(q_i \cdot k_j \cdot \text{scale})$ with scale $= 1/\sqrt d$.

# %%
from lr_tutorial import exercises

def attention_probs(q, k, scale):
    # (B, heads, Nq, d), (B, heads, Nk, d) -> (B, heads, Nq, Nk); each row sums to 1
    raise exercises.YourTurn("attention_probs")

attention_probs = exercises.attempt(attention_probs)

# %% [markdown]
# Plugged in (`exercises.plugged`), your function computes the weights every capture stores, and
# stage 2's subject masks start from them. The same run as above, captured with your weights:

# %%
from lr_tutorial.masks import normalize
with exercises.plugged(attention_probs), bundle.using("personalized"), \
        attention.capture(bundle.unet, spec) as mine:
    sampling.sample(bundle, [prompt], [0], steps=steps, observers=(mine,))
cls = token_index(bundle.tokenizer, prompt, bundle.class_noun)
yours, package = (normalize(s.cross_map(cls, R).numpy()[0]) for s in (mine, store))
image_grid([overlay(img, yours, (255, 200, 0), 0.7), overlay(img, package, (255, 200, 0), 0.7)],
           [f"'{bundle.class_noun}', your weights", f"'{bundle.class_noun}', the package's"], scale=1.8);

# %%
# NBVAL_CHECK_OUTPUT
print("your attention weights give the class token's map captured above:",
      bool(np.allclose(yours, package, atol=1e-2)))
