"""The notebooks' exercises: what the learner writes, how it is checked, and the package's answer.

An exercise cell defines the function the learner writes, as a stub, and hands it to `attempt`:

    def latent_blend(z_t, z_c, m):
        # z^t <- M z^t + (1 - M) z^c;  z_t, z_c: (B, C, h, w), m: (B, h, w) in [0, 1]
        raise exercises.YourTurn()

    latent_blend = exercises.attempt(latent_blend)

`attempt` runs the exercise's check: a right answer prints "correct: ..." and is returned, a
wrong one raises AssertionError with a hint, and the stub prints one line saying it is the
learner's turn and returns the package's solution, so the rest of the notebook still runs.
Where an exercise is a piece of the method, `plugged(fn)` puts the learner's function in place of
the package's for a block, and the pipeline (reference engine) runs on it:

    with exercises.plugged(latent_blend):
        result = lr(prompt, refs, seed=0)

With LR_EXERCISE_SOLUTIONS=1 in the environment (how `make test` runs the notebooks),
`attempt` checks the package's solution instead, and fails if the cell holds anything but the
stub: the stored notebooks ship without answers and every checker still runs.

Each `check_*` raises AssertionError with a hint when the answer is wrong and prints a short
confirmation when it is right, so a learner can check an answer without reading the solution.
Every check compares against the package's own code on fresh random inputs (never a hard-coded
number that could be copied). EXERCISES lists them by the name of the function the learner writes.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SOLUTIONS_ENV = "LR_EXERCISE_SOLUTIONS"


class YourTurn(NotImplementedError):
    """Raised by an exercise's stub: the learner has not written the function yet."""

    def __init__(self, what: str = "this function"):
        super().__init__(f"your turn: write {what} in the cell above, then run it again")


@dataclass(frozen=True)
class Exercise:
    """`check(fn)` accepts a right answer (True) and rejects a wrong one (AssertionError with a
    hint); `solution` is the package's answer with the learner's signature; `plugs_into`,
    "module:function", names the package function the learner's one can stand in for, and
    `adapt` wraps the learner's function to that function's signature where the two differ."""
    name: str
    check: Callable
    solution: Callable
    plugs_into: str | None = None
    adapt: Callable | None = None  # learner's function -> one with the package function's signature


def solutions_on() -> bool:
    return os.environ.get(SOLUTIONS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _exercise(fn_or_name) -> Exercise:
    name = fn_or_name if isinstance(fn_or_name, str) else getattr(fn_or_name, "__name__", "")
    if name not in EXERCISES:
        raise KeyError(f"no exercise named {name!r}: name the function after one of "
                       f"{sorted(EXERCISES)} or pass name=...")
    return EXERCISES[name]


def attempt(fn: Callable, name: str | None = None) -> Callable:
    """Check the learner's `fn` for the exercise `name` (default: fn's own name) and return the
    function the notebook goes on with: `fn` when right, the package's solution while `fn` is the
    stub (saying so), AssertionError with a hint when wrong. See the module docstring."""
    ex = _exercise(name or fn)
    if solutions_on():
        try:
            ex.check(fn)
        except YourTurn:
            pass
        except Exception as e:
            raise AssertionError(f"exercise {ex.name}: the cell must hold the stub that raises "
                                 f"exercises.YourTurn, not an answer (its check raised {type(e).__name__})")
        else:
            raise AssertionError(f"exercise {ex.name}: the cell holds an answer; stored notebooks ship "
                                 "the stub that raises exercises.YourTurn")
        ex.check(ex.solution)
        print(f"({SOLUTIONS_ENV}: the package's solution, {_where(ex.solution)})")
        return ex.solution
    try:
        ex.check(fn)
    except YourTurn:
        print(f"your turn: `{ex.name}` above is still the stub; write it and run the cell again "
              f"(until then the notebook goes on with the package's {_where(ex.solution)})")
        return ex.solution
    return fn


def _where(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


_IN_USE: list[str] = []  # what is plugged in now (the fast engine refuses to run past it)


def in_use() -> list[str]:
    """The exercise pieces (and recorders) plugged into the reference engine right now."""
    return list(_IN_USE)


@contextlib.contextmanager
def plugged(fn: Callable, name: str | None = None):
    """`with plugged(fn):` the package calls `fn` where the exercise's `plugs_into` function
    was (the reference engine, LRConfig(engine="reference"), looks it up at each call)."""
    ex = _exercise(name or fn)
    if not ex.plugs_into:
        raise ValueError(f"exercise {ex.name} is not a piece of the pipeline: nothing to plug it into")
    module_name, attr = ex.plugs_into.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    setattr(module, attr, ex.adapt(fn) if ex.adapt else fn)
    _IN_USE.append(ex.name)
    try:
        yield fn
    finally:
        setattr(module, attr, original)
        _IN_USE.remove(ex.name)


def _ok(msg: str) -> bool:
    print(f"correct: {msg}")
    return True


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
    """Ex. 1.1: fn(prompt, identifier) -> the prompt without the identifier (y^p -> y^-p). It
    stands in for the strip_identifier stage 1 calls (lr_tutorial.layout)."""
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


def check_feather(fn) -> bool:
    """Ex. 5.1: fn(binary (h, w) bool, width) -> soft mask, like masks.feather (which it stands in for)."""
    from .solutions import feather  # the package's, even while a learner's is plugged in
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



def check_attention_probs(fn, seed: int = 0) -> bool:
    """Ex. 2.1: fn(q, k, scale) -> softmax(q k^T * scale) over the keys, the attention weights a
    capture stores. q (B, heads, Nq, d), k (B, heads, Nk, d) -> (B, heads, Nq, Nk). It stands in
    for lr_tutorial.attention.attention_probs (as_attention_probs)."""
    from .solutions import attention_probs  # the package's, even while a learner's is plugged in
    g = torch.Generator().manual_seed(seed)
    for b, h, nq, nk, d in ((1, 2, 16, 6, 8), (2, 1, 9, 9, 4)):
        q, k = torch.randn(b, h, nq, d, generator=g), 2 * torch.randn(b, h, nk, d, generator=g)
        scale = d ** -0.5
        want = attention_probs(q, k, scale)
        got = fn(q, k, scale)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
            f"shape {tuple(getattr(got, 'shape', ()))}, expected {tuple(want.shape)}: the logits are " \
            "q @ k^T (k.transpose(-1, -2)), one row per query, one column per key"
        got = got.float()
        assert torch.allclose(got.sum(-1), torch.ones(b, h, nq), atol=1e-4), \
            "each query's weights must sum to 1 over the keys: softmax over the last axis (dim=-1)"
        assert torch.allclose(got, want, atol=1e-5), \
            "values differ: multiply the logits by scale (1 / sqrt(d)) before the softmax"
    return _ok("softmax over the keys of the scaled dot products")


class _Bundle:
    """What stage1_loop reads of a ModelBundle: `using(mode)` and `personal_mode`."""
    personal_mode = "personalized"

    def __init__(self):
        self.mode = None  # no model chosen outside a `using` block

    @contextlib.contextmanager
    def using(self, mode: str):
        before, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = before


def check_stage1_loop(fn) -> bool:
    """Ex. 3.1: fn(bundle, z, l1, n, y_minus_p, y_p, denoise) -> z_N, stage 1's two phases, where
    `denoise(z, prompts, k_range)` runs the steps in k_range with the model `bundle.using(...)`
    has switched on and returns the latent after them. It stands in for
    lr_tutorial.layout.stage1_loop; the check runs it on a bundle and a denoiser that record
    which model and prompt each step used."""
    y_minus, y_p = ["a star on the left"], ["a sks star on the left"]
    for l1, n in ((3, 8), (0, 5), (5, 5), (1, 4)):
        bundle, steps = _Bundle(), []

        def denoise(z, prompts, k_range):
            for k in k_range:
                steps.append((k, bundle.mode, list(prompts)))
                z = 2 * z + k  # a step whose result depends on the latent it starts from
            return z
        z0 = torch.ones(1)
        got = fn(bundle, z0, l1, n, list(y_minus), list(y_p), denoise)
        want_z = z0
        for k in range(n):
            want_z = 2 * want_z + k
        ks = [k for k, _, _ in steps]
        assert ks == list(range(n)), \
            f"lambda1 = {l1}, N = {n}: the steps ran were {ks}; every step k = 0..N-1 runs once, " \
            "in order: range(0, lambda1) and then range(lambda1, N)"
        for k, mode, prompts in steps:
            want = "vanilla" if k < l1 else "personalized"
            assert mode == want, \
                f"lambda1 = {l1}: step {k} ran with " + \
                ("no model switched on" if mode is None else f"the {mode} model") + \
                f", expected the {want} one: the vanilla model for k < lambda1 (inside " \
                "`with bundle.using('vanilla'):`), the personalized one from lambda1 on " \
                "(`with bundle.using(bundle.personal_mode):`)"
            assert prompts == (y_minus if k < l1 else y_p), \
                f"lambda1 = {l1}: step {k} read {prompts!r}: the vanilla model reads y^-p (the " \
                "prompt without the identifier), the personalized model y^p"
        assert torch.is_tensor(got) and torch.equal(got, want_z), \
            f"lambda1 = {l1}, N = {n}: the returned latent is not the last step's: start the " \
            "personalized phase from the z the vanilla phase returned, and return the final z"
    return _ok("the vanilla model on y^-p for k < lambda1, then the personalized model on y^p")


def check_fuse(fn) -> bool:
    """Ex. 5.2: fn(attn, seg, tau_lo, tau_hi, width) -> M = max(feather(B, width), A >= tau_hi)
    with B = (A >= tau_lo) & S; attn A (h, w) normalized, seg S (h, w) bool at A's resolution.
    It stands in for lr_tutorial.masks.fuse (as_fuse)."""
    from .solutions import feather, fuse  # the package's, even while a learner's is plugged in
    h = 16
    yy, xx = np.mgrid[:h, :h]

    def blob(cy, cx, s, amp):
        return amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    # the subject (where S is), a confident spot S missed, a weak spot S rightly leaves out
    a = np.maximum.reduce([blob(6, 6, 2.5, 1.0), blob(12, 12, 1.5, 0.9), blob(3, 13, 2.0, 0.45)])
    a = (a / a.max()).astype(np.float32)
    s = (yy - 6) ** 2 + (xx - 6) ** 2 <= 16
    for lo, hi, w in ((0.3, 0.8, 1.0), (0.2, 0.7, 2.0), (0.35, 0.85, 0.0)):
        got, want = np.asarray(fn(a.copy(), s.copy(), lo, hi, w), dtype=np.float32), fuse(a, s, lo, hi, w)
        assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
        if np.allclose(got, want, atol=1e-4):
            continue
        attention_only = np.maximum(feather(a >= lo, w), a >= hi)
        no_confident = feather((a >= lo) & s, w)
        assert not np.allclose(got, attention_only, atol=1e-4), \
            f"tau_lo {lo}: your mask keeps the weak attention the segmenter left out: keep only " \
            "the attention support the segmenter agrees with, B = (A >= tau_lo) & S"
        assert not np.allclose(got, no_confident, atol=1e-4), \
            f"tau_hi {hi}: your mask misses the confident attention the segmenter missed: add it " \
            "back, M = max(feather(B, width), A >= tau_hi)"
        raise AssertionError(f"tau_lo {lo}, tau_hi {hi}, width {w}: values differ: B = (A >= tau_lo) "
                             "& S, feathered with the width (masks.feather), then "
                             "M = max(feather(B, width), A >= tau_hi)")
    return _ok("attention support the segmenter agrees with, feathered, plus confident attention")


def check_latent_blend(fn, seed: int = 0) -> bool:
    """Ex. 7.2: fn(z_t, z_c, m) -> M z^t + (1 - M) z^c, the target kept inside the subject mask
    and the context's latent outside. z_t, z_c: (B, C, h, w); m: (B, h, w) in [0, 1]. It stands
    in for lr_tutorial.retouch.latent_blend."""
    from .solutions import latent_blend  # the package's, even while a learner's is plugged in
    g = torch.Generator().manual_seed(seed)
    for b, c, h in ((1, 4, 8), (3, 4, 6)):
        z_t, z_c = torch.randn(b, c, h, h, generator=g), torch.randn(b, c, h, h, generator=g)
        m = torch.rand(b, h, h, generator=g)
        want = latent_blend(z_t, z_c, m)
        got = fn(z_t, z_c, m)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
            f"shape {tuple(getattr(got, 'shape', ()))}, expected {tuple(want.shape)}: m is (B, h, w), " \
            "give it a channel axis (m[:, None]) to weigh every channel"
        assert torch.allclose(got, want, atol=1e-6), \
            "values differ: M marks the subject, so the target's latent is kept where M = 1 and the " \
            "context's (the background) where M = 0"
    return _ok("z^t <- M z^t + (1 - M) z^c")


def check_inversion_step(fn, seed: int = 0) -> bool:
    """Ex. 6.1, DDIM inversion: fn(sched, k, z, eps) -> (z_k, x0), from z_{k+1} at level
    t_{k+1} to the noisier z_k at t_k (a_N, past the last step, is sched.final_alpha_cumprod). An
    epsilon-prediction scheduler; it stands in for lr_tutorial.sampling.inversion_step."""
    from .solutions import inversion_step  # the package's, even while a learner's is plugged in
    g = torch.Generator().manual_seed(seed)
    sched = _ddim()
    for k in (0, 4, 9):
        z, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        want = inversion_step(sched, k, z, eps)
        got = fn(sched, k, z, eps)
        assert isinstance(got, tuple) and len(got) == 2, "return the pair (z_k, x0)"
        assert torch.allclose(torch.as_tensor(got[1]), want[1], atol=1e-4), \
            f"k={k}: x0 differs: z is at level t_(k+1) (sched.timesteps[k + 1], or the final alpha " \
            "after the last step), so x0 = (z - sqrt(1 - a_(k+1)) eps) / sqrt(a_(k+1))"
        assert torch.allclose(torch.as_tensor(got[0]), want[0], atol=1e-4), \
            f"k={k}: z_k differs: re-noise x0 to the noisier level t_k with the same eps, " \
            "z_k = sqrt(a_k) x0 + sqrt(1 - a_k) eps"
    return _ok("x0 from the level z is at, then up to the noisier level")


def as_multi_source(fn: Callable) -> Callable:
    """The learner's one-image retouch attention, fn(q_t, k_r, v_r, ref_mask, k_c, v_c, tgt_mask)
    on (heads, N, d) (check_masked_attention), as swap.multi_source_attention: applied to each CFG
    half and image of the batch, with the layer's scale, and every reference key kept where M^r
    is empty (as the package does)."""
    def multi_source_attention(q_t, reference, context, m_t, m_r, scale):
        halves, b, d = q_t.shape[0], q_t.shape[1], q_t.shape[-1]
        m_r = m_r | ~m_r.any(dim=1, keepdim=True)
        q = q_t * (scale * d ** 0.5)  # SDPA's default scale is 1 / sqrt(d)
        out = torch.empty_like(q_t)
        for h in range(halves):
            for i in range(b):
                kr, vr = (x[h, min(i, x.shape[1] - 1)] for x in reference)
                kc, vc = (x[h, min(i, x.shape[1] - 1)] for x in context)
                out[h, i] = fn(q[h, i], kr, vr, m_r[min(i, m_r.shape[0] - 1)], kc, vc,
                               m_t[min(i, m_t.shape[0] - 1)])
        return out
    return multi_source_attention



def as_attention_probs(fn: Callable) -> Callable:
    """The learner's fn(q, k, scale) as attention.attention_probs(attn, q, k)."""
    def attention_probs(attn, q, k):
        return fn(q, k, attn.scale)
    return attention_probs


def as_fuse(fn: Callable) -> Callable:
    """The learner's fn(attn, seg, tau_lo, tau_hi, width) on one resolution as
    masks.fuse(attn, seg, cfg), whose segmenter mask comes at the image's resolution."""
    def fuse(attn, seg, cfg):
        from .masks import FusedMask, resize
        s = resize(np.asarray(seg, np.float32), attn.shape[-1]) >= 0.5
        m = np.asarray(fn(attn, s, cfg.tau_lo, cfg.tau_hi, cfg.feather), dtype=np.float32)
        return FusedMask(attn, s, (attn >= cfg.tau_lo) & s, m)
    return fuse


def _registry() -> dict[str, Exercise]:
    from . import solutions as s
    entries = [  # in the order of the notebooks
        Exercise("strip_identifier", check_strip_identifier, s.strip_identifier,
                 "lr_tutorial.layout:strip_identifier"),
        Exercise("attention_probs", check_attention_probs, s.attention_probs,
                 "lr_tutorial.attention:attention_probs", as_attention_probs),
        Exercise("stage1_loop", check_stage1_loop, s.stage1_loop, "lr_tutorial.layout:stage1_loop"),
        Exercise("ddim_step", check_ddim_step, s.ddim_step),
        Exercise("retouch_attention", check_masked_attention, s.retouch_attention,
                 "lr_tutorial.swap:multi_source_attention", as_multi_source),
        Exercise("feather", check_feather, s.feather, "lr_tutorial.masks:feather"),
        Exercise("fuse", check_fuse, s.fuse, "lr_tutorial.masks:fuse", as_fuse),
        Exercise("inversion_step", check_inversion_step, s.inversion_step,
                 "lr_tutorial.sampling:inversion_step"),
        Exercise("add_noise", check_add_noise, s.add_noise),
        Exercise("latent_blend", check_latent_blend, s.latent_blend, "lr_tutorial.retouch:latent_blend"),
    ]
    return {e.name: e for e in entries}


EXERCISES: dict[str, Exercise] = _registry()
