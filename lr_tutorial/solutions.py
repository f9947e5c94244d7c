"""The package's answers to the notebooks' exercises, one function per exercise with the
signature the learner writes (lr_tutorial.exercises.EXERCISES pairs each with its check).
A notebook goes on with these while an exercise is still its stub, and `make test` runs the
notebooks with them (LR_EXERCISE_SOLUTIONS=1). Where the package has the function already, the
answer is that function."""
from __future__ import annotations

import numpy as np
import torch

from .layout import stage1_loop
from .masks import feather
from .prompts import strip_identifier
from .retouch import latent_blend
from .sampling import inversion_step

__all__ = ["strip_identifier", "attention_probs", "stage1_loop", "ddim_step", "retouch_attention",
           "feather", "fuse", "latent_blend", "inversion_step", "add_noise"]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys, in float32: (B, heads, Nq, d), (B, heads, Nk, d)
    -> (B, heads, Nq, Nk). Stands in for lr_tutorial.attention.attention_probs."""
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)


def ddim_step(z_t, eps, a_t, a_prev):
    x0 = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


def retouch_attention(q_t, k_r, v_r, ref_mask, k_c, v_c, tgt_mask):
    import torch.nn.functional as F
    h, n, _ = q_t.shape
    o_ref = F.scaled_dot_product_attention(q_t, k_r, v_r,
                                           attn_mask=ref_mask[None, None, :].expand(h, n, n))
    o_ctx = F.scaled_dot_product_attention(q_t, k_c, v_c)
    m = tgt_mask[None, :, None]
    return m * o_ref + (1 - m) * o_ctx


def fuse(attn: np.ndarray, seg: np.ndarray, tau_lo: float, tau_hi: float, width: float) -> np.ndarray:
    """M = max(feather((A >= tau_lo) & S, width), A >= tau_hi); A, S (h, w) at one resolution.
    Stands in for lr_tutorial.masks.fuse (exercises.as_fuse)."""
    support = (attn >= tau_lo) & seg
    return np.maximum(feather(support, width), (attn >= tau_hi).astype(np.float32))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
