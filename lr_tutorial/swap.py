"""The multi-source attention swap of stage 2 (docs/method.md "Stage 2"), through diffusers' processor API.

The target branch's self-attention reads keys/values from the other branches instead of its own:
the context's (the layout image's) in the structure phase, then, in the retouch phase, the
reference photo's for the subject's pixels and the context's elsewhere:

    structure (k < lambda2):  O^t = Attn(Q^t, K^c, V^c)
    retouch (k >= lambda2):   O^t = M^t Attn(Q^t, K^r|M^r, V^r|M^r) + (1 - M^t) Attn(Q^t, K^c, V^c)

`SwapController` holds the per-step state (phase, masks); `SwapProcessor` is installed on the
selected self-attention layers by `swap(unet, controller)`, by module path like every processor
here (lr_tutorial.attention), and restored on exit. Every UNet call's batch holds the three
branches, [reference; context; target], twice ([uncond; cond]) under classifier-free guidance.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .attention import (CaptureProcessor, current_processors, output, processors, project_qkv,
                        select_layers)
from .config import SwapConfig  # noqa: F401  (re-exported: swap.SwapConfig)

BRANCHES = ("reference", "context", "target")


class SwapController:
    """Per-step state shared by the swap processors: the phase, and the target and reference
    masks (B, H, W) in [0, 1] at latent resolution, resized per layer on demand.

    The batch of every UNet call is [reference; context; target], each B rows, or one
    reference row for every target with `shared_reference` ([reference (1); context (B);
    target (B)]), twice ([uncond; cond]) under classifier-free guidance."""

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
        self.shared_reference = False

    def on_step(self, k: int, t: int | None = None, cfg: bool = False) -> None:
        self.step, self.cfg = k, cfg

    def set_masks(self, target: torch.Tensor | None = None, reference: torch.Tensor | None = None):
        """Masks (B, H, W) or (H, W) in [0, 1]; None keeps the current one."""
        if target is not None:
            self.target_mask = target if target.ndim == 3 else target[None]
        if reference is not None:
            self.reference_mask = reference if reference.ndim == 3 else reference[None]
        self._cache.clear()

    def branch_rows(self, rows: int) -> tuple[slice, slice, slice]:
        """The reference's, the context's and the target's rows among `rows` (one CFG half)."""
        r = 1 if self.shared_reference else rows // 3
        b = (rows - r) // 2
        return slice(0, r), slice(r, r + b), slice(r + b, rows)

    def make_processor(self, path: str, original) -> "SwapProcessor":
        return SwapProcessor(self, path, original)

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


def _flat(x: torch.Tensor, lead: tuple) -> torch.Tensor:
    """x (..., heads, N, d), broadcast to the leading dims `lead`, as (prod(lead), heads, N, d)."""
    return x.expand(*lead, *x.shape[-3:]).reshape(-1, *x.shape[-3:])


def _sdpa(q, k, v, scale, mask=None):
    """SDPA over (..., heads, N, d). Leading dims are flattened to one batch dim first: with 5-D
    inputs torch's CPU SDPA takes its slower math path."""
    lead = q.shape[:-3]
    if len(lead) <= 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    o = F.scaled_dot_product_attention(_flat(q, lead), _flat(k, lead), _flat(v, lead), scale=scale,
                                       attn_mask=None if mask is None else _flat(mask, lead))
    return o.view(*lead, *o.shape[-3:])


def multi_source_attention(q_t: torch.Tensor, reference: tuple, context: tuple,
                           m_t: torch.Tensor, m_r: torch.Tensor, scale: float) -> torch.Tensor:
    """The retouch's multi-source swap (docs/method.md "Stage 2"):

        O^t = M^t * Attn(Q^t, K^r|M^r, V^r|M^r)  +  (1 - M^t) * Attn(Q^t, K^c, V^c)

    q_t: (halves, B, heads, HW, d); reference, context: (K, V), each (halves, 1 or B, heads, HW,
    d); m_t: (B, HW) in [0, 1] over the target's queries; m_r: (1 or B, HW) bool over the
    reference's keys, those outside get -inf logits (an empty M^r keeps every key)."""
    b, hw = q_t.shape[1], q_t.shape[3]
    m_r = m_r | ~m_r.any(dim=1, keepdim=True)
    o_ref = _sdpa(q_t, *reference, scale, mask=m_r.expand(b, hw)[None, :, None, None, :])
    o_ctx = _sdpa(q_t, *context, scale)
    m_t = m_t.expand(b, hw)[None, :, None, :, None]
    return m_t * o_ref + (1 - m_t) * o_ctx


class SwapProcessor:
    """Self-attention of the target branch reading keys/values from the other branches:

        structure:  O^t = Attn(Q^t, K^c, V^c)
        retouch:    O^t = multi_source_attention(Q^t, (K^r, V^r), (K^c, V^c), M^t, M^r)
        reference:  O^t = Attn(Q^t, K^r, V^r)              (single-source ablation)

    Reference and context rows attend to themselves as usual."""
    swaps_attention = True  # attention.capture refuses to wrap it (it would bypass the swap)

    def __init__(self, controller: SwapController, path: str, original):
        self.ctl, self.path, self.original = controller, path, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        act = self.ctl.action(self.path)
        if act is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        q, k, v = project_qkv(attn, hidden_states)  # (N, heads, HW, d)
        o = _sdpa(q, k, v, attn.scale)  # every branch attends to itself, then the target:
        halves = 2 if self.ctl.cfg else 1
        q, k, v, o = (x.unflatten(0, (halves, -1)) for x in (q, k, v, o))  # (halves, rows, ...)
        ref, ctx, tgt = self.ctl.branch_rows(q.shape[1])
        sources = {"reference": (k[:, ref], v[:, ref]), "context": (k[:, ctx], v[:, ctx])}
        o[:, tgt] = self.target_attention(act, q[:, tgt], sources, attn.scale)
        return output(attn, o.flatten(0, 1), hidden_states)

    def target_attention(self, act: str, q_t: torch.Tensor, sources, scale: float):
        """The target's attention output, (halves, B, heads, HW, d). sources[branch]: (K, V) of
        that branch, (halves, 1 or B, heads, HW, d)."""
        if act == "structure":
            return _sdpa(q_t, *sources["context"], scale)
        if act == "reference":
            return _sdpa(q_t, *sources["reference"], scale)
        side = math.isqrt(q_t.shape[3])
        m_t = self.ctl.mask_at("target", side, q_t.device, q_t.dtype)
        m_r = self.ctl.mask_at("reference", side, q_t.device, q_t.dtype) > 0.5
        return multi_source_attention(q_t, sources["reference"], sources["context"], m_t, m_r,
                                      scale)


@contextlib.contextmanager
def swap(unet, controller: SwapController):
    """`with swap(unet, controller):` installs the controller's processor (SwapProcessor) on
    the structure and retouch layers."""
    current = current_processors(unet)
    paths = sorted(controller.structure | controller.retouch)
    captured = [p for p in paths if isinstance(current[p + ".processor"], CaptureProcessor)]
    if captured:
        raise ValueError(f"{captured[0]} is being captured; the swap would bypass the capture. "
                         "Capture cross-attention (attn2) during a swap, not self-attention")
    procs = {p: controller.make_processor(p, current[p + ".processor"]) for p in paths}
    with processors(unet, procs):
        yield controller
