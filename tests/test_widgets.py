"""The timestep scrubber: frames per branch and step, the slider swaps images, static fallback."""
import numpy as np
import pytest
import torch

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


def test_scrubber_shows_the_mask_of_every_branch(result_and_bundle):
    res, b = result_and_bundle
    sc = TimestepScrubber(res, b)
    k = sc.data.steps - 1
    for br, m in (("reference", res.masks.reference.mask), ("context", res.masks.context[0].mask)):
        assert np.array_equal(sc.data.mask(br, k), m)
        if m.max() > 0.5:
            assert not np.array_equal(sc.frame(br, "mask", k), sc.frame(br, "x0", k)), br
    assert np.array_equal(sc.data.mask("target", k), res.masks.per_step[-1, 0])


@pytest.fixture(scope="module")
def recorded(result_and_bundle):
    from lr_tutorial import swap
    from lr_tutorial.widgets import record_self_attention
    _, b = result_and_bundle
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    project = swap.project_qkv
    with record_self_attention(b) as rec:
        res = LayoutAndRetouch(b, LRConfig(layout=LayoutConfig(steps=6)))(["a sks dog"], ref, seed=0)
    assert swap.project_qkv is project  # put back
    return res, b, rec


def test_self_attention_record_holds_one_call_per_stage2_step(recorded):
    res, b, rec = recorded
    sc = TimestepScrubber(res, b, self_attention=rec)
    d = sc.data
    assert len(rec.calls) == d.steps - d.start > 0 and rec.layer.startswith("up_blocks")
    assert rec.calls[0][0].shape[0] in (3, 6)  # [reference; context; target], one or two halves
    assert d.actions[:d.start] == [None] * d.start and "retouch" in d.actions[d.start:]
    with pytest.raises(ValueError, match="record exactly the run of this result"):
        d.attach(type(rec)(rec.layer, rec.side, rec.calls[:1]), b.unet)


def test_the_targets_reading_follows_the_swap(recorded):
    res, b, rec = recorded
    sc = TimestepScrubber(res, b, self_attention=rec)
    d = sc.data
    q = sc.default_query()
    assert d.reads("target", d.start - 1, q) is None if d.start else True
    for k in range(d.start, d.steps):
        own = d.reads("context", k, q)["context"]
        assert own.shape == (rec.side, rec.side) and own.sum() == pytest.approx(1, abs=1e-3)
        shares = sc.reading(k, q)
        assert sum(shares.values()) == pytest.approx(1, abs=1e-3)
        if d.actions[k] == "structure":
            assert set(shares) == {"context"}
        elif d.actions[k] == "retouch":  # M^t of the reference, 1 - M^t of the context
            m_t = torch.nn.functional.interpolate(torch.as_tensor(d.masks[k])[None, None],
                                                  size=(rec.side,) * 2, mode="bilinear")[0, 0, q[0], q[1]]
            assert shares["reference"] == pytest.approx(float(m_t), abs=1e-3)
            assert np.array_equal(d.source_map(k), d.masks[k])
    k = d.steps - 1
    d.actions[k] = "structure"  # what a structure step reads (the target starting before lambda2)
    assert set(sc.reading(k, q)) == {"context"} and not d.source_map(k).any()
    d.actions[k] = "retouch"
    for kind in ("self", "source"):
        for br in ("reference", "context", "target"):
            f = sc.frame(br, kind, d.steps - 1)
            assert f.dtype == np.uint8 and f.shape == sc.frame(br, "x0", d.steps - 1).shape


def test_the_query_pixel_and_its_reading_in_the_widget(recorded):
    res, b, rec = recorded
    sc = TimestepScrubber(res, b, self_attention=rec)
    sc.widget()
    c = sc._controls
    assert set(kd for _, kd in c["images"]) == {"latent", "x0", "attention", "mask", "self", "source"}
    before, text = c["images"][("context", "self")].value, c["reading"].value
    assert "reads the" in text
    c["query_y"].value = (c["query_y"].value + rec.side // 2) % rec.side
    assert c["images"][("context", "self")].value != before
    c["slider"].value = 0
    assert c["reading"].value != text
    assert len(sc.to_figure().axes) == 3 * 6 * 6
    assert len(sc.to_figure(steps=[2, 5], kinds=("x0", "source")).axes) == 3 * 2 * 2
    with pytest.raises(ValueError, match="not among"):
        TimestepScrubber(res, b).to_figure(kinds=("self",))
    with pytest.raises(ValueError, match="no self-attention record"):
        TimestepScrubber(res, b)._self_frame("target", "self", 5, (0, 0))


def test_the_reading_is_the_swaps_own_attention(recorded):
    """multi_source_attention on the recorded queries and keys, with one-hot values, returns the
    attention weights it applied: the scrubber's reading of every target query equals them."""
    from lr_tutorial import swap
    res, b, rec = recorded
    sc = TimestepScrubber(res, b, self_attention=rec)
    d = sc.data
    k = d.steps - 1
    q_all, k_all = (x.float() for x in rec.calls[k - d.start])
    half = q_all.shape[0] - 3  # the conditional half: [reference; context; target]
    q_t, k_r, k_c = q_all[half + 2], k_all[half], k_all[half + 1]  # (heads, HW, d)
    hw = q_t.shape[1]
    eye = torch.eye(hw).expand(q_t.shape[0], hw, hw)
    m_t = torch.nn.functional.interpolate(torch.as_tensor(d.masks[k])[None, None], size=(rec.side,) * 2,
                                          mode="bilinear").flatten(1)
    m_r = torch.nn.functional.interpolate(torch.as_tensor(d.mask("reference", k))[None, None],
                                          size=(rec.side,) * 2, mode="bilinear").flatten(1) > 0.5
    o = swap.multi_source_attention(q_t[None, None], (k_r[None, None], eye[None, None]),
                                    (k_c[None, None], eye[None, None]), m_t, m_r,
                                    q_t.shape[-1] ** -0.5)[0, 0].mean(0)  # (HW queries, HW keys)
    for qi in (0, hw // 3, hw - 1):
        r = d.reads("target", k, divmod(qi, rec.side))
        mine = (r["reference"] + r["context"]).reshape(-1)
        assert np.allclose(mine, o[qi].numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def toy_bundle():
    from lr_tutorial.models import load_models
    return load_models("toy")


@pytest.fixture()
def lambda_controls(toy_bundle):
    from lr_tutorial.widgets import LambdaControls
    # 10 steps: the defaults are lambda1 = 6 (the toy's 0.6 N), lambda2 = 2, lambda3 = 8
    return LambdaControls(toy_bundle, "a sks star on the left in the snow", seed=0, steps=10)


def test_lambda_controls_run_each_setting_once(lambda_controls):
    c = lambda_controls
    assert c.default_setting() == (6, 2, 8)
    first = c.run((6, 2, 8))
    assert c.runs == 1 and first.layout.shape == first.image.shape == (64, 64, 3)
    assert "stated, id" in first.readings["image"]  # the toy oracle's reading
    # the same setting, as fractions or as the defaults: from the cache, nothing runs
    assert c.run({"lambda1": 0.6, "lambda2": 0.2, "lambda3": 0.8}) is first
    assert c.run({}) is first
    c.precompute({"default": {}})
    assert c.runs == 1
    c.widget()
    c.show((6, 2, 8))
    assert c.runs == 1 and "lambda1 6 / lambda2 2 / lambda3 8" in c._controls["message"].value


def test_lambda_controls_figure_shows_the_precomputed_settings(lambda_controls):
    c = lambda_controls
    with pytest.raises(ValueError, match="precompute"):
        c.to_figure()
    c.precompute({"default": {}, "early hand-over": {"lambda1": 1}, "no latent blending": {"lambda3": 0}})
    assert c.runs == 3 and [k for _, k in c.shown] == [(6, 2, 8), (1, 2, 8), (6, 2, 0)]
    fig = c.to_figure()
    assert c.runs == 3  # drawn from the cache
    assert len(fig.axes) == 9  # three settings x (layout, mask, Layout-and-Retouch)
    rows = [fig.axes[3 * r].get_ylabel() for r in range(3)]
    assert [r.split("\n")[0] for r in rows] == ["default", "early hand-over", "no latent blending"]
    shown = [np.asarray(ax.images[0].get_array()) for ax in fig.axes]
    assert np.array_equal(shown[0], c.cache[(6, 2, 8)].layout)
    assert np.array_equal(shown[8], c.cache[(6, 2, 0)].image)
    assert "stated, id" in fig.axes[2].get_xlabel()
    assert "no latent blending" in fig.axes[7].get_xlabel()


def test_lambda_controls_show_the_configs_error(lambda_controls):
    c = lambda_controls
    c.widget()
    msg = c._controls["message"]
    c.show((4, 2, 30))  # lambda3 beyond N
    assert "lambda3 = 30 steps is outside [0, 10]" in msg.value and c.runs == 0
    s = c._controls["sliders"]
    s["lambda2"].value, s["lambda3"].value = 6, 5  # blending would end before the retouch
    assert "comes before lambda2" in msg.value
    c._controls["button"].click()
    assert "comes before lambda2" in msg.value and c.runs == 0
    with pytest.raises(ValueError, match="lambda1 = 12 steps is outside"):
        c.run({"lambda1": 12})


def test_lambda_controls_lambda1_changes_the_layout(lambda_controls):
    c = lambda_controls
    c.widget()
    layout, reading = c._controls["images"][0], c._controls["readings"][0]
    c._controls["button"].click()
    before = layout.value
    assert c.runs == 1 and before and "stated" in reading.value
    c._controls["sliders"]["lambda1"].value = 10  # all vanilla steps
    assert "press <b>run</b>" in c._controls["message"].value and c.runs == 1
    c._controls["button"].click()
    assert c.runs == 2 and layout.value != before
    assert not np.array_equal(c.cache[(6, 2, 8)].layout, c.cache[(10, 2, 8)].layout)
    c._controls["sliders"]["lambda1"].value = 6  # back: from the cache, shown without a click
    assert layout.value == before and c.runs == 2
