# %% [markdown]
# <<colab-badge>>
#
# # 03 · Stage 1: step-blended denoising
#
# **Learning goals**
# - implement the paper's first stage: the vanilla model draws the layout in the first, noisiest
#   $\lambda_1$ steps, the personalized model finishes;
# - see and measure the trade-off: more vanilla steps, better prompt fidelity, weaker identity.
#
# **Prerequisites**: notebooks 01-02; DDIM sampling. About a minute and a half on a CPU.

# %%
# <<setup>>

# %%
import numpy as np
import torch
from lr_tutorial import layout, sampling
from lr_tutorial.notebook import pick_backend, prompts_for, reference_images, score_fn, show_source
bundle = pick_backend()  # toy without a GPU; Stable Diffusion with one (LR_BACKEND=toy|sd forces it)

# %% [markdown]
# ## The equation, then the lines
# With $N$ DDIM steps, $z_0$ pure noise, $y^p$ the prompt with the identifier and $y^{-p}$ without:
# $$z_{k+1} = \mathrm{DDIM}\big(z_k,\ \mathrm{CFG}(\epsilon, z_k, y^{-p}, t_k)\big)\quad k < \lambda_1$$
# $$z_{k+1} = \mathrm{DDIM}\big(z_k,\ \mathrm{CFG}(\epsilon^*, z_k, y^{p}, t_k)\big)\quad k \ge \lambda_1$$
# In `lr_tutorial/layout.py` that is `step_blended`: the prompt without the identifier, the
# seeds' noise $z_0$, a `denoise` that runs some of the DDIM steps with whichever model is
# switched on, and `stage1_loop`, the two phases (exercise 3.1 below writes it), with the LoRA
# switched off, then on. Here is the package's code as it is:

# %%
show_source(layout.step_blended)

# %% [markdown]
# Two invariants are tests (`tests/test_pipeline.py`): $\lambda_1 = 0$ is exactly the personalized
# model's sample, $\lambda_1 = N$ exactly the vanilla model's.

# %%
from lr_tutorial.layout import LayoutConfig, step_blended
from lr_tutorial.viz import image_grid
prompt, N = prompts_for(bundle, "a sks star on the left in the snow"), 25  # SD: the bundle's subject
lams = [0, 3, 5, 8, 12, 25]
imgs = [step_blended(bundle, [prompt], [1], LayoutConfig(lambda1=l, steps=N)).images[0] for l in lams]
image_grid(imgs, [f"lambda1 = {l}" for l in lams], scale=1.4);

# %% [markdown]
# ## Watching the layout form
# Each DDIM step first predicts the clean latent from the noise estimate, then re-noises it to
# the next, lower level (deterministic, $\eta = 0$; $\bar\alpha$ is the scheduler's `alphas_cumprod`):
# $$\hat x_0 = \frac{z_t - \sqrt{1-\bar\alpha_t}\,\epsilon}{\sqrt{\bar\alpha_t}},\qquad
# z_{t_\text{prev}} = \sqrt{\bar\alpha_{t_\text{prev}}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t_\text{prev}}}\,\epsilon$$
# `sampling.denoise` keeps both: `traj.x0[k]` is $\hat x_0$ at step $k$, `traj.latents[k+1]` the
# new latent. Its step is diffusers' `DDIMScheduler.step` (exercise 3.2 writes one), after the
# guided noise estimate of `guided_eps`:

# %%
show_source(sampling.denoise)

# %% [markdown]
# The predicted $\hat x_0$ shows when the layout is decided. The vanilla steps
# sketch the prompt's layout early; the personalized steps after them can still move it. The
# shipped toy LoRA pulls hard towards its photos (a big star in the centre), so on the toy a
# few vanilla steps are not enough: the toy hands over at 0.6 N, where the vanilla model has
# fixed the layout (docs/results.md measures it).

# %%
res = step_blended(bundle, [prompt], [1], LayoutConfig(lambda1=5, steps=N))
ks = [0, 2, 4, 5, 8, 14, 24]
x0 = sampling.decode(bundle, torch.cat([res.trajectory.x0[k] for k in ks]))
image_grid(x0, [f"x0 at k={k}" + (" (vanilla)" if k < 5 else "") for k in ks], scale=1.3);

# %% [markdown]
# ## The trade-off, measured
# `LambdaExplorer` precomputes layouts for several $\lambda_1$ and reads prompt fidelity and
# identity with the oracle. Move the slider; below it, the curve.

# %%
from lr_tutorial.toy import heldout
from lr_tutorial.widgets import LambdaExplorer
prompts = prompts_for(bundle, heldout.personal_prompts()[:8])
if bundle.backend != "toy":  # SD: 2 prompts (each image costs seconds), read by CLIP / DINO, not the oracle
    prompts = prompts[:2]
explorer = LambdaExplorer(bundle, prompts, seeds=[0, 1], lambdas=[0, 2, 4, 6, 10, 25], steps=N,
                          scores=score_fn(bundle, reference_images(bundle, verbose=False)))
explorer.widget()

# %%
# NBVAL_CHECK_OUTPUT
for lam in explorer.lambdas:
    f, i = explorer.readout[lam]
    if bundle.backend == "toy":  # the oracle's prompt fidelity and identity
        print(f"lambda1 = {lam:>2}: fidelity {f:.1f}  identity {i:.1f}")
    else:  # Stable Diffusion: T_CLIP and I_DINO stand in (nan: no CLIP / DINO weights or photos)
        print(f"lambda1 = {lam:>2}: T_CLIP {f:.3f}  I_DINO {i:.3f}")

# %%
explorer.to_figure();

# %% [markdown]
# Stage 1 alone cannot have both: the identity it keeps comes from the personalized steps it
# still runs. Stage 2 (notebook 04) takes the layout from a large-$\lambda_1$ image and the
# identity from the reference photo.
#
# ## Exercises
# **3.1** Write stage 1 itself from the two equations at the top: the vanilla model on $y^{-p}$
# for $k < \lambda_1$, then the personalized model on $y^p$ up to $N$, one latent carried
# through. `denoise(z, prompts, k_range)` runs the DDIM steps `k_range` with whichever model
# `bundle.using(...)` has switched on and returns the latent after them.

# %%
from lr_tutorial import exercises

def stage1_loop(bundle, z, l1, n, y_minus_p, y_p, denoise):
    # with bundle.using("vanilla"): ...   with bundle.using(bundle.personal_mode): ...
    raise exercises.YourTurn("stage1_loop")

stage1_loop = exercises.attempt(stage1_loop)

# %% [markdown]
# Plugged into `step_blended` (`exercises.plugged`), your loop draws the strip at the top of
# this notebook again:

# %%
check = list(zip(lams, imgs))[::2]  # every other lambda1 of the strip, with its image
with exercises.plugged(stage1_loop):
    mine = [step_blended(bundle, [prompt], [1], LayoutConfig(lambda1=l, steps=N)).images[0]
            for l, _ in check]
image_grid(mine, [f"your loop, lambda1 = {l}" for l, _ in check], scale=1.4);

# %%
# NBVAL_CHECK_OUTPUT
print("your stage 1 gives the package's layouts:",
      all(np.abs(m.astype(int) - img.astype(int)).max() <= 2 for m, (_, img) in zip(mine, check)))

# %% [markdown]
# The package's loop, the one yours stood in for, to compare with:

# %%
show_source(layout.stage1_loop)

# %% [markdown]
# **3.2** Write one DDIM step from the two equations above: given $z_t$, the noise estimate
# $\epsilon$ and $\bar\alpha_t$, $\bar\alpha_{t_\text{prev}}$ (tensors), return
# $(z_{t_\text{prev}}, \hat x_0)$. The check compares it with diffusers' `DDIMScheduler.step`,
# the step `denoise` takes.

# %%
def ddim_step(z_t, eps, a_t, a_prev):
    # x0 from z_t and eps, then z_prev from x0 and the same eps
    raise exercises.YourTurn("ddim_step")

ddim_step = exercises.attempt(ddim_step)
