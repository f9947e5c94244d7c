"""The method on tiny random-weight Stable Diffusion components (SD 1.5 block structure, and an
SD 2 style v-prediction / linear-projection variant): invariants that must hold for any weights."""

import numpy as np
import pytest
import torch

from lr_tutorial import attention, sampling
from lr_tutorial.layout import LayoutConfig, resolve_steps, step_blended
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.sd import load_sd

from tiny_sd import make_tiny_lora, make_tiny_sd, tiny_unet

PROMPTS = ["a sks dog on the beach", "a sks dog"]
SEEDS = [0, 1]


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def bundle(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    sd2 = request.param == "sd2"
    make_tiny_sd(d / "base", v_prediction=sd2, linear_projection=sd2)
    make_tiny_lora(tiny_unet(linear_projection=sd2), d / "lora")
    return load_sd(str(d / "base"), personalized=str(d / "lora"), class_noun="dog",
                   local_files_only=True)


def test_lambda1_zero_is_the_personalized_model_and_n_the_vanilla_model(bundle):
    n = 6
    with bundle.using("personalized"):
        z_p, _ = sampling.sample(bundle, PROMPTS, SEEDS, steps=n)
    with bundle.using("vanilla"):
        z_v, _ = sampling.sample(bundle, ["a dog on the beach", "a dog"], SEEDS, steps=n)
    l0 = step_blended(bundle, PROMPTS, SEEDS, LayoutConfig(lambda1=0, steps=n), decode=False)
    ln = step_blended(bundle, PROMPTS, SEEDS, LayoutConfig(lambda1=n, steps=n), decode=False)
    assert torch.equal(l0.trajectory.final, z_p.cpu())
    assert torch.equal(ln.trajectory.final, z_v.cpu())
    assert not torch.allclose(z_p, z_v)  # the two models differ, so the test can fail
    mid = step_blended(bundle, PROMPTS, SEEDS, LayoutConfig(lambda1=0.5, steps=n), decode=False)
    assert mid.lambda1 == 3 and len(mid.trajectory.latents) == n + 1
    assert mid.vanilla_prompt == ["a dog on the beach", "a dog"]


def test_lambda_as_fraction_or_steps_and_out_of_range():
    assert resolve_steps(0.2, 50) == 10 and resolve_steps(10, 50) == 10
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        resolve_steps(1.5, 50)
    with pytest.raises(ValueError, match="outside"):
        resolve_steps(60, 50)


def test_capturing_attention_does_not_change_the_sample(bundle):
    z, _ = sampling.sample(bundle, PROMPTS, SEEDS, steps=4)
    spec = attention.CaptureSpec(kind="both")
    with attention.capture(bundle.unet, spec) as store:
        z2, _ = sampling.sample(bundle, PROMPTS, SEEDS, steps=4, observers=(store,))
    assert torch.allclose(z, z2, atol=1e-5)
    assert store.steps() == [0, 1, 2, 3] and store.nbytes > 0


def test_same_seed_same_result_bit_for_bit(bundle):
    a, _ = sampling.sample(bundle, PROMPTS, SEEDS, steps=3)
    again, _ = sampling.sample(bundle, PROMPTS, SEEDS, steps=3)
    assert torch.equal(a, again)  # same seeds, same CPU: the same bits
    # batch order irrelevant up to float rounding: bit for bit on Intel Xeon CPUs, 5.7e-6 apart
    # (of values up to 11) on an AMD EPYC, whose CPU kernels round a row differently by its
    # place in the batch
    b, _ = sampling.sample(bundle, PROMPTS[::-1], SEEDS[::-1], steps=3)
    torch.testing.assert_close(a, b.flip(0), atol=5e-5, rtol=1e-5)
    c, _ = sampling.sample(bundle, PROMPTS, [SEEDS[0], SEEDS[0] + 7], steps=3)
    torch.testing.assert_close(a[0], c[0], atol=5e-5, rtol=1e-5)
    assert not torch.allclose(a[1], c[1], atol=1e-2)  # another seed, another sample: can fail


def test_trajectory_and_callback_carry_latent_and_x0(bundle):
    seen = []
    _, traj = sampling.sample(bundle, PROMPTS[:1], SEEDS[:1], steps=3, callback=seen.append)
    assert [d["step"] for d in seen] == [0, 1, 2]
    assert set(seen[0]) == {"step", "timestep", "latent", "x0"}
    assert len(traj) == 3 and len(traj.latents) == 4 and len(traj.x0) == 3
    assert torch.equal(traj.latents[-1], seen[-1]["latent"].cpu())


def test_full_pipeline_runs_and_keeps_every_intermediate(bundle, tmp_path):
    n = 6
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=n)))
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    res = lr(PROMPTS, ref, seed=SEEDS)
    assert res.images.shape == (2, 64, 64, 3) and res.images.dtype == np.uint8
    assert res.layout.images.shape == (2, 64, 64, 3)
    k0 = lr.start_step()  # the target starts from the context at lambda2 (4 of 6 steps here)
    assert k0 == 4 and len(res.target) == n - k0 and res.masks.per_step.shape == (n - k0, 2, 8, 8)
    assert res.reference.trajectory.start == 0 and len(res.reference.trajectory.latents) == n + 1
    assert res.target.start == k0 and torch.equal(res.target.latent(n), res.target.latents[-1])
    assert res.config["layout"]["steps"] == n and "diffusers" in res.versions
    # the reference inversion is computed once and reused across prompts and seeds
    again = lr(PROMPTS[:1], ref, seed=5)
    assert again.reference is res.reference
    out = res.save(tmp_path / "run")
    assert (out / "final_00.png").exists() and (out / "result.json").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        res.save(tmp_path / "run")
    res.save(tmp_path / "run", overwrite=True)


def test_adaptive_reach_bounds_how_far_the_target_mask_grows(bundle):
    """mask.adaptive_reach: the per-step mask may differ from the context's only within
    reach * h (+ the feather ramp) of the context's object; unbounded it grows further on these
    random weights, so the check can fail."""
    import copy

    from scipy import ndimage

    n = 8
    cfg = LRConfig(layout=LayoutConfig(steps=n))
    cfg.swap.lambda2, cfg.mask.lambda3, cfg.mask.adaptive = 4, 1.0, True
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)

    def beyond(reach):  # how much of each per-step mask lies outside reach (+ feather) of M^c
        c = copy.deepcopy(cfg)
        c.mask.adaptive_reach = reach
        res = LayoutAndRetouch(bundle, c)(PROMPTS, ref, seed=SEEDS)
        ctx = np.stack([m.mask for m in res.masks.context])  # (B, h, w)
        h = ctx.shape[-1]
        far = np.stack([ndimage.distance_transform_edt(m < 0.5) for m in ctx])  # to {M^c >= 1/2}
        outside = far > (reach or 0) * h + c.mask.feather + 0.5  # (B, h, w)
        per = res.masks.per_step  # (steps, B, h, w); step 0 is M^c itself
        assert np.array_equal(per[0], ctx)
        return float(np.abs(per - ctx)[:, outside].max(initial=0.0))

    assert beyond(0.0) == 0.0 and beyond(0.125) == 0.0
    # measured: 6 (sd15) / 18 (sd2) of the 128 pixels lie beyond reach 0; unbounded, the mask
    # moved there by 1.0 (sd15) / 0.75 (sd2)
    assert beyond(None) > 0.2


def test_prompt_without_identifier_is_rejected(bundle):
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=2)))
    with pytest.raises(ValueError, match="identifier 'sks'"):
        lr("a dog on the beach", np.zeros((64, 64, 3), np.uint8))


def test_default_start_is_lambda2_or_lambda1_when_later(bundle):
    # lambda2 = max(0.2 N, min_lambda2 = 4) = 4; lambda1 = 6 of 8 vanilla steps comes later: the
    # target leaves the context at lambda1 (before it the context is the vanilla model's), and
    # the cached path runs
    lr = LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=8, lambda1=6)))
    assert lr.start_step() == 6
    assert len(lr("a sks dog", np.zeros((64, 64, 3), np.uint8)).target) == 8 - 6
    assert LayoutAndRetouch(bundle, LRConfig(layout=LayoutConfig(steps=10, lambda1=1))).start_step() == 4


def test_cli_generate_writes_the_image_panel_and_intermediates(tmp_path, capsys):
    """`python -m lr_tutorial generate` on the toy backend, 6 steps, merged LoRA; and with 4
    steps, where the retouch starts at the last step (min_lambda2 = 4) and the panel has no
    x0 row."""
    import json

    from PIL import Image

    from lr_tutorial import cli
    out = tmp_path / "run"
    assert cli.main(["generate", "--prompt", "a sks star on the left", "--seed", "3", "--steps", "6",
                     "--lambda1", "1", "--lambda2", "1", "--lambda3", "3", "--fuse-lora",
                     "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / "final.png")).shape == (64, 64, 3)
    assert Image.open(out / "panel.png").size[0] > 200
    assert (out / "final_00.png").exists() and (out / "layout_00.png").exists()
    meta = json.loads((out / "result.json").read_text())
    assert meta["seeds"] == [3] and meta["config"]["layout"]["lambda1"] == 1
    assert meta["config"]["swap"]["lambda2"] == 1 and meta["config"]["mask"]["lambda3"] == 3
    assert meta["config"]["models"]["fuse_lora"] is True
    assert cli.main(["generate", "--prompt", "a sks star", "--steps", "4", "--no-fuse-lora",
                     "--out", str(tmp_path / "short")]) == 0
    assert (tmp_path / "short" / "panel.png").exists()
    meta = json.loads((tmp_path / "short" / "result.json").read_text())
    assert meta["config"]["models"]["fuse_lora"] is False
    # several seeds: one batch, a panel per image; the images are those of single-seed runs
    assert cli.main(["generate", "--prompt", "a sks star on the left", "--seed", "3", "5",
                     "--steps", "6", "--lambda1", "1", "--lambda2", "1", "--lambda3", "3",
                     "--fuse-lora", "--out", str(tmp_path / "two")]) == 0
    two = tmp_path / "two"
    assert json.loads((two / "result.json").read_text())["seeds"] == [3, 5]
    assert (two / "panel_00.png").exists() and (two / "panel_01.png").exists()
    assert not (two / "final.png").exists()
    same = np.asarray(Image.open(out / "final_00.png")).astype(int)
    assert np.abs(np.asarray(Image.open(two / "final_00.png")).astype(int) - same).max() <= 1
    # the reference engine runs stage 2 batched; the fast engine's batched stage 2 gives the
    # same images, and --stage2 without --engine fast is refused by name
    assert json.loads((two / "result.json").read_text())["config"]["stage2_used"] == "batched"
    assert cli.main(["generate", "--prompt", "a sks star", "--stage2", "cached",
                     "--out", str(tmp_path / "c")]) == 2
    assert "--engine fast" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert cli.main(["generate", "--prompt", "a sks star on the left", "--seed", "3", "5",
                     "--steps", "6", "--lambda1", "1", "--lambda2", "1", "--lambda3", "3",
                     "--fuse-lora", "--engine", "fast", "--stage2", "batched",
                     "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "result.json").read_text())["config"]["stage2_used"] == "batched"
    for name in ("final_00.png", "final_01.png"):
        assert np.abs(np.asarray(Image.open(tmp_path / "b" / name)).astype(int)
                      - np.asarray(Image.open(two / name)).astype(int)).max() <= 1
    # one call per process: on a GPU auto takes the batched path (no pinning to pay off)
    assert cli.one_call_stage2("auto", torch.device("cuda", 0)) == "batched"
    assert cli.one_call_stage2("auto", torch.device("cpu")) == "auto"
    assert cli.one_call_stage2("cached", "cuda") == "cached"
