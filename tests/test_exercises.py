"""The exercises: every check accepts a right answer written here (not the package's own) and
rejects a plausible wrong one with its hint; `attempt` goes on with the package's solution while
a cell holds the stub, and with LR_EXERCISE_SOLUTIONS=1 checks that solution and refuses a cell
that holds an answer; `plugged` puts a learner's function where the pipeline calls the package's."""
import contextlib
import inspect
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from lr_tutorial import exercises as ex


@pytest.fixture(autouse=True)
def learner_mode(monkeypatch):
    monkeypatch.delenv(ex.SOLUTIONS_ENV, raising=False)


# ----------------------------------------------------------------------------- right answers
def _ddim_step(z, eps, a_t, a_prev):
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


def _masked(q, kr, vr, mr, kc, vc, mt):
    h, n, _ = q.shape
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mr[None, None, :].expand(h, n, n))
    ctx = F.scaled_dot_product_attention(q, kc, vc)
    return mt[None, :, None] * ref + (1 - mt[None, :, None]) * ctx


def _feather(b, w):
    if w <= 0 or not b.any() or b.all():
        return b.astype(np.float32)
    sd = ndimage.distance_transform_edt(b) - ndimage.distance_transform_edt(~b)
    return np.clip(0.5 + np.where(b, sd - 0.5, sd + 0.5) / (2 * w), 0, 1)


def _inversion_step(sched, k, z, eps, level_of_x0=1):
    ts, abar = sched.timesteps, sched.alphas_cumprod
    a_k = abar[ts[k]]
    a_next = abar[ts[k + 1]] if k + 1 < len(ts) else sched.final_alpha_cumprod
    a_x0 = a_next if level_of_x0 == 1 else a_k
    x0 = (z - (1 - a_x0).sqrt() * eps) / a_x0.sqrt()
    return a_k.sqrt() * x0 + (1 - a_k).sqrt() * eps, x0


def _strip(p, i):
    return " ".join(w for w in p.split() if w != i)


def _probs(q, k, scale, dim=-1, scaled=True):
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k)
    return (logits * (scale if scaled else 1)).softmax(dim)


def _stage1(bundle, z, l1, n, y_minus, y_p, denoise, vanilla_until=None, restart=False,
            prompts_swapped=False):
    """A right stage-1 loop, or one of the wrong ones the keywords make."""
    split = l1 if vanilla_until is None else vanilla_until
    first, second = (y_p, y_minus) if prompts_swapped else (y_minus, y_p)
    z1 = z
    if split > 0:
        with bundle.using("vanilla"):
            z1 = denoise(z, first, range(0, split))
    if split < n:
        with bundle.using(bundle.personal_mode):
            z1 = denoise(z if restart else z1, second, range(split, n))
    return z1


def _fuse(a, s, lo, hi, w, segmenter=True, confident=True):
    b = (a >= lo) & s if segmenter else a >= lo
    m = _feather(b, w)
    return np.maximum(m, a >= hi) if confident else m


RIGHT = {
    "strip_identifier": _strip,
    "attention_probs": _probs,
    "stage1_loop": _stage1,
    "ddim_step": _ddim_step,
    "retouch_attention": _masked,
    "feather": _feather,
    "fuse": _fuse,
    "inversion_step": _inversion_step,
    "add_noise": lambda x0, e, a: a.sqrt() * x0 + (1 - a).sqrt() * e,
    "latent_blend": lambda z_t, z_c, m: z_c + m.unsqueeze(1) * (z_t - z_c),
}

# (a plausible wrong answer, the hint its rejection must give)
WRONG = {
    "strip_identifier": (lambda p, i: p.replace(i, "").strip(), "drop only the whole word"),
    "attention_probs": (lambda q, k, sc: _probs(q, k, sc, dim=-2), "softmax over the last axis"),
    "stage1_loop": (lambda *a: _stage1(*a, vanilla_until=a[2] + 1) if a[2] < a[3] else _stage1(*a),
                    "the vanilla model for k < lambda1"),  # k <= lambda1
    "ddim_step": (lambda z, e, a, ap: _ddim_step(z, e, a ** 2, ap), "x0 differs"),  # no sqrt
    "retouch_attention": (lambda q, kr, vr, mr, kc, vc, mt: _masked(q, kr, vr, torch.ones_like(mr), kc, vc, mt),
                          "mask the reference"),
    "feather": (lambda b, w: b.astype(float), "signed distance"),
    "fuse": (lambda *a: _fuse(*a, segmenter=False), "the segmenter agrees with"),
    "inversion_step": (lambda s, k, z, e: _inversion_step(s, k, z, e, level_of_x0=0), "x0 differs"),
    "add_noise": (lambda x0, e, a: a * x0 + (1 - a) * e, "square roots"),
    "latent_blend": (lambda z_t, z_c, m: m[:, None] * z_c + (1 - m[:, None]) * z_t, "M marks the subject"),
}


def test_every_exercise_has_a_right_and_a_wrong_answer_here():
    assert set(ex.EXERCISES) == set(RIGHT) == set(WRONG)


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_check_accepts_a_right_answer(name, capsys):
    assert ex.EXERCISES[name].check(RIGHT[name]) is True
    assert capsys.readouterr().out.startswith("correct: ")


@pytest.mark.parametrize("name", sorted(WRONG))
def test_check_rejects_a_plausible_wrong_answer_with_a_hint(name):
    wrong, hint = WRONG[name]
    with pytest.raises(AssertionError, match=re.escape(hint)):
        ex.EXERCISES[name].check(wrong)


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_the_package_solution_passes_its_check(name):
    assert ex.EXERCISES[name].check(ex.EXERCISES[name].solution) is True


def test_ddim_step_rejects_returning_x0_as_the_next_latent():
    with pytest.raises(AssertionError, match="z_prev differs"):
        ex.check_ddim_step(lambda z, e, a, ap: (_ddim_step(z, e, a, ap)[1],) * 2)


def test_latent_blend_rejects_a_mask_without_a_channel_axis():
    with pytest.raises(AssertionError, match=r"m\[:, None\]"):
        ex.check_latent_blend(lambda z_t, z_c, m: (m * z_t.sum(1) + (1 - m) * z_c.sum(1)))


def test_attention_probs_rejects_unscaled_logits_and_an_untransposed_key():
    with pytest.raises(AssertionError, match=r"multiply the logits by scale"):
        ex.check_attention_probs(lambda q, k, sc: _probs(q, k, sc, scaled=False))
    with pytest.raises(AssertionError, match=r"k.transpose"):
        ex.check_attention_probs(lambda q, k, sc: (q @ k[..., :1, :].transpose(-1, -2)).softmax(-1))


@pytest.mark.parametrize("wrong, hint", [
    (dict(prompts_swapped=True), "the vanilla model reads y^-p"),
    (dict(restart=True), "start the personalized phase from the z the vanilla phase returned"),
])
def test_stage1_loop_rejects_swapped_prompts_and_a_restarted_latent(wrong, hint):
    with pytest.raises(AssertionError, match=re.escape(hint)):
        ex.check_stage1_loop(lambda *a: _stage1(*a, **wrong))


def test_stage1_loop_rejects_steps_outside_a_model_and_skipped_steps():
    def no_switch(bundle, z, l1, n, y_minus, y_p, denoise):
        return denoise(denoise(z, y_minus, range(0, l1)), y_p, range(l1, n))
    with pytest.raises(AssertionError, match="no model switched on"):
        ex.check_stage1_loop(no_switch)

    def one_step_short(bundle, z, l1, n, y_minus, y_p, denoise):
        return _stage1(bundle, z, l1, n - 1, y_minus, y_p, denoise)
    with pytest.raises(AssertionError, match=r"every step k = 0..N-1 runs once"):
        ex.check_stage1_loop(one_step_short)


def test_fuse_rejects_a_mask_without_the_confident_attention():
    with pytest.raises(AssertionError, match=re.escape("max(feather(B, width), A >= tau_hi)")):
        ex.check_fuse(lambda *a: _fuse(*a, confident=False))


# ----------------------------------------------------------------------------- attempt
def latent_blend(z_t, z_c, m):
    raise ex.YourTurn()


def test_a_stub_goes_on_with_the_package_solution_saying_so(capsys):
    from lr_tutorial import solutions
    assert ex.attempt(latent_blend) is solutions.latent_blend
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("your turn: `latent_blend` above is still the stub")


def test_a_right_answer_is_kept_and_a_wrong_one_raises_its_hint(capsys):
    right = RIGHT["latent_blend"]
    assert ex.attempt(right, name="latent_blend") is right
    assert "correct:" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="M marks the subject"):
        ex.attempt(WRONG["latent_blend"][0], name="latent_blend")
    with pytest.raises(KeyError, match="no exercise named 'blend'"):
        ex.attempt(right, name="blend")


def test_with_solutions_the_package_answer_is_checked_and_the_cell_must_hold_the_stub(monkeypatch, capsys):
    from lr_tutorial import solutions
    monkeypatch.setenv(ex.SOLUTIONS_ENV, "1")
    assert ex.attempt(latent_blend) is solutions.latent_blend
    out = capsys.readouterr().out
    assert out.startswith("correct: ") and ex.SOLUTIONS_ENV in out
    with pytest.raises(AssertionError, match="the cell holds an answer"):
        ex.attempt(RIGHT["latent_blend"], name="latent_blend")
    with pytest.raises(AssertionError, match="must hold the stub"):
        ex.attempt(lambda z_t, z_c, m: None, name="latent_blend")


def test_the_stub_message_names_the_fix():
    assert str(ex.YourTurn()) == "your turn: write this function in the cell above, then run it again"


# ----------------------------------------------------------------------------- plugged
def test_plugged_stands_in_for_the_package_function_and_is_undone(capsys):
    from lr_tutorial import retouch, solutions
    mine = RIGHT["latent_blend"]
    with ex.plugged(mine, name="latent_blend"):
        assert retouch.latent_blend is mine
        assert ex.check_latent_blend(mine)  # still compared with the package's own
    assert retouch.latent_blend is solutions.latent_blend
    with pytest.raises(RuntimeError):
        with ex.plugged(mine, name="latent_blend"):
            raise RuntimeError
    assert retouch.latent_blend is solutions.latent_blend
    with pytest.raises(ValueError, match="not a piece of the pipeline"):
        with ex.plugged(RIGHT["add_noise"], name="add_noise"):
            pass


@pytest.mark.parametrize("name", [n for n, e in ex.EXERCISES.items() if e.plugs_into])
def test_the_pipeline_looks_up_what_an_exercise_plugs_into(name):
    """The method module calls the function by its module-level name, so plugging reaches it."""
    import importlib
    module, attr = ex.EXERCISES[name].plugs_into.split(":")
    mod = importlib.import_module(module)
    src = inspect.getsource(mod)
    body = src.replace(inspect.getsource(getattr(mod, attr)), "")
    assert re.search(rf"(?<![\w.]){attr}\(", body), f"{module} never calls {attr} by name"
    if ex.EXERCISES[name].adapt is None:
        assert getattr(mod, attr) is ex.EXERCISES[name].solution


def test_a_learners_retouch_attention_runs_as_the_swaps():
    """Plugged in, the one-image answer of exercise 4.1 computes what swap.multi_source_attention
    computes on stage 2's batched shapes (CFG halves, a shared reference row, an empty M^r)."""
    from lr_tutorial import swap
    package = swap.multi_source_attention
    g = torch.Generator().manual_seed(0)
    halves, b, heads, hw, d = 2, 2, 2, 16, 8
    q = torch.randn(halves, b, heads, hw, d, generator=g)
    ref = tuple(torch.randn(halves, 1, heads, hw, d, generator=g) for _ in range(2))
    ctx = tuple(torch.randn(halves, b, heads, hw, d, generator=g) for _ in range(2))
    m_t = torch.rand(b, hw, generator=g)
    for m_r in (torch.rand(1, hw, generator=g) > 0.5, torch.zeros(1, hw, dtype=torch.bool)):
        want = package(q, ref, ctx, m_t, m_r, 0.3)
        with ex.plugged(RIGHT["retouch_attention"], name="retouch_attention"):
            assert swap.multi_source_attention is not package
            got = swap.multi_source_attention(q, ref, ctx, m_t, m_r, 0.3)
        assert torch.allclose(got, want, atol=1e-5)
    assert swap.multi_source_attention is package


def test_plugged_pieces_run_inside_the_pipeline(tmp_path):
    """Every piece a learner writes that plugs into the method (the identifier strip, the
    attention weights, the stage-1 loop, the retouch attention, the feather and the fusion of
    the masks, the inversion step, the latent blend), plugged in, is what a Layout-and-Retouch
    run calls (reference engine, a tiny Stable Diffusion), and gives the package's images."""
    from lr_tutorial.layout import LayoutConfig
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
    from lr_tutorial.sd import load_sd
    from tiny_sd import make_tiny_lora, make_tiny_sd, tiny_unet
    make_tiny_sd(tmp_path / "base")
    make_tiny_lora(tiny_unet(), tmp_path / "lora")
    bundle = load_sd(str(tmp_path / "base"), personalized=str(tmp_path / "lora"), class_noun="dog",
                     local_files_only=True)
    calls = {name: 0 for name, e in ex.EXERCISES.items() if e.plugs_into}

    def counting(name):
        right = RIGHT[name]

        def fn(*args):
            calls[name] += 1
            return right(*args)
        return fn
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=6)))
    with contextlib.ExitStack() as stack:
        for name in calls:
            stack.enter_context(ex.plugged(counting(name), name=name))
        mine = lr(["a sks dog"], ref, seed=0).images
    package = LayoutAndRetouch(bundle, lr.config)(["a sks dog"], ref, seed=0).images  # no cache
    assert calls.pop("feather") == 0  # the learner's fuse calls a feather of its own
    assert all(calls.values()), calls
    assert np.abs(mine.astype(int) - package.astype(int)).max() <= 2
    calls["feather"] = 0
    with ex.plugged(counting("feather"), name="feather"):  # the package's fuse calls the learner's
        mine = LayoutAndRetouch(bundle, lr.config)(["a sks dog"], ref, seed=0).images
    assert calls["feather"] and np.abs(mine.astype(int) - package.astype(int)).max() <= 2
    assert ex.in_use() == []  # unplugged on the way out
    # the fast engine runs its own code paths, so it refuses to run past a plugged piece
    fast = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=6), engine="fast"))
    with ex.plugged(counting("latent_blend"), name="latent_blend"):
        assert ex.in_use() == ["latent_blend"]
        with pytest.raises(RuntimeError, match="latent_blend is plugged into the reference engine"):
            fast(["a sks dog"], ref, seed=0)
