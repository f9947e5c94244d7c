"""Attention capture through diffusers processors: exact, explicit about memory, restored."""
import math

import pytest
import torch

from lr_tutorial import attention, swap
from lr_tutorial.toy import components


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return components.build_unet().eval()


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor(500),
            torch.randn(batch, components.MAX_LENGTH, 64, generator=g))


def test_capture_does_not_change_the_output(unet):
    z, t, ctx = _inputs()
    with torch.no_grad():
        ref = unet(z, t, ctx).sample
        with attention.capture(unet, attention.CaptureSpec(kind="both")) as store:
            store.on_step(0)
            got = unet(z, t, ctx).sample
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    assert len(store.layers()) == len(attention.attention_layers(unet))


def test_capture_shapes_resolutions_and_estimate(unet):
    spec = attention.CaptureSpec(layers="*", kind="cross", tokens=[1, 2, 3], steps=[0, 2])
    z, t, ctx = _inputs()
    with torch.no_grad(), attention.capture(unet, spec) as store:
        for k in range(3):
            store.on_step(k, cfg=True)  # batch is [uncond; cond]: only the cond half is kept
            unet(z, t, ctx)
    assert store.steps() == [0, 2]
    for (layer, _), m in store.maps.items():
        side = attention.layer_resolution(unet, layer)
        assert m.shape == (1, side * side, 3) and m.dtype == torch.float16
        assert torch.allclose(m.float().sum(-1), m.float().sum(-1))  # finite
    est = spec.estimate(unet, steps=3, batch=1, cfg=True)
    assert est == store.nbytes
    cm = store.cross_map(token=1, size=16)
    assert cm.shape == (1, 16, 16) and torch.isfinite(cm).all()


def _held_bytes(store) -> int:
    """Bytes the store really holds: each distinct storage once (a view keeps its whole parent)."""
    held = {}
    for m in store.maps.values():
        held[m.untyped_storage().data_ptr()] = m.untyped_storage().nbytes()
    return sum(held.values())


SCRUBBER_SPECS = {  # what the scrubber and notebook 02 capture, and a float32 worst case
    "cross, all tokens, heads mean": dict(kind="cross"),
    "cross, all tokens, heads kept": dict(kind="cross", heads="all"),
    "self at the top resolution, one step": dict(kind="self", resolutions=[8], steps=[1]),
    "both, heads kept, float32": dict(kind="both", heads="all", dtype=torch.float32),
}


@pytest.mark.parametrize("kw", SCRUBBER_SPECS.values(), ids=SCRUBBER_SPECS.keys())
def test_estimate_is_within_10_percent_of_the_store_on_tiny_sd(kw):
    """Tiny SD (SD 1.5's blocks, 8 x 8 latents, 77 text tokens), CFG batch 2, three steps."""
    from tiny_sd import CROSS_DIM, tiny_unet
    unet = tiny_unet()
    spec = attention.CaptureSpec(**kw)
    est = spec.estimate(unet, steps=3, batch=1, cfg=True)  # before the run
    g = torch.Generator().manual_seed(0)
    z, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, CROSS_DIM, generator=g)
    with torch.no_grad(), attention.capture(unet, spec) as store:
        for k in range(3):
            store.on_step(k, cfg=True)
            unet(z, torch.tensor(500), ctx)
    real = _held_bytes(store)
    assert store.nbytes == real  # nothing held beyond what the store reports
    assert abs(est / real - 1) <= 0.10, (est, real)


def test_estimate_from_a_bundle_uses_its_text_length(unet):
    """The toy's text is 16 tokens, not SD's 77: given the bundle, the estimate knows."""
    from lr_tutorial.models import ModelBundle
    tok = components.build_tokenizer()
    bundle = ModelBundle(tok, components.build_text_encoder(tok), components.build_vae(), unet,
                         components.build_scheduler())
    spec = attention.CaptureSpec(kind="cross")
    z, t, ctx = _inputs()
    with torch.no_grad(), attention.capture(unet, spec) as store:
        for k in range(2):
            store.on_step(k, cfg=True)
            unet(z, t, ctx)
    est = spec.estimate(bundle, steps=2)
    assert abs(est / _held_bytes(store) - 1) <= 0.10
    assert est == spec.estimate(unet, steps=2, n_tokens=components.MAX_LENGTH)


def test_cross_attention_rows_sum_to_one_over_all_tokens(unet):
    z, t, ctx = _inputs(batch=1)
    with torch.no_grad(), attention.capture(unet, attention.CaptureSpec(kind="cross")) as store:
        store.on_step(0)
        unet(z, t, ctx)
    for m in store.maps.values():
        assert torch.allclose(m.float().sum(-1), torch.ones(1), atol=1e-2)


def test_layer_resolution_matches_the_sequence_length(unet):
    z, t, ctx = _inputs(batch=1)
    with torch.no_grad(), attention.capture(unet, attention.CaptureSpec(kind="self")) as store:
        store.on_step(0)
        unet(z, t, ctx)
    for (layer, _), m in store.maps.items():
        assert int(math.isqrt(m.shape[1])) == attention.layer_resolution(unet, layer)
    # SD 1.x's block layout: attention at 16, 8 and 4, plus the mid block at 2 (SD: 64/32/16 + 8);
    # decoder self-attention in up_blocks 1-3
    sizes = {attention.layer_resolution(unet, p) for p in attention.attention_layers(unet)}
    assert sizes == {16, 8, 4, 2}
    assert {attention.layer_resolution(unet, p) for p in attention.select_layers(unet, "mid_block*")} == {2}
    dec = attention.select_layers(unet, "up_blocks.*", kind="self")
    assert {p.split(".")[1] for p in dec} == {"1", "2", "3"}


def test_spec_matching_nothing_raises_with_a_helpful_message(unet):
    with pytest.raises(ValueError, match="no attention layer matches"):
        with attention.capture(unet, attention.CaptureSpec(layers="up_blocks.9.*")):
            pass
    with pytest.raises(ValueError, match="resolutions"):
        attention.select_layers(unet, "*", resolutions=[64])


def test_processors_are_restored_also_after_an_exception(unet):
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    ids_before = {k: id(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with attention.capture(unet, attention.CaptureSpec(kind="both")):
            assert any(isinstance(p, attention.CaptureProcessor) for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert {k: id(v) for k, v in unet.attn_processors.items()} == ids_before


def test_offload_at_the_end_or_per_step_stores_the_same_maps_on_the_cpu(unet):
    z, t, ctx = _inputs()
    stores = {}
    for offload in ("end", "step"):
        with torch.no_grad(), attention.capture(unet, attention.CaptureSpec(
                kind="both", offload=offload)) as store:
            store.on_step(0)
            unet(z, t, ctx)
        stores[offload] = store
    end, step = stores["end"], stores["step"]
    assert end.maps.keys() == step.maps.keys() and end.nbytes == step.nbytes > 0
    for key, m in end.maps.items():
        assert m.device.type == "cpu" and torch.equal(m, step.maps[key])
    with pytest.raises(ValueError, match="offload"):
        attention.CaptureSpec(offload="never")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offload_end_keeps_maps_on_the_gpu_until_the_capture_ends_also_after_an_error():
    torch.manual_seed(0)
    gpu = components.build_unet().eval().cuda()
    z, t, ctx = (x.cuda() for x in _inputs())
    seen = {}
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), attention.capture(gpu, attention.CaptureSpec()) as store:
            store.on_step(0)
            gpu(z, t, ctx)
            seen["during"] = {m.device.type for m in store.maps.values()}
            raise RuntimeError("boom")
    assert seen["during"] == {"cuda"} and {m.device.type for m in store.maps.values()} == {"cpu"}


def test_store_without_step_fails_loudly(unet):
    z, t, ctx = _inputs(batch=1)
    with pytest.raises(RuntimeError, match="does not know the step"):
        with torch.no_grad(), attention.capture(unet, attention.CaptureSpec()):
            unet(z, t, ctx)


# ----------------------------------------------------------------------------- swap
def _swap_run(unet, z, ctx, mode, step, cfg=False, ref_mask=None, tgt_mask=None, shared=False):
    ctl = swap.SwapController(unet, swap.SwapConfig(lambda2=4, mode=mode), n_steps=10)
    ctl.shared_reference = shared
    ctl.set_masks(target=tgt_mask if tgt_mask is not None else torch.rand(1, 16, 16),
                  reference=ref_mask if ref_mask is not None else torch.ones(1, 16, 16))
    with torch.no_grad(), swap.swap(unet, ctl):
        ctl.on_step(step, cfg=cfg)
        return unet(z, torch.tensor(500), ctx).sample


@pytest.mark.parametrize("mode", ["multi", "reference", "context"])
@pytest.mark.parametrize("step", [0, 7])  # structure phase, retouch phase
def test_swap_from_identical_sources_is_a_no_op(unet, mode, step):
    z1, _, c1 = _inputs(batch=1, seed=3)
    z = z1.repeat(6, 1, 1, 1)  # [ref, ctx, tgt] x [uncond, cond], all the same image
    ctx = c1.repeat(6, 1, 1)
    with torch.no_grad():
        ref = unet(z, torch.tensor(500), ctx).sample
    got = _swap_run(unet, z, ctx, mode, step, cfg=True)
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()


def test_swap_changes_only_the_target_rows(unet):
    z, _, c = _inputs(batch=3, seed=4)  # ref, ctx, tgt: three different latents
    with torch.no_grad():
        plain = unet(z, torch.tensor(500), c).sample
    for step in (0, 7):
        got = _swap_run(unet, z, c, "multi", step, ref_mask=(torch.rand(1, 16, 16) > 0.5).float())
        assert torch.allclose(plain[:2], got[:2], atol=1e-5)  # reference and context untouched
        assert (plain[2] - got[2]).abs().max() > 1e-3  # the target reads from the others


@pytest.mark.parametrize("step", [0, 7])
def test_one_shared_reference_row_equals_a_reference_row_per_target(unet, step):
    """Batched stage 2 with one reference for every target: [ref (1); ctx (B); tgt (B)] per CFG
    half computes what [ref (B, the same latent repeated); ctx; tgt] computes, with B - 1 fewer
    rows."""
    torch.manual_seed(0)
    b = 3
    zr, zc, zt = torch.randn(1, 4, 16, 16), torch.randn(b, 4, 16, 16), torch.randn(b, 4, 16, 16)
    cr, cc = torch.randn(1, components.MAX_LENGTH, 64), torch.randn(b, components.MAX_LENGTH, 64)
    ref_mask, tgt_mask = (torch.rand(1, 16, 16) > 0.5).float(), torch.rand(b, 16, 16)
    half_full = (torch.cat([zr.expand(b, -1, -1, -1), zc, zt]), torch.cat([cr.expand(b, -1, -1), cc, cc]))
    half_one = (torch.cat([zr, zc, zt]), torch.cat([cr, cc, cc]))
    full = _swap_run(unet, torch.cat([half_full[0]] * 2), torch.cat([half_full[1]] * 2), "multi",
                     step, cfg=True, ref_mask=ref_mask, tgt_mask=tgt_mask)
    one = _swap_run(unet, torch.cat([half_one[0]] * 2), torch.cat([half_one[1]] * 2), "multi",
                    step, cfg=True, ref_mask=ref_mask, tgt_mask=tgt_mask, shared=True)
    assert one.shape[0] == 2 * (2 * b + 1)
    for h in range(2):  # the target rows of each CFG half, then the context rows
        torch.testing.assert_close(one[h * (2 * b + 1) + 1 + b:(h + 1) * (2 * b + 1)],
                                   full[h * 3 * b + 2 * b:(h + 1) * 3 * b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one[h * (2 * b + 1) + 1:h * (2 * b + 1) + 1 + b],
                                   full[h * 3 * b + b:h * 3 * b + 2 * b], atol=1e-5, rtol=1e-5)
    plain = _swap_run(unet, torch.cat([half_one[0]] * 2), torch.cat([half_one[1]] * 2), "none",
                      step, cfg=True, ref_mask=ref_mask, tgt_mask=tgt_mask, shared=True)
    assert (plain[1 + b:2 * b + 1] - one[1 + b:2 * b + 1]).abs().max() > 1e-3  # the swap acts


def test_retouch_with_zero_target_mask_equals_context_only(unet):
    z, _, c = _inputs(batch=3, seed=5)
    zero = torch.zeros(1, 16, 16)
    a = _swap_run(unet, z, c, "multi", 7, tgt_mask=zero)
    b = _swap_run(unet, z, c, "context", 7, tgt_mask=zero)
    assert torch.allclose(a, b, atol=1e-5)


def test_swap_layer_selection_matching_nothing_raises(unet):
    with pytest.raises(ValueError, match="no attention layer matches"):
        swap.SwapController(unet, swap.SwapConfig(retouch_layers="decoder.*"), 10)


def test_nested_captures_each_get_their_own_spec(unet):
    z, t, ctx = _inputs(batch=1)
    outer = attention.CaptureSpec(kind="cross", tokens=[1])
    inner = attention.CaptureSpec(kind="cross", resolutions=[16], heads="all")
    with torch.no_grad(), attention.capture(unet, outer) as s1:
        with attention.capture(unet, inner) as s2:
            s1.on_step(0), s2.on_step(0)
            unet(z, t, ctx)
        s1.on_step(1)
        unet(z, t, ctx)  # after the inner exits, the outer still records
    assert len(s1.layers()) == len(attention.select_layers(unet, "*", "cross"))
    assert s1.steps() == [0, 1] and s2.steps() == [0]
    assert all(attention.layer_resolution(unet, layer) == 16 for layer in s2.layers())
    assert all(m.ndim == 4 for m in s2.maps.values())  # heads kept


def test_capturing_self_attention_of_a_swapped_layer_raises(unet):
    ctl = swap.SwapController(unet, swap.SwapConfig(), n_steps=10)
    with swap.swap(unet, ctl):
        with pytest.raises(ValueError, match="runs the attention swap"):
            with attention.capture(unet, attention.CaptureSpec(kind="self")):
                pass
        with attention.capture(unet, attention.CaptureSpec(kind="cross")):
            pass


def test_kv_recording_leaves_the_output_unchanged_and_records_what_was_asked(unet):
    from lr_tutorial.fast.kv import KVCache, record_kv
    layers = attention.select_layers(unet, "up_blocks.*attn1", "self")
    z, t, ctx = _inputs()
    with torch.no_grad():
        ref = unet(z, t, ctx).sample
    cache = KVCache(layers, steps=[3])
    with torch.no_grad(), record_kv(unet, cache):
        cache.on_step(3)
        out = unet(z, t, ctx).sample
        cache.on_step(4)  # not asked for: nothing recorded
        unet(z, t, ctx)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.complete() and {s for _, s in cache.kv} == {3}
    k, v = cache.get(layers[0], 3)
    assert k.shape[0] == z.shape[0] and k.shape == v.shape
    with pytest.raises(KeyError, match="record_kv"):
        cache.get(layers[0], 4)
    with pytest.raises(ValueError, match="not a self-attention layer"):
        with record_kv(unet, KVCache([layers[0].replace("attn1", "attn2")], [0])):
            pass


def test_kv_recording_into_several_caches_gives_each_its_own_rows_and_layers(unet):
    """Stage 1 records the context's keys/values and, in the same UNet calls, the riding
    reference inversion's: one processor per layer, each cache its own rows, layers and steps."""
    from lr_tutorial.attention import NO_ROWS
    from lr_tutorial.fast.kv import KVCache, KVRecordProcessor, record_kv
    layers = attention.select_layers(unet, "up_blocks.*attn1", "self")
    z, t, ctx = _inputs(batch=3)
    alone = KVCache(layers, steps=[2])
    with torch.no_grad(), record_kv(unet, alone):
        alone.on_step(2)
        unet(z, t, ctx)
    first = KVCache(layers, steps=[2])  # rows 0-1 of each call
    second = KVCache(layers[:1], steps=[2, 5])  # row 2, one layer
    first.rows, second.rows = slice(0, 2), slice(2, 3)
    with torch.no_grad(), record_kv(unet, first, second) as got:
        assert got is first
        first.on_step(2)
        second.on_step(2)
        unet(z, t, ctx)
        second.on_step(5)  # first sits this call out
        first.rows = NO_ROWS
        unet(z, t, ctx)
    assert first.complete() and second.complete() and len(second.kv) == 2
    for path in layers:
        torch.testing.assert_close(first.get(path, 2), tuple(x[:2] for x in alone.get(path, 2)))
    torch.testing.assert_close(second.get(layers[0], 2),
                               tuple(x[2:] for x in alone.get(layers[0], 2)))
    # on a CPU each entry is a compact copy cut from its cache's slab, not a view that keeps
    # the UNet's whole (rows, heads, HW, d) tensor alive among the freed activations
    for cache in (first, second):
        kept = [x for kv in cache.kv.values() for x in kv]
        assert {x.untyped_storage().data_ptr() for x in kept} == {
            cache._slab.untyped_storage().data_ptr()}
        assert all(x.is_contiguous() for x in kept)
    assert not any(isinstance(p, KVRecordProcessor) for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="at least one"):
        with record_kv(unet):
            pass


def test_kv_cache_bytes_are_known_before_recording(unet):
    from lr_tutorial.fast.kv import KVCache, cache_bytes, record_kv
    layers = attention.select_layers(unet, "up_blocks.*attn1", "self")
    z, t, ctx = _inputs(batch=3)
    cache = KVCache(layers, steps=[1, 2])
    with torch.no_grad(), record_kv(unet, cache):
        for k in (1, 2):
            cache.on_step(k)
            unet(z, t, ctx)
    assert cache.nbytes == cache_bytes(unet, layers, [1, 2], rows=3) > 0
    assert cache_bytes(unet, layers, [1, 2], rows=3, dtype=torch.float16) == cache.nbytes // 2
    hidden = KVCache(layers, steps=[1, 2], store="hidden")
    with torch.no_grad(), record_kv(unet, hidden):
        for k in (1, 2):
            hidden.on_step(k)
            unet(z, t, ctx)
    assert hidden.nbytes == cache_bytes(unet, layers, [1, 2], rows=3, store="hidden") > 0
    for key, (k, v) in cache.kv.items():  # projected when read: the recorded keys and values
        attn = unet.get_submodule(key[0])
        hk, hv = hidden.keys_values(attn, *key)
        torch.testing.assert_close(hk, k, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(hv, v, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="records"):
        hidden.put(layers[0], k, v)
    with pytest.raises(ValueError, match="store must be"):
        KVCache(layers, steps=[1], store="values")


def test_swap_attention_helpers_equal_their_plain_definitions():
    """The swap's fast paths compute the same numbers as the definitions they replace:
    _sdpa on (halves, B, heads, N, d) equals SDPA per 4-D slice, and attending to the gathered
    keys inside M^r equals masking the others to -inf (float rounding: 1e-6 measured, 1e-5 bound)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2, 16, 4, generator=g) for _ in range(3))
    scale = 0.5
    flat = swap._sdpa(q, k, v, scale)
    per = torch.stack([torch.stack([torch.nn.functional.scaled_dot_product_attention(
        q[i], k[i], v[i], scale=scale)[j:j + 1][0] for j in range(3)]) for i in range(2)])
    assert flat.shape == q.shape and torch.allclose(flat, per, atol=1e-5)
    inside = torch.zeros(16, dtype=torch.bool)
    inside[[1, 2, 5, 6, 9]] = True
    idx = inside.nonzero().squeeze(1)
    gathered = swap._sdpa(q, k.index_select(-2, idx), v.index_select(-2, idx), scale)
    masked = swap._sdpa(q, k, v, scale, mask=inside.expand(3, 16)[None, :, None, None, :])
    assert torch.allclose(gathered, masked, atol=1e-5)
    assert not torch.allclose(gathered, flat, atol=1e-3)  # the mask does something


def test_current_processors_match_the_unet_and_follow_changes(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0
    before = attention.current_processors(unet)
    assert before == unet.attn_processors
    path = attention.select_layers(unet, "up_blocks.*attn1", "self")[0]
    mine = AttnProcessor2_0()
    with attention.processors(unet, {path: mine}):
        now = attention.current_processors(unet)
        assert now == unet.attn_processors and now[path + ".processor"] is mine
    assert attention.current_processors(unet) == before == unet.attn_processors
