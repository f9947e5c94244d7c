"""Every exercise check passes the reference solution and fails a plausible wrong answer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lr_tutorial import exercises as ex
from lr_tutorial.layout import resolve_steps
from lr_tutorial.masks import feather
from lr_tutorial.prompts import strip_identifier


def test_lambda_steps():
    assert ex.check_lambda_steps(resolve_steps)
    with pytest.raises(AssertionError, match="fraction"):
        ex.check_lambda_steps(lambda lam, n: int(lam * n))  # truncates instead of rounding


def test_strip_identifier():
    assert ex.check_strip_identifier(strip_identifier)
    with pytest.raises(AssertionError):
        ex.check_strip_identifier(lambda p, i: p.replace(i, "").strip())


def _ddim_step(z, eps, a_t, a_prev):
    x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x0


def test_ddim_step():
    assert ex.check_ddim_step(_ddim_step)
    with pytest.raises(AssertionError, match="x0 differs"):  # forgets the sqrt on a_t
        ex.check_ddim_step(lambda z, e, a, ap: _ddim_step(z, e, a ** 2, ap))
    with pytest.raises(AssertionError, match="z_prev differs"):  # returns x0 as the next latent
        ex.check_ddim_step(lambda z, e, a, ap: (_ddim_step(z, e, a, ap)[1],) * 2)


def test_add_noise():
    assert ex.check_add_noise(lambda x0, e, a: a.sqrt() * x0 + (1 - a).sqrt() * e)
    with pytest.raises(AssertionError, match="square roots"):
        ex.check_add_noise(lambda x0, e, a: a * x0 + (1 - a) * e)


def _masked(q, kr, vr, mr, kc, vc, mt):
    h, n, _ = q.shape
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mr[None, None, :].expand(h, n, n))
    ctx = F.scaled_dot_product_attention(q, kc, vc)
    return mt[None, :, None] * ref + (1 - mt[None, :, None]) * ctx


def test_masked_attention():
    assert ex.check_masked_attention(_masked)
    wrong = lambda q, kr, vr, mr, kc, vc, mt: _masked(q, kr, vr, torch.ones_like(mr), kc, vc, mt)  # noqa
    with pytest.raises(AssertionError, match="mask the reference"):
        ex.check_masked_attention(wrong)


def test_phase():
    assert ex.check_phase(lambda k, l2, d: "structure" if k < l2 else ("retouch" if d else None))
    with pytest.raises(AssertionError):
        ex.check_phase(lambda k, l2, d: "structure" if k <= l2 else "retouch")


def test_feather():
    assert ex.check_feather(feather)
    with pytest.raises(AssertionError):
        ex.check_feather(lambda b, w: b.astype(float))


def test_iou():
    assert ex.check_iou(lambda a, b: 1.0 if not (a | b).any() else (a & b).sum() / (a | b).sum())
    with pytest.raises(AssertionError):
        ex.check_iou(lambda a, b: (a & b).sum() / max(1, a.sum()))


def test_capture_bytes_and_fraction():
    from lr_tutorial.attention import CaptureSpec
    from lr_tutorial.toy import components
    unet = components.build_unet()
    spec = CaptureSpec(kind="cross", tokens=[1, 2])
    assert ex.check_capture_bytes(spec.estimate(unet, 10), spec, unet, 10)
    with pytest.raises(AssertionError):
        ex.check_capture_bytes(spec.estimate(unet, 10) * 2, spec, unet, 10)
    assert ex.check_fraction(0.5, 0.51, "x")
    with pytest.raises(AssertionError):
        ex.check_fraction(0.4, 0.51, "x")
