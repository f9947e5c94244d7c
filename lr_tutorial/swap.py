"""The multi-source attention swap of stage 2 (docs/method.md "Stage 2"), through diffusers' processor API.

The target branch's self-attention reads keys/values from the other branches instead of its own:
the context's (the layout image's) in the structure phase, then, in the retouch phase, the
reference photo's for the subject's pixels and the context's elsewhere. `SwapController` holds
the per-step state (phase, masks, where the other branches' keys/values come from);
`SwapProcessor` is installed on the selected self-attention layers by `swap(unet, controller)`,
by module path like every processor here (lr_tutorial.attention), and restored on exit.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .attention import (CaptureProcessor, attention_input, current_processors, output,
                        processors, project_qkv, select_layers, split_heads)
from .config import SwapConfig  # noqa: F401  (re-exported: swap.SwapConfig)

BRANCHES = ("reference", "context", "target")


class SwapController:
    """Per-step state shared by the swap processors: the phase, and the target and reference
    masks (B, H, W) in [0, 1] at latent resolution, resized per layer on demand.

    The batch of every UNet call is [reference; context; target] (each B rows, or one
    reference row for all with `shared_reference`), twice ([uncond; cond]) under
    classifier-free guidance; or, with `sources` set to KV caches of the reference and the
    context (lr_tutorial.kv), the target rows alone.
    """

    def __init__(self, unet, config: SwapConfig, n_steps: int, latent_size: int | None = None):
        self.config = config
        self.lambda2 = config.lambda2_steps(n_steps)
        self.structure = set(select_layers(unet, config.structure_layers, "self"))
        self.retouch = set(select_layers(unet, config.retouch_layers, "self"))
        self.latent_size = latent_size or unet.config.sample_size
        self.step: int | None = None
        self.cfg = False
        self.target_mask: torch.Tensor | None = None
        self.reference_mask: torch.Tensor | None = None
        self._cache: dict = {}
        self._keys: dict = {}  # (side, device) -> reference key indices (reference_keys)
        # None: the batch holds [reference; context; target]. Else {"reference": KVCache,
        # "context": KVCache} and the batch holds the target rows only (lr_tutorial.kv).
        self.sources: dict | None = None
        # batched only: True when one reference row serves every target (per CFG half
        # [reference (1); context (B); target (B)], 2B + 1 rows instead of 3B)
        self.shared_reference = False

    def on_step(self, k: int, t: int | None = None, cfg: bool = False) -> None:
        self.step, self.cfg = k, cfg

    def set_masks(self, target: torch.Tensor | None = None, reference: torch.Tensor | None = None):
        """Masks (B, H, W) or (H, W) in [0, 1]; None keeps the current one."""
        if target is not None:
            self.target_mask = target if target.ndim == 3 else target[None]
        if reference is not None:
            self.reference_mask = reference if reference.ndim == 3 else reference[None]
            self._keys.clear()
        self._cache.clear()

    def reference_keys(self, side: int, device) -> torch.Tensor | None:
        """Indices of the reference's key pixels inside M^r (> 0.5) at side x side, when one
        reference serves every target (else None): the retouch attends to these keys only,
        the same as masking the others to -inf but without the masked (slower) SDPA kernel.
        An empty mask keeps every key."""
        if self.reference_mask is None or self.reference_mask.shape[0] != 1:
            return None
        key = (side, device)
        if key not in self._keys:
            m = self.mask_at("reference", side, device, torch.float32)[0] > 0.5  # (HW,)
            self._keys[key] = m.nonzero().squeeze(1) if m.any() else torch.arange(
                m.numel(), device=device)
        return self._keys[key]

    def mask_at(self, which: str, side: int, device, dtype) -> torch.Tensor:
        """(B, side*side) mask for a layer working at side x side."""
        key = (which, side, device, dtype)
        if key not in self._cache:
            m = self.target_mask if which == "target" else self.reference_mask
            if m is None:
                raise RuntimeError(f"the swap needs a {which} mask: call controller.set_masks()")
            m = m[:, None].to(device, torch.float32, non_blocking=True)  # resized on `device`
            m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
            self._cache[key] = m.flatten(1).to(dtype)
        return self._cache[key]

    def action(self, path: str) -> str | None:
        """What the target's self-attention does at this layer and step."""
        if self.step is None:
            raise RuntimeError("the swap controller does not know the step: pass it to the "
                               "sampler (observers=[controller])")
        mode = self.config.mode
        if mode == "none":
            return None
        if self.step < self.lambda2:
            return "structure" if path in self.structure else None
        if path in self.retouch:
            return {"multi": "retouch", "reference": "reference", "context": "structure"}[mode]
        return None


def _sdpa(q, k, v, scale, mask=None):
    """SDPA over (..., heads, N, d). Leading dims are flattened to one batch dim first: with 5-D
    inputs torch's CPU SDPA takes its math path, 3.2x slower on the toy's 16 x 16 layers."""
    lead = q.shape[:-3]
    if len(lead) <= 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    flat = lambda x: x.expand(*lead, *x.shape[-3:]).reshape(-1, *x.shape[-3:])  # noqa: E731
    o = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), scale=scale,
                                       attn_mask=None if mask is None else flat(mask))
    return o.view(*lead, *o.shape[-3:])


class SwapProcessor:
    """Self-attention of the target branch reading keys/values from the other branches:

        structure:  O^t = Attn(Q^t, K^c, V^c)
        retouch:    O^t = M^t * Attn(Q^t, K^r|M^r, V^r) + (1 - M^t) * Attn(Q^t, K^c, V^c)
        reference:  O^t = Attn(Q^t, K^r, V^r)              (single-source ablation)

    K|M: keys outside the reference mask get -inf logits. Reference and context rows attend
    to themselves as usual."""
    swaps_attention = True  # attention.capture refuses to wrap it (it would bypass the swap)

    def __init__(self, controller: SwapController, path: str, original):
        self.ctl, self.path, self.original = controller, path, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        act = self.ctl.action(self.path)
        if act is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        if self.ctl.sources is None:  # batched: every branch's keys/values are in the batch
            q, k, v = project_qkv(attn, hidden_states)  # (N, heads, HW, d)
        else:  # cached: the target reads the others' keys/values only, never its own
            q = split_heads(attn, attn.to_q(attention_input(attn, hidden_states)))
        halves = 2 if self.ctl.cfg else 1
        n, h, hw, d = q.shape
        if self.ctl.sources is None:  # batched: per half, rows [ref (R); ctx (B); tgt (B)]
            per = n // halves
            r = 1 if self.ctl.shared_reference else per // 3  # R = 1 (shared) or B
            b = (per - r) // 2
            split = lambda x: x.view(halves, per, h, hw, d)  # noqa: E731
            q5, k5, v5 = split(q), split(k), split(v)
            o = _sdpa(q, k, v, attn.scale).view(halves, per, h, hw, d).clone()
            rows = {"reference": slice(0, r), "context": slice(r, r + b)}
            src = lambda w: (k5[:, rows[w]], v5[:, rows[w]])  # noqa: E731  (halves, R|B, ...)
            o[:, r + b:] = self.target_output(act, q5[:, r + b:], src, attn.scale)
        else:  # cached: N = halves * B target rows; K/V of the sources from their KV caches
            b = n // halves

            def src(which):
                ks, vs = self.ctl.sources[which].keys_values(attn, self.path, self.ctl.step,
                                                             q.device, q.dtype)
                if ks.shape[0] == 1:  # the reference: one row for both halves and every target
                    return tuple(x.view(1, 1, h, hw, d) for x in (ks, vs))
                return tuple(x.view(halves, b, h, hw, d) for x in (ks, vs))  # the context
            o = self.target_output(act, q.view(halves, b, h, hw, d), src, attn.scale)
        return output(attn, o.reshape(n, h, hw, d), hidden_states)

    def target_output(self, act, qt, src, scale):
        """The target's attention output. qt: (halves, B, heads, HW, d); src(branch) -> (K, V)
        of that branch, (halves, 1 or B, heads, HW, d) (one row: shared by every target;
        _sdpa broadcasts it)."""
        b, hw = qt.shape[1], qt.shape[3]
        if act == "structure":
            return _sdpa(qt, *src("context"), scale)
        if act == "reference":
            return _sdpa(qt, *src("reference"), scale)
        side = int(math.isqrt(hw))  # retouch: masked multi-source
        kr, vr = src("reference")
        idx = self.ctl.reference_keys(side, qt.device)
        if idx is not None:  # one reference: keep the keys inside M^r, (.., HW_in, d)
            o_ref = _sdpa(qt, kr.index_select(-2, idx), vr.index_select(-2, idx), scale)
        else:  # a reference per target: mask the keys outside M^r to -inf
            mr = self.ctl.mask_at("reference", side, qt.device, qt.dtype) > 0.5  # (B, HW)
            mr = mr | ~mr.any(dim=1, keepdim=True)  # an empty mask falls back to all keys
            key_mask = mr.expand(b, hw)[None, :, None, None, :]  # (1, B, 1, 1, HW) over keys
            o_ref = _sdpa(qt, kr, vr, scale, mask=key_mask)
        o_ctx = _sdpa(qt, *src("context"), scale)
        mt = self.ctl.mask_at("target", side, qt.device, qt.dtype).expand(b, hw)
        mt = mt[None, :, None, :, None]  # (1, B, 1, HW, 1) over queries
        return mt * o_ref + (1 - mt) * o_ctx


@contextlib.contextmanager
def swap(unet, controller: SwapController):
    """`with swap(unet, controller):` installs SwapProcessor on the structure/retouch layers."""
    current = current_processors(unet)
    paths = sorted(controller.structure | controller.retouch)
    captured = [p for p in paths if isinstance(current[p + ".processor"], CaptureProcessor)]
    if captured:
        raise ValueError(f"{captured[0]} is being captured; the swap would bypass the capture. "
                         "Capture cross-attention (attn2) during a swap, not self-attention")
    procs = {p: SwapProcessor(controller, p, current[p + ".processor"]) for p in paths}
    with processors(unet, procs):
        yield controller
