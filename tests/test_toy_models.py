"""The shipped toy models: loading, the vanilla/personalized switch, the autoencoder's fidelity,
DDIM inversion, and the paper's phenomena on a small prompt set (measured numbers in comments)."""

import numpy as np
import pytest
import torch

from lr_tutorial import load_models, sampling
from lr_tutorial.toy import heldout, oracle, report, subject, world


@pytest.fixture(scope="module")
def toy():
    return load_models("toy")


def test_load_models_toy_is_complete(toy):
    b = load_models("toy")
    assert b.backend == "toy" and b.identifier == "sks" and b.class_noun == "star"
    assert b.latent_size == 16 and b.image_size == 64 and b.personalization == "lora"
    # its UNet runs without oneDNN in calls of a few rows (0.70-0.98x the forward's time at
    # 2-8 rows), with it from TOY_ONEDNN_MIN_ROWS (1.53x faster at 17)
    from lr_tutorial.models import TOY_ONEDNN_MIN_ROWS
    assert b.unet_onednn and b.unet_onednn_min_rows == TOY_ONEDNN_MIN_ROWS == 10
    assert len(b._onednn_hooks) == 2
    from diffusers import StableDiffusionPipeline
    assert isinstance(b.pipeline(), StableDiffusionPipeline)


def test_guidance_left_none_is_the_backends_own_everywhere(toy):
    from lr_tutorial.layout import LayoutConfig, step_blended
    from lr_tutorial.models import TOY_GUIDANCE
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
    assert toy.guidance == TOY_GUIDANCE == 3.0 and LayoutConfig().guidance is None
    with toy.using("personalized"):
        default, _ = sampling.sample(toy, ["a sks star at night"], [0], steps=4)
        same, _ = sampling.sample(toy, ["a sks star at night"], [0], steps=4, guidance=3.0)
        sd_like, _ = sampling.sample(toy, ["a sks star at night"], [0], steps=4, guidance=7.5)
    assert torch.equal(default, same) and (default - sd_like).abs().max() > 1e-2
    a = step_blended(toy, ["a sks star"], [0], LayoutConfig(steps=4)).trajectory.latents[-1]
    b = step_blended(toy, ["a sks star"], [0], LayoutConfig(steps=4, guidance=3.0)).trajectory.latents[-1]
    assert torch.equal(a, b)
    lr = LayoutAndRetouch(toy, LRConfig(layout=LayoutConfig(steps=4)))
    assert lr.resolved_config().layout.guidance == 3.0 and lr.config.layout.guidance is None
    assert lr("a sks star", seed=0).config["layout"]["guidance"] == 3.0  # recorded resolved


def test_any_diffusers_pipeline_accepts_the_shipped_folder():
    from diffusers import StableDiffusionPipeline

    from lr_tutorial.models import data_dir
    pipe = StableDiffusionPipeline.from_pretrained(data_dir() / "toy", safety_checker=None)
    out = pipe("a red circle", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_vanilla_personalized_switch_changes_the_output_and_restores(toy):
    with toy.using("vanilla"):
        zv, _ = sampling.sample(toy, ["a sks star"], [0], steps=5)
    with toy.using("personalized"):
        zp, _ = sampling.sample(toy, ["a sks star"], [0], steps=5)
    assert (zv - zp).abs().max() > 1e-2
    assert toy.mode == "vanilla"
    with toy.using("vanilla"):
        zv2, _ = sampling.sample(toy, ["a sks star"], [0], steps=5)
    assert torch.equal(zv, zv2)


def test_personal_rows_cover_the_toy_loras_conv_and_linear_layers(toy):
    """The toy LoRA adapts 48 Conv2d layers as well as 100 Linear ones: in a vanilla call the
    rows personal_rows marks get peft's personalized output on both kinds (the tiny SD test in
    test_pipeline covers Linear layers only), the others the vanilla output; through the B A x
    update (merged=False) and through the merged weights (merged=True, what fuse_lora takes),
    which gives the merged personalized model's output bit for bit."""
    from peft.tuners.lora.layer import Conv2d, Linear
    kinds = {type(m) for m in toy.unet.modules()}
    assert Conv2d in kinds and Linear in kinds and toy.mixes_rows
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 500, 100])
    assert not toy.fuse_lora
    with torch.no_grad():
        with toy.using("personalized"):
            cond = sampling.encode_prompts(toy, ["a sks star at night"] * 3)
            want_p = toy.unet(z, t, encoder_hidden_states=cond).sample
        toy.set_fuse_lora(True)
        try:
            with toy.using("personalized"):
                want_merged = toy.unet(z, t, encoder_hidden_states=cond).sample
        finally:
            toy.set_fuse_lora(False)
        with toy.using("vanilla"):
            want_v = toy.unet(z, t, encoder_hidden_states=cond).sample
            got = {}
            for merged in (False, True):
                with toy.personal_rows(1, merged=merged):
                    got[merged] = toy.unet(z, t, encoder_hidden_states=cond).sample
            assert not toy._fused  # merged=True without fuse_lora keeps no merges after
            after = toy.unet(z, t, encoder_hidden_states=cond).sample
    assert (want_p - want_v).abs().max() > 1e-2  # the LoRA matters: the test can fail
    assert torch.equal(after, want_v)  # hooks gone
    for merged, out in got.items():
        # measured: the vanilla rows equal bit for bit; the update path's rows equal too (the
        # update computed on two rows, not three); merged: 2.0e-6 from the unmerged LoRA
        torch.testing.assert_close(out[:1], want_v[:1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1:], want_p[1:], atol=1e-5, rtol=1e-5)
    # The riding rows use the merged model's weights, so they match the merged model to float
    # rounding. Not bit for bit across library versions: peft 0.22 merges in another operation
    # order than earlier releases (measured: 1.3e-6 max abs difference on outputs of magnitude
    # ~4, i.e. ~3e-7 relative, about 3 float32 ulps); 1e-5 is 8x that and still 1,000x below the
    # LoRA's own effect checked above (> 1e-2).
    torch.testing.assert_close(got[True][1:], want_merged[1:], atol=1e-5, rtol=1e-5)


def test_autoencoder_keeps_the_subject_identity(toy):
    refs = subject.reference_images()
    rec = sampling.decode(toy, sampling.encode(toy, refs))
    scores = [oracle.identity_score(r) for r in rec]
    # measured 0.894-0.914 on the light backdrops, 0.667 on the night one (the decoder lifts
    # teal a little; on dark ground more): the ceiling of any identity the toy reports
    night = subject.REFERENCE_BACKDROPS.index("night")
    assert min(s for i, s in enumerate(scores) if i != night) >= 0.85, scores
    assert scores[night] >= 0.6, scores


def test_ddim_inversion_round_trip(toy):
    refs = subject.reference_images()[:2]
    z = sampling.encode(toy, refs)
    with toy.using("personalized"):
        traj = sampling.ddim_invert(toy, z, "a sks star", steps=50)
        z_back = sampling.denoise(toy, traj.latents[0], sampling.encode_prompts(toy, ["a sks star"] * 2),
                                  None, sched=sampling.make_scheduler(toy, 50), guidance=1.0,
                                  k_range=range(50))
    err = ((z_back - z).norm() / z.norm()).item()
    assert err < ROUND_TRIP_BOUND, err


ROUND_TRIP_BOUND = 0.1  # measured 0.037 (UNet step 2,500 + LoRA), 0.038 (step 8,750 + LoRA), 0.032 (step 8,750 + the all-targets LoRA), 0.035 (step 14,000 + the shipped LoRA); re-measure when the weights change


def test_personalized_model_shows_the_problem_and_the_method_helps(toy):
    """The paper's phenomenon on the shipped weights, on the first 6 held-out prompts that put
    the subject off-centre, 2 seeds, 20 steps, the toy's defaults. Measured (base UNet step
    14,000 + the shipped LoRA): vanilla position 1.0 / background 1.0 / identity 0.044;
    personalized 0.583 / 1.0 / 0.812; Layout-and-Retouch 0.667 / 1.0 / 0.716."""
    ps = [p for p in heldout.personal_prompts()
          if world.parse_prompt(p)["position"] not in (None, "centre")][:6]
    seeds, rows = [0, 1], [p for p in ps for _ in [0, 1]]
    plain = [heldout.strip_identifier(p) for p in ps]

    def measure(images, prompts):
        r = report.summarize(report.score(images, prompts))
        return r["fidelity"]["position"], r["identity"]

    van = measure(report.generate(toy, plain, seeds, "vanilla", steps=20, progress=False),
                  [heldout.strip_identifier(r) for r in rows])
    per = measure(report.generate(toy, ps, seeds, "personalized", steps=20, progress=False), rows)
    lr = measure(report.generate_method(toy, ps, seeds, "layout_and_retouch", steps=20,
                                        progress=False), rows)
    assert per[1] > van[1] + 0.25 and lr[1] > van[1] + 0.25  # identity: 0.81 and 0.72 vs 0.04
    assert per[0] < van[0] - 0.2  # stated positions lost: 0.583 vs 1.0
    assert lr[0] > per[0]  # and partly recovered: 0.667 (one image more than personalized)


def test_the_retouch_adds_identity_and_keeps_the_layout(toy):
    """The paper's stage-2 claim on the shipped models: the first 12 held-out prompts x 2 seeds,
    20 steps, the toy's defaults (hand-over 0.6 N). Measured: stage 1 fidelity 0.768, identity
    0.650, position 0.833, background 0.95; Layout-and-Retouch 0.768, 0.717, 0.833, 0.95
    (docs/results.md has the full held-out set)."""
    ps = heldout.personal_prompts()[:12]
    seeds, rows = [0, 1], [p for p in ps for _ in [0, 1]]
    s1, lr = (report.summarize(report.score(report.generate_method(
        toy, ps, seeds, m, steps=20, progress=False), rows))
        for m in ("stage1", "layout_and_retouch"))
    assert lr["identity"] > s1["identity"] + 0.04  # 0.717 vs 0.650
    for attr in ("position", "background"):  # 0.833 and 0.95 in both
        assert lr["fidelity"][attr] >= s1["fidelity"][attr] - 1e-9
    assert lr["fidelity_mean"] >= s1["fidelity_mean"] - 1e-9  # 0.768 in both


def test_retouch_without_the_swap_is_stage_1_also_with_a_learned_identifier(toy):
    """Stage 2 encodes y^p in the personalized mode, so the identifier's learned input
    embedding (the shipped LoRA has one) reaches the target and reference branches: without the
    swap the target re-runs the context's own steps, and "no swap" equals stage 1."""
    from lr_tutorial.config import SwapConfig
    from lr_tutorial.layout import LayoutConfig
    from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
    assert toy.identifier_embedding is not None
    for engine, stage2 in (("reference", "batched"), ("fast", "cached")):
        cfg = LRConfig(layout=LayoutConfig(steps=10), swap=SwapConfig(mode="none"),
                       engine=engine, stage2=stage2)
        res = LayoutAndRetouch(toy, cfg)(["a sks star on the left at night"] * 2, seed=[0, 1])
        torch.testing.assert_close(res.target.latents[-1], res.layout.trajectory.latents[-1],
                                   atol=1e-4, rtol=1e-4)
