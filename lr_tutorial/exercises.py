"""Checks for the notebooks' exercises. Each `check_*` raises AssertionError with a hint when the
answer is wrong and prints a short confirmation when it is right, so a learner can check an
answer without reading the solution. Every check compares against the package's own code on
fresh random inputs (never a hard-coded number that could be copied)."""
from __future__ import annotations

import numpy as np
import torch


def _ok(msg: str) -> bool:
    print(f"correct: {msg}")
    return True


def check_lambda_steps(fn) -> bool:
    """Ex. 3.1: fn(lambda1, n) -> number of vanilla steps (fraction or count, like resolve_steps)."""
    from .layout import resolve_steps
    for lam, n in [(0.2, 50), (0.0, 50), (1.0, 30), (7, 50), (0.33, 25), (0, 10)]:
        got, want = fn(lam, n), resolve_steps(lam, n)
        assert got == want, f"lambda1={lam!r}, N={n}: got {got}, expected {want}. A float is a " \
                            "fraction of N (round to the nearest step); an int is a step count."
    return _ok("floats are fractions of N, ints are step counts")


def _ddim(steps: int = 10):
    from diffusers import DDIMScheduler
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(steps)
    return s


def check_ddim_step(fn, seed: int = 0) -> bool:
    """Ex. 3.2: fn(z_t, eps, alpha_bar_t, alpha_bar_prev) -> (z_prev, x0), one deterministic DDIM
    step (eta = 0), compared with diffusers' DDIMScheduler.step on random latents."""
    g = torch.Generator().manual_seed(seed)
    sched = _ddim()
    for k in (0, 4, 9):
        t = sched.timesteps[k]
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        z, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        want = sched.step(eps, t, z)
        got = fn(z, eps, a_t, a_prev)
        assert isinstance(got, tuple) and len(got) == 2, "return the pair (z_prev, x0)"
        z_prev, x0 = got
        assert torch.allclose(torch.as_tensor(x0), want.pred_original_sample, atol=1e-4), \
            f"step {k}: x0 differs: x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)"
        assert torch.allclose(torch.as_tensor(z_prev), want.prev_sample, atol=1e-4), \
            f"step {k}: z_prev differs: z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps"
    return _ok("predict x0, then re-noise it to the previous level with the same eps")


def check_add_noise(fn, seed: int = 0) -> bool:
    """Ex. 7.1: fn(x0, eps, alpha_bar) -> z_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, the
    noised latent DreamBooth trains on, compared with diffusers' DDIMScheduler.add_noise."""
    g = torch.Generator().manual_seed(seed)
    sched = _ddim()
    for t in (10, 400, 980):
        x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        want = sched.add_noise(x0, eps, torch.tensor([t, t]))
        got = torch.as_tensor(fn(x0, eps, sched.alphas_cumprod[t]))
        assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert torch.allclose(got, want, atol=1e-5), \
            f"t={t}: values differ: the weights are square roots, sqrt(a) and sqrt(1 - a)"
    return _ok("z_t = sqrt(a) x0 + sqrt(1 - a) eps")


def check_strip_identifier(fn) -> bool:
    """Ex. 1.2: fn(prompt, identifier) -> the prompt without the identifier (y^p -> y^-p)."""
    from .prompts import strip_identifier
    cases = [("a sks dog on the beach", "sks"), ("sks dog", "sks"), ("a photo of a sks cat", "sks"),
             ("a sks  star at night", "sks"), ("a skss dog", "sks")]
    for p, ident in cases:
        got, want = fn(p, ident), strip_identifier(p, ident)
        assert got == want, f"{p!r}: got {got!r}, expected {want!r} (drop only the whole word " \
                            f"{ident!r}, keep single spaces)"
    return _ok("y^-p keeps every word but the identifier")


def check_masked_attention(fn, seed: int = 0) -> bool:
    """Ex. 4.1: fn(q_t, k_r, v_r, ref_mask, k_c, v_c, tgt_mask) -> the retouch output
    M^t * Attn(Q^t, K^r|M^r, V^r) + (1 - M^t) * Attn(Q^t, K^c, V^c).
    Shapes: q/k/v (heads, N, d); ref_mask (N,) bool over keys; tgt_mask (N,) float over queries."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    h, n, d = 2, 16, 8
    q, kr, vr, kc, vc = (torch.randn(h, n, d, generator=g) for _ in range(5))
    mr = torch.rand(n, generator=g) > 0.5
    mt = torch.rand(n, generator=g)
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mr[None, None, :].expand(h, n, n))
    ctx = F.scaled_dot_product_attention(q, kc, vc)
    want = mt[None, :, None] * ref + (1 - mt[None, :, None]) * ctx
    got = fn(q, kr, vr, mr, kc, vc, mt)
    assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.allclose(got, want, atol=1e-5), \
        "values differ: mask the reference *keys* (-inf logits outside M^r) before the softmax, " \
        "and blend the two outputs per *query* with M^t"
    return _ok("masked multi-source attention")


def check_phase(fn) -> bool:
    """Ex. 4.2: fn(k, lambda2, is_decoder_layer) -> 'structure', 'retouch' or None."""
    for k, l2, dec in [(0, 10, True), (9, 10, False), (10, 10, True), (10, 10, False), (30, 4, True)]:
        want = "structure" if k < l2 else ("retouch" if dec else None)
        got = fn(k, l2, dec)
        assert got == want, f"k={k}, lambda2={l2}, decoder={dec}: got {got!r}, expected {want!r}"
    return _ok("structure first, everywhere; then retouch in the decoder only")


def check_feather(fn) -> bool:
    """Ex. 5.1: fn(binary (h, w) bool, width) -> soft mask, like masks.feather."""
    from .masks import feather
    rng = np.random.default_rng(0)
    for w in (0.5, 1.0, 2.0):
        b = np.zeros((16, 16), bool)
        y, x = rng.integers(4, 12, size=2)
        b[y - 3:y + 3, x - 2:x + 4] = True
        got, want = np.asarray(fn(b, w)), feather(b, w)
        assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
        assert np.allclose(got, want, atol=1e-4), \
            f"width {w}: values differ. Use the signed distance (inside minus outside, each " \
            "shifted by 1/2 to the boundary) and map it with clip(1/2 + sd / (2 w), 0, 1)"
    return _ok("signed-distance feather")


def check_iou(fn) -> bool:
    """Ex. 5.2: fn(a, b) -> intersection over union of two boolean masks (1.0 if both empty)."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.random((8, 8)) > 0.5, rng.random((8, 8)) > 0.5
        want = (a & b).sum() / (a | b).sum()
        assert abs(fn(a, b) - want) < 1e-6, "IoU = |a & b| / |a | b|"
    z = np.zeros((4, 4), bool)
    assert fn(z, z) == 1.0, "two empty masks agree perfectly: return 1.0"
    return _ok("IoU")


def check_capture_bytes(answer: int, spec, unet, steps: int, batch: int = 1,
                        n_tokens: int | None = None) -> bool:
    """Ex. 2.1: the number of bytes a capture spec stores (compare with spec.estimate)."""
    want = spec.estimate(unet, steps, batch=batch, n_tokens=n_tokens)
    assert int(answer) == want, f"got {answer}, expected {want}: sum over the selected layers of " \
        "rows x heads x HW x keys, times the steps kept, times the bytes per element"
    return _ok(f"{want} bytes")


def check_fraction(answer: float, truth: float, name: str, tol: float = 0.02) -> bool:
    """A measured share (e.g. position fidelity) computed by the learner vs the package's value."""
    assert abs(float(answer) - truth) <= tol, f"{name}: got {answer:.3f}, expected {truth:.3f}"
    return _ok(f"{name} = {truth:.3f}")
