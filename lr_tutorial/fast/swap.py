"""The attention swap on the target rows alone (fast engine): the reference's and the
context's keys and values come from key/value caches (fast/kv.py) instead of their own rows in
the batch, so stage 2 runs B target rows per CFG half instead of 2B + 1. Where one reference
serves every target, the retouch attends to the reference keys inside M^r only (gathered),
the same as masking the others to -inf (swap.multi_source_attention) without the masked SDPA
kernel. Tested equal to swap.SwapProcessor within float rounding (tests/test_fast.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..attention import attention_input, output, split_heads
from ..swap import SwapController, SwapProcessor, _sdpa


class CachedSwapController(SwapController):
    """SwapController for a batch of target rows only: `sources` = {"reference": KVCache,
    "context": KVCache} (kv.kv_plan's and kv.reference_plan's layers and steps)."""

    def __init__(self, unet, config, n_steps: int, latent_size: int | None = None,
                 sources: dict | None = None):
        super().__init__(unet, config, n_steps, latent_size)
        self.sources = sources
        self._keys: dict = {}  # (side, device) -> reference key indices (reference_keys)

    def set_masks(self, target=None, reference=None):
        super().set_masks(target, reference)
        if reference is not None:
            self._keys.clear()

    def reference_keys(self, side: int, device) -> torch.Tensor | None:
        """Indices of the reference's key pixels inside M^r (> 0.5) at side x side, when one
        reference serves every target (else None). An empty mask keeps every key."""
        if self.reference_mask is None or self.reference_mask.shape[0] != 1:
            return None
        key = (side, device)
        if key not in self._keys:
            m = self.mask_at("reference", side, device, torch.float32)[0] > 0.5  # (HW,)
            self._keys[key] = m.nonzero().squeeze(1) if m.any() else torch.arange(
                m.numel(), device=device)
        return self._keys[key]

    def make_processor(self, path: str, original) -> "CachedSwapProcessor":
        return CachedSwapProcessor(self, path, original)


class _CachedSources(Mapping):
    """sources[branch] -> (K, V) of that branch at this layer and step, read from its cache
    when asked (the structure phase never reads the reference's)."""

    def __init__(self, ctl, attn, path, q, halves):
        self.ctl, self.attn, self.path, self.q, self.halves = ctl, attn, path, q, halves

    def __getitem__(self, which):
        n, h, hw, d = self.q.shape
        ks, vs = self.ctl.sources[which].keys_values(self.attn, self.path, self.ctl.step,
                                                     self.q.device, self.q.dtype)
        rows = (1, 1) if ks.shape[0] == 1 else (self.halves, n // self.halves)  # the reference:
        return tuple(x.view(*rows, h, hw, d) for x in (ks, vs))  # one row for every target

    def __iter__(self):
        return iter(("reference", "context"))

    def __len__(self):
        return 2


class CachedSwapProcessor(SwapProcessor):
    """SwapProcessor on target rows only, N = halves x B; the target never reads its own
    keys/values, so only its queries are projected."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        act = self.ctl.action(self.path)
        if act is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        q = split_heads(attn, attn.to_q(attention_input(attn, hidden_states)))  # (N, heads, HW, d)
        halves = 2 if self.ctl.cfg else 1
        sources = _CachedSources(self.ctl, attn, self.path, q, halves)
        o = self.target_attention(act, q.unflatten(0, (halves, -1)), sources, attn.scale)
        return output(attn, o.flatten(0, 1), hidden_states)

    def target_attention(self, act, q_t, sources, scale):
        idx = self.ctl.reference_keys(math.isqrt(q_t.shape[3]), q_t.device) \
            if act == "retouch" else None
        if idx is None:
            return super().target_attention(act, q_t, sources, scale)
        b, hw = q_t.shape[1], q_t.shape[3]
        kr, vr = sources["reference"]  # one reference: keep its keys inside M^r, (.., HW_in, d)
        o_ref = _sdpa(q_t, kr.index_select(-2, idx), vr.index_select(-2, idx), scale)
        o_ctx = _sdpa(q_t, *sources["context"], scale)
        m_t = self.ctl.mask_at("target", math.isqrt(hw), q_t.device, q_t.dtype).expand(b, hw)
        m_t = m_t[None, :, None, :, None]  # (1, B, 1, HW, 1) over queries
        return m_t * o_ref + (1 - m_t) * o_ctx
