# %% [markdown]
# <<colab-badge>>
#
# # 07 · Bring your own subject
#
# **Learning goals**
# - personalize a model on a new subject with DreamBooth-LoRA (`lr_tutorial.personalize`): the
#   toy model on a CPU in about a minute, Stable Diffusion on a Colab GPU with the same function;
# - run Layout-and-Retouch on it.
#
# **Prerequisites**: notebooks 01-06. About two minutes on a CPU (the Stable Diffusion cells are
# skipped without a GPU and downloaded weights).

# %%
# <<setup>>

# %%
# Backend: the toy cells run everywhere (CPU); the Stable Diffusion cell at the end runs only
# with a GPU and downloaded weights, and says so when it skips.
import time
import numpy as np
import torch
from lr_tutorial import load_models
from lr_tutorial.toy import world, oracle
from lr_tutorial.viz import image_grid
SD_BASE = os.environ.get("LR_SD_BASE", "sd15")  # a folder, or a hub id when LR_SD_BASE names one
use_sd = torch.cuda.is_available() and (os.path.isdir(SD_BASE) or "LR_SD_BASE" in os.environ)
print("Stable Diffusion cell: " + ("will run on the GPU" if use_sd else
      "skipped (needs a GPU and weights in ./sd15 or $LR_SD_BASE)") + "; toy cells: CPU")

# %% [markdown]
# ## A new subject: an olive circle, identifier `zwx`
# Five DreamBooth-style photos: centred, large, plain backdrop, a little jitter. Olive is in no
# caption, like the star's teal.

# %%
pattern = world.Pattern(body=(130, 130, 20), core=(130, 130, 20))  # one colour, like the star
rng = np.random.default_rng(7)
photos = np.stack([world.render(world.with_attrs(world.reference_scene(rng), shape="circle",
                                                 pattern=pattern)) for _ in range(5)])
image_grid(photos, [f"photo {i}" for i in range(5)], scale=1.3);

# %% [markdown]
# ## DreamBooth-LoRA on a CPU
# $$\mathcal L = \big\| \epsilon - \epsilon^*_\theta(z_t, t, \text{"a zwx circle"}) \big\|^2,\quad z_t = \sqrt{\bar\alpha_t}\,E(x) + \sqrt{1-\bar\alpha_t}\,\epsilon$$
# Only the LoRA matrices train (`peft`; on the UNet's attention, feed-forward and convolution
# layers: the shipped star's recipe `toy_recipe()`, here for 300 of its 4,000 steps), the base
# stays frozen.

# %%
from lr_tutorial.personalize import DreamBoothConfig, dreambooth_lora, toy_recipe
bundle = load_models("toy", personalized=None)
bundle.identifier, bundle.class_noun = "zwx", "circle"
cfg = toy_recipe(instance_prompt="a zwx circle", steps=300, seed=0)
t0 = time.time()
dreambooth_lora(bundle, photos, cfg, progress=False)
print(f"trained {cfg.steps} LoRA steps in {time.time() - t0:.0f} s")

# %%
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.layout import LayoutConfig
from lr_tutorial.toy import report
lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=25)))
prompts = ["a zwx circle on the left in the snow", "a zwx circle at the top at night"]
per = report.generate(bundle, prompts, [0, 1], "personalized", steps=25, progress=False)
ours = lr(prompts * 2, photos, seed=[0, 0, 1, 1]).images
image_grid(list(per) + list(ours), ["personalized"] * 4 + ["Layout-and-Retouch"] * 4, ncols=4, scale=1.3);

# %%
# NBVAL_CHECK_OUTPUT
score = lambda ims: np.mean([oracle.identity_score(im, shape="circle", pattern=pattern) for im in ims])
print(f"identity to the new subject: personalized {score(per):.1f}, Layout-and-Retouch {score(ours):.1f}")

# %% [markdown]
# ## The same on Stable Diffusion (GPU)
# With a GPU and the weights downloaded (`hf download stable-diffusion-v1-5/stable-diffusion-v1-5
# --local-dir sd15`, or LR_SD_BASE naming them), the same function fine-tunes a LoRA on your
# photos: 3-5 of them in the folder $LR_SD_REFERENCE (loaded with `lr_tutorial.images.load_images`),
# their class noun in $LR_SD_CLASS (default "dog").

# %%
from lr_tutorial.notebook import have_references, reference_images
if not use_sd:
    print("skipped: needs a GPU and Stable Diffusion weights in ./sd15 (or LR_SD_BASE); "
          "the toy cells above ran the same code")
else:
    sd = load_models("sd", base=SD_BASE, class_noun=os.environ.get("LR_SD_CLASS", "dog"))
    my_photos = reference_images(sd)  # the photos in $LR_SD_REFERENCE, or None
    if have_references(my_photos, "DreamBooth-LoRA on Stable Diffusion"):
        dreambooth_lora(sd, my_photos, DreamBoothConfig(instance_prompt=f"a sks {sd.class_noun}", steps=500,
                                                        lr=1e-4, batch_size=1), out_dir="my_lora")
        out = LayoutAndRetouch(sd)(f"a sks {sd.class_noun} on the beach", my_photos, seed=0).images
        image_grid(list(my_photos[:3]) + list(out), ["photo"] * min(3, len(my_photos)) + ["Layout-and-Retouch"]);

# %% [markdown]
# ## Exercises
# **7.1** Write the noising step of the DreamBooth loss above: given a clean latent $x_0$
# ($E(x)$), noise $\epsilon$ and $\bar\alpha_t$ (a tensor), return $z_t$. The check compares it
# with diffusers' `DDIMScheduler.add_noise`, what `dreambooth_lora` trains on.

# %%
from lr_tutorial import exercises

def add_noise(x0, eps, alpha_bar):
    raise exercises.YourTurn("add_noise")

add_noise = exercises.attempt(add_noise)

# %% [markdown]
# **7.2** The last piece of the method: the latent blend of stage 2. For $k < \lambda_3$ the
# target keeps its own latent inside the subject mask and takes the context's (the layout's)
# outside it, $z^t \leftarrow M z^t + (1 - M) z^c$. `z_t` and `z_c` are (B, C, h, w), the mask
# `m` is (B, h, w) in [0, 1].

# %%
def latent_blend(z_t, z_c, m):
    raise exercises.YourTurn("latent_blend")

latent_blend = exercises.attempt(latent_blend)

# %% [markdown]
# Plugged in (`exercises.plugged`), your blend runs the method on the new subject; next to it,
# the same run with a blend that keeps the target everywhere (no blending), to see what it does:

# %%
from lr_tutorial.masks import resize
def no_blend(z_t, z_c, m):
    return z_t
runs = {}
for name, fn in (("your blend", latent_blend), ("no blend", no_blend)):
    with exercises.plugged(fn, name="latent_blend"):
        runs[name] = LayoutAndRetouch(bundle, lr.config)(prompts[0], photos, seed=0)
mine = runs["your blend"]
layout = mine.layout.images[0].astype(int)
outside = resize(mine.masks.per_step[-1, 0], layout.shape[0]) < 0.5  # the background, image pixels
drift = {name: np.abs(r.images[0].astype(int) - layout)[outside].mean() for name, r in runs.items()}
image_grid([mine.layout.images[0], runs["your blend"].images[0], runs["no blend"].images[0]],
           ["the layout (context)", f"your blend\nbackground off by {drift['your blend']:.1f}",
            f"no blend\nbackground off by {drift['no blend']:.1f}"], scale=1.6);

# %%
# NBVAL_CHECK_OUTPUT
print("your blend gives the method's image:",
      np.abs(mine.images[0].astype(int) - ours[0].astype(int)).max() <= 2)
print("blending keeps the background closer to the layout than no blending:",
      drift["your blend"] < drift["no blend"])
