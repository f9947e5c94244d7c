"""The package's answers to the notebooks' exercises, one function per exercise with the
signature the learner writes (lr_tutorial.exercises.EXERCISES pairs each with its check).
A notebook goes on with these while an exercise is still its stub, and `make test` runs the
notebooks with them (LR_EXERCISE_SOLUTIONS=1). Where the package has the function already, the
answer is that function."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .layout import resolve_steps
from .masks import feather
from .prompts import strip_identifier
from .retouch import latent_blend
from .sampling import inversion_step

__all__ = ["position_fidelity", "strip_identifier", "capture_bytes", "iou", "vanilla_steps",
           "ddim_step", "retouch_attention", "phase", "feather", "latent_blend", "inversion_step",
           "mean_identity", "add_noise"]


def position_fidelity(rows: list[dict]) -> float:
    hits = [r["match"]["position"] for r in rows if "position" in r["match"]]
    return float(np.mean(hits)) if hits else float("nan")


def capture_bytes(resolutions: list[int], n_tokens: int, steps: int) -> int:
    return sum(r * r for r in resolutions) * n_tokens * steps * 2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def vanilla_steps(lambda1, n: int) -> int:
    return resolve_steps(lambda1, n)


def ddim_step(z_t, eps, a_t, a_prev):
    x0 = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


def retouch_attention(q_t, k_r, v_r, ref_mask, k_c, v_c, tgt_mask):
    h, n, _ = q_t.shape
    o_ref = F.scaled_dot_product_attention(q_t, k_r, v_r,
                                           attn_mask=ref_mask[None, None, :].expand(h, n, n))
    o_ctx = F.scaled_dot_product_attention(q_t, k_c, v_c)
    m = tgt_mask[None, :, None]
    return m * o_ref + (1 - m) * o_ctx


def phase(k: int, lambda2: int, is_decoder_layer: bool):
    if k < lambda2:
        return "structure"
    return "retouch" if is_decoder_layer else None


def mean_identity(rows: list[dict]) -> float:
    return float(np.mean([r["identity"] for r in rows]))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
