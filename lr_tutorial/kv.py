"""Self-attention keys/values recorded during one denoising run and read by another.

Stage 2 of Layout-and-Retouch needs, at every retouch step k and layer l, the keys and values
of the context branch (K^c, V^c) and of the reference branch (K^r, V^r). Computing them means
running those branches through the UNet next to the target: three branches, 3x the cost
(retouch.retouch's batched path). But both are already computed elsewhere:

- the context branch at step k >= lambda1 is exactly what stage 1 ran (the personalized model,
  prompt y^p, latent z^c_k): record K^c, V^c there;
- the reference branch replays a fixed trajectory, the same for every prompt and seed: record
  K^r, V^r once per reference (retouch.reference_kv) and reuse them.

Stage 2 then runs the target rows alone (docs/method.md stage 2; bench/README.md for the cost).

    cache = KVCache(layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn1"], steps=range(10, 50))
    with record_kv(unet, cache):
        sampling.denoise(..., observers=(cache,))
    k, v = cache.get(path, step)   # (rows, heads, HW, d), rows = [uncond; cond] x B
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from . import attention


class KVCache:
    """`get(path, step)` -> (K, V), each (rows, heads, HW, d), for the layers and steps asked for.
    Stored on `device` (default: where they were computed; "cpu" keeps GPU memory free) in
    `dtype` (default: the model's)."""

    def __init__(self, layers: Sequence[str], steps: Sequence[int], device=None, dtype=None):
        self.layers, self.steps = set(layers), set(int(s) for s in steps)
        self.device, self.dtype = device, dtype
        self.kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.step: int | None = None
        self.group: list[int] | None = None  # several steps in one UNet call (on_steps)
        self.cfg = False
        self.rows: slice | None = None  # this cache's rows of the batch (None: all; sampling.denoise's rider)

    def on_step(self, k: int, t: int | None = None, cfg: bool = False) -> None:
        self.step, self.group, self.cfg = k, None, cfg

    def on_steps(self, ks: Sequence[int], cfg: bool = False) -> None:
        """The next UNet call holds several steps, one row each (twice under CFG: batch
        [uncond rows of ks; cond rows of ks]); `put` files each step's rows under its step."""
        self.step, self.group, self.cfg = None, [int(k) for k in ks], cfg

    def wants(self, path: str) -> bool:
        if self.rows == attention.NO_ROWS:  # not this cache's call
            return False
        if self.group is not None:
            return path in self.layers and any(k in self.steps for k in self.group)
        if self.step is None:
            raise RuntimeError("the KV cache does not know the step: pass it to the sampler "
                               "(observers=[cache])")
        return self.step in self.steps and path in self.layers

    def put(self, path: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.rows is not None:
            k, v = k[self.rows], v[self.rows]
        to = dict(device=self.device or k.device, dtype=self.dtype or k.dtype)
        if self.group is None:
            self.kv[(path, self.step)] = (k.detach().to(**to), v.detach().to(**to))
            return
        n = len(self.group)
        for i, step in enumerate(self.group):  # rows i (and n + i, the cond half, under CFG)
            if step in self.steps:
                rows = [i, n + i] if self.cfg else [i]
                self.kv[(path, step)] = tuple(x.detach()[rows].to(**to) for x in (k, v))

    def get(self, path: str, step: int, device=None, dtype=None):
        try:
            k, v = self.kv[(path, step)]
        except KeyError:
            have = sorted({s for _, s in self.kv})
            raise KeyError(f"no cached keys/values for {path} at step {step} (cached steps: "
                           f"{have[:3]}...{have[-3:]}); record them with record_kv over the "
                           "same steps and layers") from None
        return k.to(device or k.device, dtype or k.dtype), v.to(device or v.device, dtype or v.dtype)

    def complete(self) -> bool:
        return all((p, s) in self.kv for p in self.layers for s in self.steps)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv.values() for t in kv)


def cache_bytes(unet, layers: Sequence[str], steps: Sequence[int], rows: int,
                latent_size: int | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a KVCache of `layers` x `steps` holds for `rows` batch rows, before recording:

        sum over layers of 2 (K and V) x rows x HW x inner dim x element size, x steps

    Exact (a test compares it with KVCache.nbytes). Stable Diffusion 1.5 at 512 px, the
    default retouch layers (9 decoder layers), fp16: 27.5 MB per row and step, so the
    context's cache of one image (2 rows under CFG, 40 steps) holds 2.2 GB."""
    per_row = sum(attention.layer_resolution(unet, p, latent_size) ** 2
                  * unet.get_submodule(p).to_k.out_features for p in layers)
    return 2 * rows * per_row * len(list(steps)) * (torch.finfo(dtype).bits // 8)


class KVRecordProcessor:
    """Computes self-attention as usual (SDPA) and records its keys/values when the cache wants
    this layer at this step; otherwise the layer's original processor runs."""

    def __init__(self, cache: KVCache, path: str, original):
        self.cache, self.path, self.original = cache, path, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if not self.cache.wants(self.path):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        if attention_mask is not None or encoder_hidden_states is not None:
            raise NotImplementedError("key/value recording is for self-attention without a mask")
        q, k, v = attention.project_qkv(attn, hidden_states)  # (B, heads, HW, d)
        self.cache.put(self.path, k, v)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return attention.output(attn, o, hidden_states)


@contextlib.contextmanager
def record_kv(unet, cache: KVCache):
    """`with record_kv(unet, cache):` records keys/values of `cache.layers` (self-attention
    paths). Raises if a layer is not a self-attention layer or is already being captured or
    swapped (the recording would bypass that processor)."""
    current = attention.current_processors(unet)
    bad = [p for p in cache.layers if not p.endswith("attn1") or p + ".processor" not in current]
    if bad:
        raise ValueError(f"{bad[0]} is not a self-attention layer of this UNet; pick paths from "
                         "attention.select_layers(unet, pattern, 'self')")
    busy = [p for p in cache.layers if not _plain(current[p + ".processor"])]
    if busy:
        raise ValueError(f"{busy[0]} already runs {type(current[busy[0] + '.processor']).__name__};"
                         " record keys/values on layers that are not captured or swapped")
    procs = {p: KVRecordProcessor(cache, p, current[p + ".processor"]) for p in cache.layers}
    with attention.processors(unet, procs):
        yield cache


def _plain(proc) -> bool:
    return not isinstance(proc, (attention.CaptureProcessor, attention.SwapProcessor,
                                 KVRecordProcessor))
