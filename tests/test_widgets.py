"""The timestep scrubber: frames per branch and step, the slider swaps images, static fallback."""
import numpy as np
import pytest

from lr_tutorial.layout import LayoutConfig
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.sd import load_sd
from lr_tutorial.widgets import KINDS, TimestepScrubber

from tiny_sd import make_tiny_lora, make_tiny_sd, tiny_unet


@pytest.fixture(scope="module")
def result_and_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    make_tiny_sd(d / "base")
    make_tiny_lora(tiny_unet(), d / "lora")
    b = load_sd(str(d / "base"), personalized=str(d / "lora"), class_noun="dog",
                local_files_only=True)
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    res = LayoutAndRetouch(b, LRConfig(layout=LayoutConfig(steps=5)))(["a sks dog"], ref, seed=0)
    return res, b


def test_scrubber_frames_and_slider(result_and_bundle):
    res, b = result_and_bundle
    sc = TimestepScrubber(res, b)
    for kind in KINDS:
        f0, f4 = sc.frame("target", kind, 0), sc.frame("target", kind, 4)
        assert f0.dtype == np.uint8 and f0.shape == f4.shape and f0.shape[-1] == 3
    assert not np.array_equal(sc.frame("target", "x0", 0), sc.frame("target", "x0", 4))
    assert sc.data.reference_start == 0 and not (sc.frame("reference", "x0", 0) == 128).all()
    box = sc.widget()
    img = sc._controls["images"][("target", "x0")]
    before = img.value
    sc._controls["slider"].value = 0
    assert img.value != before  # moving the slider swaps the displayed image
    fig = sc.to_figure()
    assert len(fig.axes) == 3 * len(KINDS) * 6
    assert box is not None


def test_scrubber_greys_the_reference_before_its_inversion_stopped(result_and_bundle):
    _, b = result_and_bundle
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    res = LayoutAndRetouch(b, LRConfig(layout=LayoutConfig(steps=5), reference_inversion="start"))(
        ["a sks dog"], ref, seed=0)
    sc = TimestepScrubber(res, b)
    # inverted only down to the target's first step (4 of 5): a grey frame before it
    assert sc.data.reference_start == res.reference.trajectory.start == 4
    for kind in KINDS:
        assert (sc.frame("reference", kind, 3) == 128).all()
        assert not (sc.frame("reference", kind, 4) == 128).all()
    assert len(sc.to_figure().axes) == 3 * len(KINDS) * 6


def test_scrubber_with_a_full_capture_scrubs_tokens_and_heads(result_and_bundle):
    from lr_tutorial.attention import CaptureSpec
    _, b = result_and_bundle
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    lr = LayoutAndRetouch(b, LRConfig(layout=LayoutConfig(steps=6)))  # stage 2: steps 4, 5
    res = lr(["a sks dog on the beach"], ref, seed=0,
             capture=CaptureSpec(kind="cross", heads="all"))
    sc = TimestepScrubber(res, b)
    assert "dog</w>" in sc.data.tokens[sc.data.default_token]
    assert sc.data.heads == 2
    a = sc.data.attention_map("target", 5, token=sc.data.default_token, head=0)
    c = sc.data.attention_map("target", 5, token=1, head=1)
    assert a.shape == c.shape and not np.allclose(a, c)
    sc.widget()
    img = sc._controls["images"][("context", "attention")]
    before = img.value
    sc._controls["token"].value = 1
    assert img.value != before


def test_mask_and_swap_explorers(result_and_bundle):
    from lr_tutorial.widgets import MaskExplorer, SwapExplorer
    res, _ = result_and_bundle
    ctx = res.masks.context[0]
    me = MaskExplorer(res.layout.images[0], ctx.attention)
    a, _ = me.panels(0.3, 0.7, 1.0)
    b, _ = me.panels(0.8, 0.9, 1.0)
    assert len(a) == 5 and not np.array_equal(a[4], b[4])  # thresholds change the fused mask
    me.widget()
    w = me._controls["images"][4]
    before = w.value
    me._controls["tau_lo"].value = 0.9
    assert w.value != before
    se = SwapExplorer({"multi": res, "again": res})
    se.widget()
    assert len(se.to_figure().axes) == 4


def test_lambda_explorer(result_and_bundle):
    from lr_tutorial.widgets import LambdaExplorer
    _, b = result_and_bundle
    ex = LambdaExplorer(b, ["a sks dog"], [0, 1], [0, 2, 4], steps=4,
                        scores=lambda imgs, prompts: (float(imgs.mean() / 255), 0.5))
    assert set(ex.images) == {0, 2, 4} and ex.images[0].shape == (2, 64, 64, 3)
    assert not np.array_equal(ex.images[0], ex.images[4])
    ex.widget()
    t = ex._controls["text"].value
    ex._controls["slider"].value = 4
    assert ex._controls["text"].value != t
    assert ex.to_figure() is not None
