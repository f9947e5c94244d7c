"""A few training steps of every toy stage on a tiny config: the code runs, checkpoints, resumes."""
import json

import pytest
import torch

from lr_tutorial.toy import components, train

TINY_UNET = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, attention_head_dim=2)


def tiny_cfg(tmp_path, **kw):
    base = dict(ckpt_dir=str(tmp_path), vae_steps=2, vae_batch=2, dataset_size=12, unet_steps=3,
                unet_batch=4, unet_warmup=1, ckpt_every=1, log_every=1, unet_overrides=TINY_UNET,
                pyramid_from=1, boost_from=1, token_id_from=1)  # every loss term runs
    return train.ToyTrainConfig(**{**base, **kw})


def test_training_smoke_runs_checkpoints_and_exports(tmp_path):
    cfg = tiny_cfg(tmp_path / "ck", look_share=0.25, look_dataset_size=6, looks_from=1,
                   pair_share=0.25, pair_dataset_size=5, pairs_from=1,
                   diptych_share=0.25, diptych_dataset_size=3, diptychs_from=1,
                   read_pairs=2, read_dataset_size=3, reads_from=1,
                   repaint_share=0.5, repaint_min_timestep=0)
    (tmp_path / "ck").mkdir()
    vae = train.train_vae(cfg)
    latents, scaling, looks, pairs, diptychs, reads = train.unet_data(cfg, vae)
    assert latents.shape == (12, 4, 16, 16) and scaling > 0 and looks.shape == (6, 4, 16, 16)
    assert pairs.shape == (5, 4, 16, 16) and diptychs.shape == (3, 4, 16, 32)
    assert reads.shape == (3, 3, 4, 16, 16)
    train.train_unet(cfg, latents, scaling, looks, pairs, diptychs, reads)
    log = [json.loads(x) for x in open(tmp_path / "ck" / "log.jsonl")]
    assert [r["stage"] for r in log] == ["vae"] * 2 + ["unet"] * 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    out = tmp_path / "export"
    train.export(cfg, out)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "model_index.json").exists()
    try:
        train.export(cfg, out)
    except FileExistsError as e:
        assert "overwrite" in str(e)
    else:
        raise AssertionError("export overwrote existing weights without overwrite=True")


def test_unet_training_resumes_exactly(tmp_path):
    """3 steps in one go == 2 steps, a stop, and a resume to 3."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    latents = torch.randn(12, 4, 16, 16)
    train.train_unet(tiny_cfg(a), latents, 1.0)
    train.train_unet(tiny_cfg(b, unet_steps=2), latents, 1.0)
    train.train_unet(tiny_cfg(b), latents, 1.0)
    sa = torch.load(a / "unet.pt", weights_only=True)
    sb = torch.load(b / "unet.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 3
    for k, v in sa["unet"].items():
        assert torch.equal(v, sb["unet"][k]), k


def test_training_can_go_on_from_exported_weights(tmp_path):
    """A machine that lost its checkpoints seeds them from an export and keeps training."""
    cfg = tiny_cfg(tmp_path / "ck")
    (tmp_path / "ck").mkdir()
    vae = train.train_vae(cfg)
    latents, scaling = train.encode_dataset(cfg, vae)
    train.train_unet(cfg, latents, scaling)
    train.export(cfg, tmp_path / "export")
    meta = json.load(open(tmp_path / "export" / "training.json"))
    assert meta["unet_step"] == 3
    fresh = tiny_cfg(tmp_path / "fresh", unet_steps=5)
    train.seed_from_export(fresh, tmp_path / "export")
    assert torch.load(tmp_path / "fresh" / "unet.pt", weights_only=True)["step"] == 3
    train.train_unet(fresh, latents, scaling)
    assert torch.load(tmp_path / "fresh" / "unet.pt", weights_only=True)["step"] == 5


@pytest.mark.slow
def test_unet_training_killed_midway_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """A run killed during step 4 of 5 (checkpoints every 2 steps) has lost steps 3-4; run
    again, it resumes from the step-2 checkpoint, and its final weights, EMA and optimizer state
    equal those of a run that was never interrupted. A kill while a checkpoint is being written
    leaves the previous checkpoint whole."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    latents = torch.randn(12, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = dict(unet_steps=5, ckpt_every=2)
    train.train_unet(tiny_cfg(a, **cfg), latents, 1.0)

    real_log = train._log

    def killed_at_step_4(c, **row):
        if row.get("step") == 4:
            raise KeyboardInterrupt
        real_log(c, **row)
    monkeypatch.setattr(train, "_log", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.train_unet(tiny_cfg(b, **cfg), latents, 1.0)
    assert torch.load(b / "unet.pt", weights_only=True)["step"] == 2

    def killed_while_saving(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "_log", real_log)
    monkeypatch.setattr(train.torch, "save", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        train.train_unet(tiny_cfg(b, **cfg), latents, 1.0)  # dies writing the step-4 checkpoint
    assert torch.load(b / "unet.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()

    train.train_unet(tiny_cfg(b, **cfg), latents, 1.0)
    sa = torch.load(a / "unet.pt", weights_only=True)
    sb = torch.load(b / "unet.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 5
    for part in ("unet", "text_encoder"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)
    assert all(torch.equal(x, y) for x, y in zip(sa["ema"], sb["ema"]))
    assert torch.equal(sa["opt"]["state"][0]["exp_avg"], sb["opt"]["state"][0]["exp_avg"])


def test_pyramid_noise_adds_low_frequency_power_from_its_step_on():
    cfg = train.ToyTrainConfig(ckpt_dir="unused", pyramid_noise=0.5, pyramid_from=10)
    shape = (256, 4, 16, 16)

    def block_std(step):  # std of 8x8 block means: white noise alone gives 1/8
        n = train.training_noise(shape, torch.Generator().manual_seed(0), cfg, step)
        return float(torch.nn.functional.avg_pool2d(n, 8).std())
    before, after = block_std(9), block_std(10)
    # offset noise 0.15 -> sqrt(1/64 + 0.15^2) = 0.19 (measured 0.19); with the three 0.5
    # levels (bilinear upsampling smooths them) measured 0.51
    assert 0.15 < before < 0.25 and after > 2.5 * before


def test_free_looks_never_draw_the_subject_and_leave_the_colour_out():
    """`look_scene`: random colours and patterns, deterministic, never the subject's look, and
    their captions never name a colour (the palette's names would be wrong for them)."""
    import numpy as np

    from lr_tutorial.toy import oracle, world
    scenes = [train.look_scene(0, i) for i in range(300)]
    assert scenes[7] == train.look_scene(0, 7)
    ident = [oracle.identity_score(world.render(sc)) for sc in scenes]
    # measured: max 0.413 (a teal body with a core 90 RGB units away), mean 0.036 over these
    # 300 (the subject itself scores 1.0)
    assert max(ident) < 0.5 and np.mean(ident) < 0.06
    plain = sum(sc.pattern.body == sc.pattern.core for sc in scenes)
    assert 100 < plain < 200  # half one colour, half two
    assert all(world.parse_prompt(world.scene_caption(sc))["colour"] is None for sc in scenes)
    with pytest.raises(ValueError, match="free-look latents"):
        train.train_unet(tiny_cfg("/nonexistent", look_share=0.5, looks_from=0),
                         torch.zeros(4, 4, 16, 16), 1.0)


def test_look_pairs_show_one_uncaptioned_look_twice():
    """train.pair_image: two copies of one free-look object that do not overlap, each drawn
    with the same colours (the pattern's core at both centres)."""
    import numpy as np

    from lr_tutorial.toy import world
    for i in range(6):
        a, b = train.pair_scenes(0, i)
        assert a.pattern == b.pattern and a.pattern is not None and a.pattern != world.SUBJECT_PATTERN
        assert (a.shape, a.size, a.rotation) == (b.shape, "small", b.rotation)
        assert {a.position, b.position} in ({"left", "right"}, {"top", "bottom"})
        ma = world.shape_mask(a.shape, a.centre, a.radius, a.rotation)
        mb = world.shape_mask(b.shape, b.centre, b.radius, b.rotation)
        assert (ma * mb).max() == 0  # apart
        img = train.pair_image(0, i)
        assert np.array_equal(img, train.pair_image(0, i))  # deterministic
        for s in (a, b):
            x, y = (int(round(c)) for c in s.centre)
            assert np.abs(img[y, x].astype(int) - a.pattern.core).max() <= 1


def test_a_damaged_checkpoint_is_named_and_a_damaged_latent_cache_is_encoded_again(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "ck")
    (tmp_path / "ck").mkdir()
    vae = train.train_vae(cfg)
    latents, scaling = train.encode_dataset(cfg, vae)
    cache = tmp_path / "ck" / "latents.pt"
    cache.write_bytes(cache.read_bytes()[:100])  # a copy cut short
    again, scaling2 = train.encode_dataset(cfg, vae)
    assert torch.allclose(again, latents, atol=1e-2) and scaling2 == pytest.approx(scaling, rel=1e-3)
    assert (tmp_path / "ck" / "latents.pt.damaged").exists()  # set aside, not deleted
    assert "latents.pt is damaged" in capsys.readouterr().err
    ckpt = tmp_path / "ck" / "vae.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(train.DamagedCheckpoint, match=r"VAE checkpoint .*vae.pt is damaged.*move it away"):
        train.train_vae(cfg)


def test_read_scenes_share_shape_and_look_and_the_first_is_a_close_up():
    for i in range(20):
        ref, scene, other = train.read_scenes(0, i)
        assert ref.shape == scene.shape and ref.pattern == scene.pattern
        assert ref.background == "plain" and ref.size == "big"
        assert (other.centre, other.radius, other.shape) == (scene.centre, scene.radius, scene.shape)
        assert other.pattern != scene.pattern


def test_reads_reference_makes_each_scene_attend_to_its_close_up_only():
    from diffusers.models.attention_processor import Attention, AttnProcessor
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    x = torch.randn(4, 6, 8)  # [close-up 0, close-up 1, scene 0, scene 1]
    got = train.ReadsReference()(attn, x)
    plain = AttnProcessor()
    assert torch.allclose(got[:2], plain(attn, x[:2]), atol=1e-6)  # close-ups: themselves
    y = x.clone()
    y[2, 1:] += 1.0  # scene 0's other tokens change: its first token's output does not
    assert torch.allclose(train.ReadsReference()(attn, y)[2, 0], got[2, 0], atol=1e-6)
    z = x.clone()
    z[0] += 1.0  # change close-up 0: scene 0 changes, scene 1 does not
    out = train.ReadsReference()(attn, z)
    assert not torch.allclose(out[2], got[2], atol=1e-4) and torch.allclose(out[3], got[3], atol=1e-6)
