"""The fast engine (lr_tutorial/fast/), LRConfig(engine="fast"): each piece computes what the
reference engine computes, within the float tolerance stated at each comparison."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from lr_tutorial import attention, sampling, swap
from lr_tutorial.fast.riding import Inversion, step_blended_riding
from lr_tutorial.layout import LayoutConfig, step_blended
from lr_tutorial.masks import MaskConfig
from lr_tutorial.pipeline import LayoutAndRetouch, LRConfig
from lr_tutorial.sd import load_sd

from tiny_sd import make_tiny_lora, make_tiny_sd, tiny_unet
from test_pipeline import PROMPTS, SEEDS, bundle  # noqa: F401  (the fixture)


@pytest.mark.parametrize("mode", ["multi", "reference", "context"])
def test_cached_stage2_equals_the_batched_three_branch_stage2(bundle, mode):
    """The fast path (target rows alone, K/V of the context from stage 1 and of the reference
    from its inversion's calls) computes the same thing as the three-branch batch."""
    n = 8
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    out = {}
    for stage2 in ("batched", "cached"):
        cfg = LRConfig(engine="fast", layout=LayoutConfig(steps=n), swap=swap.SwapConfig(mode=mode),
                       mask=MaskConfig(adaptive=True), stage2=stage2)  # the per-step masks too
        lr = LayoutAndRetouch(bundle, cfg)
        out[stage2] = lr(PROMPTS, ref, seed=SEEDS)
    a, b = out["batched"], out["cached"]
    assert len(a.target) == len(b.target) == n - lr.start_step() == 4
    for za, zb in zip(a.target.latents, b.target.latents):
        torch.testing.assert_close(za, zb, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(a.masks.per_step, b.masks.per_step, atol=1e-5)
    # context-only: the target, started from z^c at lambda2 and reading the context's own
    # keys/values, *is* the context; with the reference, the swap acts
    same = torch.allclose(b.target.latents[-1], b.layout.trajectory.latents[-1], atol=1e-4)
    assert same == (mode == "context")


def test_cached_stage2_storing_layer_inputs_equals_the_batched_stage2(bundle):
    """kv_store="hidden": the caches hold each layer's input and stage 2 projects it with the
    layer's to_k / to_v; the same result as the three-branch batch, at half the bytes."""
    n = 8
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    out, lrs = {}, {}
    for store in ("batched", "kv", "hidden"):
        cfg = LRConfig(engine="fast", layout=LayoutConfig(steps=n), stage2="batched" if store == "batched"
                       else "cached", kv_store="kv" if store == "batched" else store)
        lrs[store] = LayoutAndRetouch(bundle, cfg)
        out[store] = lrs[store](PROMPTS, ref, seed=SEEDS)
    assert out["hidden"].config["kv_store_used"] == "hidden"
    assert out["kv"].config["kv_store_used"] == "kv" and out["batched"].config["kv_store_used"] is None
    for za, zb in zip(out["batched"].target.latents, out["hidden"].target.latents):
        torch.testing.assert_close(za, zb, atol=2e-5, rtol=1e-4)
    # SD's self-attention: the input is as wide as K, so half the bytes of K and V
    assert 2 * lrs["hidden"].kv_bytes(2) == lrs["kv"].kv_bytes(2)
    (cache,) = lrs["hidden"]._reference_kv.values()
    assert cache.store == "hidden" and all(len(e) == 1 and e[0].ndim == 3 for e in cache.kv.values())


def test_cached_stage2_needs_the_target_to_start_after_lambda1(bundle):
    cfg = LRConfig(engine="fast", layout=LayoutConfig(steps=6, lambda1=3), start_step=1, stage2="cached")
    with pytest.raises(ValueError, match="stage2='batched'"):
        LayoutAndRetouch(bundle, cfg)("a sks dog", np.zeros((64, 64, 3), np.uint8))
    for stage2 in ("batched", "auto"):  # the three-branch batch computes the context itself
        cfg.stage2 = stage2
        res = LayoutAndRetouch(bundle, cfg)("a sks dog", np.zeros((64, 64, 3), np.uint8))
        assert len(res.target) == 5 and res.config["stage2_used"] == "batched"


def test_auto_stage2_caches_keys_and_values_only_within_the_budget(bundle, monkeypatch):
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    lr = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6)))
    need = lr.kv_bytes(batch=2)  # context: 2 prompts x 2 CFG rows; reference: 1 row
    assert need > 0 and lr.kv_bytes(batch=4) - need == 2 * (lr.kv_bytes(batch=3) - need)
    assert lr.kv_budget() > need  # default: half the available memory
    res = lr(PROMPTS, ref, seed=SEEDS)
    assert res.config["stage2_used"] == "cached"
    # what was really cached: the context's caches of this call plus the reference's, one row
    # a step (its inversion's own UNet call, recorded while it rode stage 1)
    assert lr.kv_bytes(batch=2) == sum(c.nbytes for c in lr._reference_kv.values()) * (2 * 2 + 1)
    lr.config.kv_budget_gb = (need - 1) / 1024 ** 3  # one byte short: the batched path
    assert lr.stage2_path(2) == "batched" and lr.stage2_path(1) == "cached"
    small = lr(PROMPTS, ref, seed=SEEDS)
    assert small.config["stage2_used"] == "batched"
    assert next(iter(small.attention.maps.values())).shape[0] == 2 * 2 + 1  # [ref; ctx x2; tgt x2]
    torch.testing.assert_close(small.target.latents[-1], res.target.latents[-1], atol=2e-5,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="kv_budget_gb"):
        LRConfig(engine="fast", kv_budget_gb=-1)
    # one prompt with a new reference: cached on a CPU (its keys/values are recorded while it
    # is inverted: nothing extra to pay), and again with the reference known
    one = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6)))
    assert one(PROMPTS[0], ref, seed=0).config["stage2_used"] == "cached"
    assert one(PROMPTS[1], ref, seed=0).config["stage2_used"] == "cached"
    assert one.stage2_path(1, new_reference=True) == "cached"
    # on a GPU the caches live in host memory (pinned, copied on a side stream) and the budget
    # is the host's; with kv_device="model" they live on the GPU and the budget is its free
    # memory (H200, SD 1.5, 512 px, 8 images: cached 3.1x a plain run, batched 3.5x)
    assert one.stage2_path(2) == "cached"
    monkeypatch.setattr(type(bundle), "device", property(lambda self: torch.device("cuda")))
    assert one.cache_device() == "cpu" and one.stage2_path(2) == "cached"
    # there the first cached call pins host memory: one image with a new reference is batched
    assert one.stage2_path(1, new_reference=True) == "batched"
    assert one.stage2_path(1, new_reference=False) == "cached"
    monkeypatch.setattr("lr_tutorial.memory.free_memory", lambda device: 0)
    assert one.stage2_path(2) == "cached"  # the host's budget
    on_gpu = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6), kv_device="model"))
    assert on_gpu.cache_device() is None and on_gpu.stage2_path(2) == "batched"  # no GPU room
    from lr_tutorial import memory  # the caches count in the GPU's peak only there
    host = memory.estimate(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6)), 2, stage2="cached")
    gpu = memory.estimate(bundle, on_gpu.config, 2, stage2="cached")
    assert gpu.kv_caches == on_gpu.kv_bytes(2) > 0 == host.kv_caches
    assert gpu.total - host.total == gpu.kv_caches
    assert any("kv_device='host'" in o for o in memory.options(gpu, bundle, 2))
    with pytest.raises(ValueError, match="kv_device"):
        LRConfig(engine="fast", kv_device="gpu")
    with pytest.raises(ValueError, match="kv_store"):
        LRConfig(engine="fast", kv_store="keys")
    # auto store: keys/values (on an H200 re-projecting the layers' inputs costs stage 2 more
    # than the halved copies save, docs/performance.md), unless
    # the caches cross host <-> GPU and only the inputs (half the bytes) fit the budget
    assert one.cache_store(2) == "kv" and on_gpu.cache_store(2) == "kv"
    kv, hidden = one.kv_bytes(2, "kv"), one.kv_bytes(2, "hidden")
    assert hidden * 2 == kv
    one.config.kv_budget_gb = (kv - 1) / 1024 ** 3
    assert one.cache_store(2) == "hidden" and one.stage2_path(2) == "cached"
    assert on_gpu.cache_store(2) == "kv"  # no crossing: nothing to halve
    one.config.kv_budget_gb = (hidden - 1) / 1024 ** 3
    assert one.stage2_path(2) == "batched"


def test_reference_keys_values_are_cached_across_calls(bundle):
    lr = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6)))
    ref = np.zeros((64, 64, 3), np.uint8)
    lr("a sks dog", ref, seed=0)
    lr("a sks dog on the beach", ref, seed=1)
    assert len(lr._reference_kv) == 1
    (cache,) = lr._reference_kv.values()
    assert cache.complete() and cache.nbytes > 0
    # a new reference (or new lambda2) replaces it instead of piling up 1.1 GB per reference
    # at SD 1.5 scale (512 px): by default one is kept, the least recently used goes first
    other = np.full((64, 64, 3), 255, np.uint8)
    lr(["a sks dog", "a sks dog"], other, seed=[0, 1])  # two prompts: auto caches
    (cache2,) = lr._reference_kv.values()
    assert cache2 is not cache and len(lr._references) == 2  # the inversions are small: kept
    cached = LRConfig(engine="fast", layout=LayoutConfig(steps=6), stage2="cached")
    two = LayoutAndRetouch(bundle, cached, reference_kv_kept=2)
    for image in (ref, other, ref, ref):
        two("a sks dog", image, seed=0)
    first, second = two._reference_kv.values()
    assert len(two._reference_kv) == 2 and first is not second
    two.config.swap.lambda2 = 5  # other steps: a new cache; `other`'s (least recent) goes
    two("a sks dog", ref, seed=0)
    assert list(two._reference_kv.values())[0] is second
    # kept 0: made for each call, never kept; the result is the same
    none = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6), stage2="cached"),
                            reference_kv_kept=0)
    # its first call inverts the reference riding stage 1, whose batch then holds one row more
    # than `lr`'s: on some CPUs (an AMD EPYC) that moves the context by float
    # rounding (5e-6); from the second call on both run the same batches
    none("a sks dog", ref, seed=0)
    torch.testing.assert_close(none("a sks dog", ref, seed=0).target.latents[-1],
                               lr("a sks dog", ref, seed=0).target.latents[-1], atol=0, rtol=0)
    assert not none._reference_kv and none("a sks dog", ref, seed=0).config["stage2_used"] == "cached"
    lr.clear_caches()
    assert not lr._reference_kv and not lr._references
    with pytest.raises(ValueError, match="reference_kv_kept"):
        LayoutAndRetouch(bundle, LRConfig(engine="fast"), reference_kv_kept=-1)


def test_kv_cache_files_the_rows_of_a_multi_step_call_under_their_steps():
    """Several steps in one UNet call (reference_kv's replay of the inversion's calls: one row a
    step); under CFG the batch is [uncond rows of the steps; cond rows of the steps], and each
    step must get its own (uncond, cond) pair."""
    from lr_tutorial.fast.kv import KVCache
    cache = KVCache(["a.attn1"], steps=[4, 5, 6])
    k = torch.arange(6.0).view(6, 1, 1, 1)  # rows: u4 u5 u6 c4 c5 c6
    cache.on_steps([4, 5, 6], cfg=True)
    assert cache.wants("a.attn1") and not cache.wants("b.attn1")
    cache.put("a.attn1", k, -k)
    for i, step in enumerate([4, 5, 6]):
        kk, vv = cache.get("a.attn1", step)
        assert kk.flatten().tolist() == [i, 3 + i] and torch.equal(vv, -kk)
    cache.on_steps([7], cfg=False)
    assert not cache.wants("a.attn1")  # step 7 was not asked for
    cache.on_steps([6, 7], cfg=False)
    cache.put("a.attn1", k[:2] + 10, k[:2])
    assert cache.get("a.attn1", 6)[0].flatten().tolist() == [10.0]
    assert cache.complete() and not any(s == 7 for _, s in cache.kv)


def test_reference_inversion_rides_stage_1_with_the_same_result(bundle):
    """The first call with a new reference runs its DDIM inversion inside stage 1's UNet calls
    (one more row each, its own timestep; in the vanilla steps that row alone runs the LoRA,
    ModelBundle.personal_rows), recording the reference's keys/values as it goes: n fewer UNet
    calls (no inversion call of its own) and no replay, the same inversion, mask, layout,
    reference keys/values and result as computing them apart (up to float rounding)."""
    n = 8
    ref = (np.random.default_rng(1).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    calls = []
    hook = bundle.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        riding = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=n)))
        res = riding(PROMPTS, ref, seed=SEEDS)
        n_riding = len(calls)
        apart = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=n)))
        calls.clear()
        alone = apart.reference(ref)  # the inversion by itself: n calls
        assert len(calls) == n
        res2 = apart(PROMPTS, ref, seed=SEEDS)
        n_apart = len(calls)
    finally:
        hook.remove()
    lambda1 = res.layout.lambda1
    # riding: n fewer calls (every stage-1 call, vanilla ones included, carries the inversion's
    # row: 2B + 1 rows), and none for the reference's keys/values, which the inversion's own
    # calls recorded (apart: replayed, n - start = 4 steps in one call)
    assert lambda1 == 2 and n_apart - n_riding == n + 1
    assert n_riding == 2 * n - res.target.start and calls[:n] != [2 * len(PROMPTS)] * n
    (rec,), (rep,) = riding._reference_kv.values(), apart._reference_kv.values()
    assert rec.kv.keys() == rep.kv.keys() and len(rec.kv) == 4 * len(rec.layers) > 0
    for key, (k, v) in rec.kv.items():
        assert k.shape[0] == 1  # one row a step: the inversion's evaluation, both CFG halves
        torch.testing.assert_close((k, v), rep.kv[key], atol=1e-4, rtol=1e-4)  # measured: 1.1e-5
    assert res2.reference is alone
    for a, b in zip(res.reference.trajectory.latents, alone.trajectory.latents):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(res.reference.attention, alone.attention, atol=1e-5)
    np.testing.assert_array_equal(res.reference.mask.mask > 0.5, alone.mask.mask > 0.5)
    torch.testing.assert_close(res.layout.trajectory.final, res2.layout.trajectory.final,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.target.latents[-1], res2.target.latents[-1], atol=1e-4,
                               rtol=1e-4)
    # the stage-1 attention store and key/value cache kept their own rows only
    assert next(iter(res.layout.store.maps.values())).shape[0] == len(PROMPTS)
    assert riding.reference(ref) is res.reference  # cached for the next call
    from lr_tutorial.fast.kv import KVCache
    from lr_tutorial.fast.riding import riding_inversion
    with pytest.raises(ValueError, match="guidance=1.0"):  # the recorded row is y^r's alone
        with riding_inversion(bundle, ref[0], PROMPTS[0], 2, steps=n, mask_cfg=MaskConfig(),
                              ride_steps=0, guidance=3.0, kv=KVCache([], [])):
            pass


def test_personal_rows_run_the_lora_on_the_marked_rows_only(bundle):
    """ModelBundle.personal_rows (the reference inversion riding stage 1's vanilla steps): in
    one vanilla-mode UNet call the last rows get the personalized model (peft's own forward,
    LoRA on), the others the vanilla one, as if each ran in a call of its own; on exit (also
    after an exception) the bundle is plain vanilla again, and with fuse_lora too (vanilla
    keeps the weights unmerged)."""
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    t = torch.tensor(500)
    with bundle.using("personalized"):
        cond = sampling.encode_prompts(bundle, ["a sks dog"] * 3)
        want_p = bundle.unet(z, t, encoder_hidden_states=cond).sample
    for fuse in (False, True):
        bundle.set_fuse_lora(fuse)
        try:
            with bundle.using("vanilla"):
                want_v = bundle.unet(z, t, encoder_hidden_states=cond).sample
                with bundle.personal_rows(2):  # fuse_lora: the merged weights' op on row 2
                    got = bundle.unet(z, t, encoder_hidden_states=cond).sample
                with pytest.raises(KeyError):  # an error inside the block undoes it all the same
                    with bundle.personal_rows(0):
                        raise KeyError("boom")
                after = bundle.unet(z, t, encoder_hidden_states=cond).sample
        finally:
            bundle.set_fuse_lora(False)
        assert (want_p - want_v).abs().max() > 1e-3  # the LoRA changes the output: can fail
        # measured: the vanilla rows equal, the personalized row 4.5e-7 apart (sd15; sd2
        # 2.7e-7): the same formula as peft's, computed on one row instead of three
        torch.testing.assert_close(got[:2], want_v[:2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got[2:], want_p[2:], atol=1e-6, rtol=1e-5)
        assert torch.equal(after, want_v)  # hooks gone, adapters off again
    with bundle.using("personalized"), pytest.raises(RuntimeError, match="using\\('vanilla'\\)"):
        with bundle.personal_rows(0):
            pass
    assert bundle.mixes_rows


def test_the_reference_inverted_only_as_far_as_stage_2_reads_it(bundle):
    """LRConfig(engine="fast", reference_inversion="start"): the inversion stops at the target's first step
    (retouch.reference_stop), its trajectory exactly the full inversion's from that step on,
    and every one of its calls rides stage 1 (no call of its own); a target started earlier
    gets the steps in between, a mask window that ends before the start keeps one of its
    steps, and a reference that stops after the target's start is refused."""
    from lr_tutorial.retouch import reference_stop, retouch
    n = 8
    ref = (np.random.default_rng(2).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    z = sampling.encode(bundle, ref)
    with bundle.using("personalized"):
        full = sampling.ddim_invert(bundle, z, "a sks dog", steps=n)
        inv = Inversion(bundle, z, "a sks dog", steps=n, stop=5)
        while not inv.done:
            inv.step_alone()
    part = inv.trajectory()
    assert part.start == 5 and len(part) == 3 and len(part.latents) == 4
    assert part.timesteps == full.timesteps[5:]
    for k in range(5, n + 1):  # the same calls in the same order: equal bit for bit
        assert torch.equal(part.latent(k), full.latent(k))
    with pytest.raises(IndexError, match="k = 5..8, not k = 4"):
        part.latent(4)
    with pytest.raises(ValueError, match="stop must be a step"):
        Inversion(bundle, z, steps=n, stop=n)

    assert reference_stop(MaskConfig(), n, 4) == 4
    assert reference_stop(MaskConfig(attention_window=(0.0, 0.25)), n, 4) == 1  # window: 0, 1
    cfg = LRConfig(engine="fast", layout=LayoutConfig(steps=n), reference_inversion="start")
    early = LayoutAndRetouch(bundle, replace(cfg, start_step=0))
    res = early(PROMPTS[:1], ref, seed=0)  # batched (the target starts before lambda1)
    assert res.reference.trajectory.start == 0 and len(res.target) == n
    late = LayoutAndRetouch(bundle, cfg)
    calls = []
    hook = bundle.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        res = late(PROMPTS[:1], ref, seed=0)
    finally:
        hook.remove()
    k0 = late.start_step()
    assert res.reference.trajectory.start == k0 == 4
    assert len(calls) == n + (n - k0)  # stage 1's calls and stage 2's: the inversion rode
    full = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=n)))(PROMPTS[:1], ref,
                                                                           seed=0)
    for k in range(k0, n + 1):  # the same inversion from there on (riding: float rounding)
        torch.testing.assert_close(res.reference.trajectory.latent(k),
                                   full.reference.trajectory.latent(k), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reference_inversion must be"):
        LRConfig(engine="fast", reference_inversion="half")
    with pytest.raises(ValueError, match="inverted down to step 4, but the target starts at step 2"):
        retouch(bundle, res.layout, res.reference, np.ones((1, 8, 8), np.float32), [2],
                swap_cfg=late.config.swap, mask_cfg=late.config.mask, steps=n, guidance=7.5,
                start_step=2)


def test_half_precision_key_value_caches_halve_their_memory(bundle):
    """LRConfig(engine="fast", kv_dtype="float16") on a float32 model: the caches take half the bytes, and the
    result stays close to the float32 caches' (the target reads rounded keys/values)."""
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    out = {}
    for dt in (None, "float16"):
        lr = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6), stage2="cached",
                                               kv_dtype=dt))
        out[dt] = (lr, lr(PROMPTS, ref, seed=SEEDS))
    (lr32, r32), (lr16, r16) = out[None], out["float16"]
    assert lr16.kv_bytes(2) * 2 == lr32.kv_bytes(2)
    (c16,), (c32,) = lr16._reference_kv.values(), lr32._reference_kv.values()
    assert c16.nbytes * 2 == c32.nbytes and next(iter(c16.kv.values()))[0].dtype == torch.float16
    # measured: max |difference| of the final latents 1.9e-5 (sd15) and 4.1e-5 (sd2) on these
    # tiny models, latents up to 22 and 3.3 in magnitude; the bound leaves a factor of 10
    assert (r16.target.latents[-1] - r32.target.latents[-1]).abs().max() < 5e-4
    assert not torch.equal(r16.target.latents[-1], r32.target.latents[-1])  # rounding did act
    with pytest.raises(ValueError, match="kv_dtype"):
        LRConfig(engine="fast", kv_dtype="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pinned_host_kv_cache_round_trips_in_any_order_on_a_gpu():
    """On a GPU the cache keeps keys/values in pinned host memory, copied on a side stream both
    ways, with prefetch: what comes back must be bit-identical whatever the read order."""
    from lr_tutorial.fast.kv import KVCache
    layers, steps = ["a.attn1", "b.attn1", "c.attn1"], [3, 4, 5]
    cache = KVCache(layers, steps, device="cpu", dtype=torch.float16)
    g = torch.Generator("cuda").manual_seed(0)
    want = {}
    for s in steps:
        cache.on_step(s)
        for p in layers:
            k = torch.randn(2, 4, 64, 8, device="cuda", generator=g)
            want[(p, s)] = k.half()
            cache.put(p, k, -k)
            k.add_(1.0)  # the UNet reuses its buffers: the cache must hold its own copy
    assert all(t.is_pinned() for kv in cache.kv.values() for t in kv)
    assert cache.nbytes == 9 * 2 * 2 * 4 * 64 * 8 * 2
    order = [(p, s) for s in steps for p in layers]  # the expected order, then a shuffled one
    for key in order + [order[i] for i in (7, 0, 4, 8, 2)]:
        k, v = cache.get(*key, device="cuda", dtype=torch.float16)
        assert k.is_cuda and torch.equal(k, want[key]) and torch.equal(v, -want[key])
    k, _ = cache.get("b.attn1", 4, device="cpu")  # a host read waits for the copies
    assert torch.equal(k, want[("b.attn1", 4)].cpu())
    assert len(cache._ahead) <= cache.prefetch + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cached_stage2_on_a_gpu_with_host_caches_equals_the_batched_stage2(tmp_path):
    """The pinned-host, side-stream path of the cached stage 2 against the three-branch batch,
    both on the GPU in float32 (tolerance: convolutions may run TF32 in either path)."""
    make_tiny_sd(tmp_path / "base")
    make_tiny_lora(tiny_unet(), tmp_path / "lora")
    gpu = load_sd(str(tmp_path / "base"), personalized=str(tmp_path / "lora"), class_noun="dog",
                  device="cuda", dtype=torch.float32, local_files_only=True)
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    out = {}
    for stage2 in ("batched", "cached"):
        lr = LayoutAndRetouch(gpu, LRConfig(engine="fast", layout=LayoutConfig(steps=8), stage2=stage2,
                                            mask=MaskConfig(adaptive=True)))
        out[stage2] = lr(PROMPTS, ref, seed=SEEDS)
        out[stage2 + "2"] = lr(PROMPTS, ref, seed=SEEDS)  # cached: the reference's K/V reused
    assert out["cached"].config["stage2_used"] == "cached"
    # the trajectories' host copies are asynchronous on a GPU: all landed when the loop returns
    z, traj = sampling.sample(gpu, PROMPTS, SEEDS, steps=6)
    assert torch.equal(traj.latents[-1], z.cpu()) and all(x.isfinite().all() for x in traj.x0)
    for res in (out["cached"], out["batched"]):
        traj = res.target
        assert len(traj.latents) == len(traj.x0) + 1 and all(
            x.abs().sum() > 0 for x in traj.latents)
        # the adaptive masks stay on the GPU and reach the host asynchronously: all landed
        per = res.masks.per_step
        assert per.shape[0] == len(traj.x0) and np.isfinite(per).all()
        assert per.min() >= 0 and per.max() <= 1
        np.testing.assert_array_equal(per[0], np.stack([m.mask for m in res.masks.context]))
        assert (per[1:] >= per[0] - 1e-6).all()  # max(M^c, own): never below the context's
    for name in ("cached", "cached2", "batched2"):
        for za, zb in zip(out["batched"].target.latents, out[name].target.latents):
            print(name, (za - zb).abs().max().item())
            torch.testing.assert_close(za, zb, atol=2e-4, rtol=1e-3)
    # the reference inverted to the target's first step only, every call riding stage 1 and
    # recording into pinned host memory: the same result on both paths
    start = {s: LayoutAndRetouch(gpu, LRConfig(engine="fast", layout=LayoutConfig(steps=8), stage2=s,
                                               reference_inversion="start"))(PROMPTS, ref, seed=SEEDS)
             for s in ("batched", "cached")}
    assert start["cached"].reference.trajectory.start == 4
    assert start["cached"].config["stage2_used"] == "cached"
    for za, zb in zip(start["batched"].target.latents, start["cached"].target.latents):
        torch.testing.assert_close(za, zb, atol=2e-4, rtol=1e-3)


def test_the_host_budget_counts_pinned_memory_cached_from_an_earlier_call(monkeypatch):
    """An earlier call's pinned key/value slabs stay in torch's host allocator for the next call
    to reuse; they are not `available` to the OS, so the budget adds them back (both spellings
    of the allocator's statistics)."""
    from lr_tutorial.fast import pipeline
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    new = {"allocated_bytes.current": 5 << 30, "active_bytes.current": 1 << 30}
    old = {"reserved_bytes.current": 3 << 30, "allocated_bytes.current": 1 << 30}
    for stats, idle in ((new, 4 << 30), (old, 2 << 30), ({}, 0)):
        monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda s=stats: s)
        assert pipeline.idle_pinned_bytes() == idle
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: new)
    with_idle = pipeline.available_memory()
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: {})
    assert abs(with_idle - pipeline.available_memory() - (4 << 30)) < 256 << 20  # OS noise


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where pinning fails")
def test_kv_cache_falls_back_to_ordinary_host_memory_when_pinning_fails():
    """Without CUDA, pin_memory raises: the cache warns once and uses ordinary memory."""
    import warnings
    from lr_tutorial.fast.kv import KVCache
    cache = KVCache(["a.attn1"], steps=[0], device="cpu")
    with pytest.warns(RuntimeWarning, match="could not pin host memory"):
        x = cache._slab_tensor((2, 3, 5), torch.float16)
    assert x.shape == (2, 3, 5) and x.dtype == torch.float16 and not x.is_pinned()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert cache._slab_tensor((4,), torch.float32).shape == (4,)


def test_full_dreambooth_unet_runs_the_whole_method(tmp_path):
    """A full DreamBooth UNet is a second module, which the personalized steps call. Stage 1's
    mask capture and key/value recording, the riding reference inversion's capture and a
    user's stage-2 capture must be installed on both UNets. They sat on the vanilla one only,
    and the method failed: "no cross-attention maps stored"."""
    from lr_tutorial.fast.kv import KVRecordProcessor
    make_tiny_sd(tmp_path / "base")
    make_tiny_sd(tmp_path / "db", seed=1)
    db = load_sd(str(tmp_path / "base"), personalized=str(tmp_path / "db"), class_noun="dog",
                 local_files_only=True)
    assert db.personalization == "dreambooth" and len(db.unets) == 2
    assert not db.mixes_rows  # the inversion's first lambda1 steps run alone here
    with db.using("vanilla"), pytest.raises(ValueError, match="another UNet"):
        with db.personal_rows(1):
            pass
    with db.using("personalized"):  # more steps than stage 1's personalized calls: refused
        inv = Inversion(db, torch.zeros(1, 4, 8, 8), "a sks dog", steps=6)
    with pytest.raises(ValueError, match="cannot mix its row into the vanilla calls"):
        step_blended_riding(db, PROMPTS, SEEDS, LayoutConfig(steps=6), rider=inv)
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    out = {s: LayoutAndRetouch(db, LRConfig(engine="fast", layout=LayoutConfig(steps=6), stage2=s))(
        PROMPTS, ref, seed=SEEDS) for s in ("batched", "cached")}
    assert out["cached"].config["stage2_used"] == "cached"
    for za, zb in zip(out["batched"].target.latents, out["cached"].target.latents):
        torch.testing.assert_close(za, zb, atol=2e-5, rtol=1e-4)
    spec = attention.CaptureSpec(layers="*attn2", kind="cross")
    res = LayoutAndRetouch(db, LRConfig(engine="fast", layout=LayoutConfig(steps=6)))(PROMPTS[0], ref, seed=0,
                                                                       capture=spec)
    assert res.capture.steps() == list(range(6 - len(res.target), 6))  # every stage-2 step
    ours = (attention.CaptureProcessor, swap.SwapProcessor, KVRecordProcessor)
    assert not any(isinstance(p, ours) for u in db.unets for p in u.attn_processors.values())


def test_the_fast_engine_equals_the_reference_engine(bundle):
    """One call of each engine on the same prompts, seeds and reference photo. The fast one
    inverts the reference riding stage 1's calls and runs stage 2 on the target rows alone,
    reading cached keys/values; the reference engine runs the plain inversion and three
    branches per call. Other batch shapes round differently: latents agree within 2e-5 + 1e-4
    relative (measured: 3.8e-6 on SD 1.5's tiny config, 1.6e-6 on SD 2's), masks within 1e-5, images within 1 grey level."""
    ref = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    out = {}
    for engine in ("reference", "fast"):
        cfg = LRConfig(engine=engine, layout=LayoutConfig(steps=8), mask=MaskConfig(adaptive=True))
        out[engine] = LayoutAndRetouch(bundle, cfg)(PROMPTS, ref, seed=SEEDS)
    a, b = out["reference"], out["fast"]
    assert a.config["stage2_used"] == "batched" and b.config["stage2_used"] == "cached"
    for ta, tb in ((a.layout.trajectory, b.layout.trajectory), (a.target, b.target),
                   (a.reference.trajectory, b.reference.trajectory)):
        assert len(ta.latents) == len(tb.latents) > 1
        for za, zb in zip(ta.latents, tb.latents):
            torch.testing.assert_close(za, zb, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(a.masks.per_step, b.masks.per_step, atol=1e-5)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def test_the_engine_is_chosen_by_one_switch(bundle):
    from lr_tutorial.fast.pipeline import FastLayoutAndRetouch
    assert type(LayoutAndRetouch(bundle)) is LayoutAndRetouch  # the reference, by default
    fast = LayoutAndRetouch(bundle, LRConfig(engine="fast", layout=LayoutConfig(steps=6)))
    assert isinstance(fast, FastLayoutAndRetouch)
    with pytest.raises(ValueError, match="engine must be one of"):
        LRConfig(engine="turbo")
    with pytest.raises(ValueError, match="stage2='cached'.*engine='fast'"):
        LRConfig(stage2="cached")
    fast.config.engine = "reference"  # chosen when the pipeline is made: a later change is refused
    with pytest.raises(ValueError, match="chosen when the pipeline is made"):
        fast("a sks dog", np.zeros((64, 64, 3), np.uint8))


def test_stage_1_riding_nothing_is_stage_1_bit_for_bit(bundle):
    a = step_blended_riding(bundle, PROMPTS, SEEDS, LayoutConfig(steps=6))
    b = step_blended(bundle, PROMPTS, SEEDS, LayoutConfig(steps=6))
    for za, zb in zip(a.trajectory.latents, b.trajectory.latents):
        assert torch.equal(za, zb)


def test_the_inversion_one_step_at_a_time_is_ddim_invert_bit_for_bit(bundle):
    z = sampling.encode(bundle, (np.random.default_rng(1).random((1, 64, 64, 3)) * 255
                                 ).astype(np.uint8))
    with bundle.using("personalized"):
        full = sampling.ddim_invert(bundle, z, "a sks dog", steps=6)
        inv = Inversion(bundle, z, "a sks dog", steps=6)
        while not inv.done:
            inv.step_alone()
    for za, zb in zip(full.latents, inv.trajectory().latents):
        assert torch.equal(za, zb)
