"""Self-attention keys/values recorded during one denoising run and read by another.

Stage 2 of Layout-and-Retouch needs, at every retouch step k and layer l, the keys and values
of the context branch (K^c, V^c) and of the reference branch (K^r, V^r). Computing them means
running those branches through the UNet next to the target: three branches, 3x the cost
(retouch.retouch's batched path). But both are already computed elsewhere:

- the context branch at step k >= lambda1 is exactly what stage 1 ran (the personalized model,
  prompt y^p, latent z^c_k): record K^c, V^c there;
- the reference branch at step k is the reference inversion's own UNet call at t_k (one row,
  prompt y^r, latent z^r_{k+1}; retouch.py), the same for every prompt and seed: record K^r,
  V^r while inverting (retouch.riding_inversion(kv=...)), once per reference, and reuse them.

Stage 2 then runs the target rows alone (docs/method.md "Stage 2"; bench/README.md for the cost).

    cache = KVCache(layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn1"], steps=range(10, 50))
    with record_kv(unet, cache):
        sampling.denoise(..., observers=(cache,))
    k, v = cache.get(path, step)   # (rows, heads, HW, d), rows = [uncond; cond] x B

`store="hidden"` keeps the layer's input instead, (rows, HW, C): half the bytes of K and V (for
SD's self-attention C equals K's width), and `keys_values(attn, ...)` projects it with the
layer's own to_k / to_v when it is read. Those projections cost two matrix products per layer
and step, more than halving the host copies saved on an H200 (docs/performance.md), so it is for
when keys and values do not fit the host's memory (LRConfig.kv_store).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Sequence

import torch

from .. import attention
from ..memory import cache_bytes, kv_bytes, kv_plan, reference_plan  # noqa: F401
from ..swap import SwapProcessor


class KVCache:
    """`get(path, step)` -> (K, V), each (rows, heads, HW, d), for the layers and steps asked for
    (`store="hidden"`: (H,), the layer's input (rows, HW, C); `keys_values` gives (K, V) for
    either). Stored on `device` (default: where they were computed; "cpu" keeps GPU memory free)
    in `dtype` (default: the model's).

    Keys/values computed on a GPU and stored on the host go through page-locked (pinned) host
    memory on a side CUDA stream, so neither direction stalls the UNet's kernels: `put` queues
    the device-to-host copy behind the layer that computed them, `get` reads the entry asked for
    and queues the host-to-device copies of the next `prefetch` entries (default: one step's
    layers) while the UNet computes. Pinned memory is taken in
    `SLAB`-byte slabs through torch's caching host allocator, so a later call reuses it.

    Computed and stored on a CPU, each entry is copied into a slab too (unpinned), rather than
    kept as a view of the UNet's own tensor: a run's caches are then a few large allocations
    instead of hundreds of tensors left among the freed activations, and glibc stops handing
    memory back and faulting it in again (toy, 8 images, fresh caches per run: about 40 thousand
    minor page faults per run instead of 820 thousand)."""

    SLAB = 1 << 28  # 256 MiB: a power of two, which the host allocator does not round up

    def __init__(self, layers: Sequence[str], steps: Sequence[int], device=None, dtype=None,
                 prefetch: int | None = None, store: str = "kv"):
        if store not in ("kv", "hidden"):
            raise ValueError(f"store must be 'kv' (keys and values) or 'hidden' (the layer's "
                             f"input, projected when read), got {store!r}")
        self.store = store
        self.layers, self.steps = set(layers), set(int(s) for s in steps)
        self.device, self.dtype = device, dtype
        self.kv: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}  # (K, V) or (H,)
        self.step: int | None = None
        self.group: list[int] | None = None  # several steps in one UNet call (on_steps)
        self.cfg = False
        self.rows: slice | None = None  # this cache's rows of the batch (None: all; sampling.denoise's rider)
        self.prefetch = len(self.layers) if prefetch is None else int(prefetch)
        self._stream = None  # the side CUDA stream of the host copies (pinned path only)
        self._slab, self._used = None, 0  # the slab being filled, bytes used of it
        self._pin = True  # False once pinning failed (then ordinary host memory)
        self._order: list[tuple[str, int]] | None = None  # get's expected order, for prefetch
        self._ahead: dict[tuple[str, int], tuple] = {}  # (path, step) -> ((K, V), event) on the GPU

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

    def put(self, path: str, *tensors: torch.Tensor) -> None:
        """Record (K, V), or (H,) with store="hidden", each with the batch's rows first."""
        if len(tensors) != (1 if self.store == "hidden" else 2):
            raise ValueError(f"a store={self.store!r} cache records "
                             f"{'(H,)' if self.store == 'hidden' else '(K, V)'}, got "
                             f"{len(tensors)} tensors")
        if self.rows is not None:
            tensors = tuple(x[self.rows] for x in tensors)
        self._order = None
        if self.group is None:
            self.kv[(path, self.step)] = tuple(self._keep(x) for x in tensors)
            return
        n = len(self.group)
        for i, step in enumerate(self.group):  # rows i (and n + i, the cond half, under CFG)
            if step in self.steps:
                rows = [i, n + i] if self.cfg else [i]
                self.kv[(path, step)] = tuple(self._keep(x[rows]) for x in tensors)

    def get(self, path: str, step: int, device=None, dtype=None):
        key = (path, step)
        if key not in self.kv:
            have = sorted({s for _, s in self.kv})
            raise KeyError(f"no cached keys/values for {path} at step {step} (cached steps: "
                           f"{have[:3]}...{have[-3:]}); record them with record_kv over the "
                           "same steps and layers") from None
        got = self.kv[key]
        device = torch.device(device) if device is not None else got[0].device
        if self._stream is not None and device.type == "cuda":  # pinned: from the prefetch
            got = self._fetched(key, device)
        elif self._stream is not None:  # the host copies must have landed before a host read
            self._stream.synchronize()
        return tuple(x.to(device, dtype or x.dtype) for x in got)

    def keys_values(self, attn, path: str, step: int, device=None, dtype=None):
        """(K, V), each (rows, heads, HW, d), of `path` at `step`, whatever the store: with
        store="hidden" the stored input projected by `attn` (the layer at `path`)."""
        got = self.get(path, step, device, dtype)
        return attention.project_kv(attn, got[0]) if self.store == "hidden" else got

    def complete(self) -> bool:
        return all((p, s) in self.kv for p in self.layers for s in self.steps)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv.values() for t in kv)

    # ------------------------------------------------------------ slabs, pinned host copies
    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """x, detached, in this cache's dtype and on its device: a copy in a slab where both
        are the CPU (the class docstring), a pinned host copy on a side stream from a GPU."""
        x = x.detach()
        dtype = self.dtype or x.dtype
        target = torch.device(self.device) if self.device is not None else x.device
        if x.device.type == "cpu" and target.type == "cpu":  # copied into a slab
            return self._slab_tensor(x.shape, dtype, pin=False).copy_(x)
        if not (x.is_cuda and target.type == "cpu"):
            return x.to(target, dtype)
        x = x.to(dtype).contiguous()  # on the GPU, in the UNet's stream
        main = torch.cuda.current_stream(x.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(x.device)
        out = self._slab_tensor(x.shape, dtype)
        self._stream.wait_stream(main)  # after the layer that computed x
        with torch.cuda.stream(self._stream):
            out.copy_(x, non_blocking=True)
        x.record_stream(self._stream)  # the allocator keeps x until the copy is done
        return out

    def _slab_tensor(self, shape, dtype, pin: bool = True) -> torch.Tensor:
        """An uninitialised host tensor cut from the current slab (512-byte aligned), pinned
        (page-locked) or not (`pin=False`: a CPU run's caches). Where the OS refuses to pin (a
        memlock limit, some WSL setups), ordinary host memory, with a warning: the same
        result, at synchronising copies' speed."""
        nbytes = math.prod(shape) * dtype.itemsize
        size = -(-nbytes // 512) * 512
        if pin and not self._pin:
            return torch.empty(shape, dtype=dtype)
        try:
            if size > self.SLAB:
                return torch.empty(shape, dtype=dtype, pin_memory=pin)
            if self._slab is None or self._used + size > self.SLAB:
                self._slab, self._used = torch.empty(self.SLAB, dtype=torch.uint8,
                                                     pin_memory=pin), 0
        except RuntimeError as err:
            if not pin:
                raise
            self._pin = False
            warnings.warn(f"could not pin host memory for the key/value cache ({err}); using "
                          "ordinary host memory, whose copies are slower. Raise the memlock "
                          "limit (ulimit -l), or keep the caches on the GPU with "
                          "LRConfig(kv_device='model') if it has room", RuntimeWarning,
                          stacklevel=3)
            return torch.empty(shape, dtype=dtype)
        out = self._slab[self._used:self._used + nbytes].view(dtype).view(shape)
        self._used += size
        return out

    def _fetched(self, key, device):
        """(K, V) of `key` on `device`: waits for its prefetched copy (issuing it if it was not),
        then issues the copies of the next `prefetch` entries in get's expected order (steps
        ascending, layers in the order they were recorded)."""
        if self._order is None:
            rank = {p: i for i, (p, _) in reversed(list(enumerate(self.kv)))}
            self._order = sorted(self.kv, key=lambda ps: (ps[1], rank[ps[0]]))
            self._index = {ps: i for i, ps in enumerate(self._order)}
        i = self._index[key]
        for skipped in [a for a in self._ahead if self._index[a] < i]:  # never read: drop
            del self._ahead[skipped]
        for ahead in self._order[i:i + 1 + self.prefetch]:
            if ahead not in self._ahead:
                self._ahead[ahead] = self._issue(ahead, device)
        got, done = self._ahead.pop(key)
        main = torch.cuda.current_stream(device)
        main.wait_event(done)
        for x in got:
            x.record_stream(main)  # used here, allocated on the copy stream
        return got

    def _issue(self, key, device):
        with torch.cuda.stream(self._stream):
            got = tuple(x.to(device, non_blocking=True) for x in self.kv[key])
            done = torch.cuda.Event()
            done.record(self._stream)
        return got, done


class KVRecordProcessor:
    """Computes self-attention as usual (SDPA) and records its keys/values (or its input, with
    store="hidden") into each cache that wants this layer at this step (each takes its own
    rows); when none does, the layer's original processor runs."""

    def __init__(self, caches: Sequence[KVCache], path: str, original):
        self.caches, self.path, self.original = tuple(caches), path, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        wanting = [c for c in self.caches if c.wants(self.path)]
        if not wanting:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        if attention_mask is not None or encoder_hidden_states is not None:
            raise NotImplementedError("key/value recording is for self-attention without a mask")
        q, k, v = attention.project_qkv(attn, hidden_states)  # (B, heads, HW, d)
        h = (attention.attention_input(attn, hidden_states)  # what to_k / to_v read: (B, HW, C)
             if any(c.store == "hidden" for c in wanting) else None)
        for cache in wanting:
            cache.put(self.path, *((h,) if cache.store == "hidden" else (k, v)))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return attention.output(attn, o, hidden_states)


@contextlib.contextmanager
def record_kv(unet, *caches: KVCache):
    """`with record_kv(unet, cache, ...):` records keys/values of each cache's `layers`
    (self-attention paths) into it; `unet` may be a list of UNets (`bundle.unets`), all
    recording into the caches. Several caches may share a layer: each records the rows and
    steps it is told (`rows`, `on_step`), e.g. stage 1's context and the reference inversion
    riding its calls. Yields the first cache. Raises if a layer is not a self-attention layer
    or is already being captured or swapped (the recording would bypass that processor)."""
    if not caches:
        raise ValueError("record_kv needs at least one KVCache")
    with contextlib.ExitStack() as stack:
        for u in attention.unets_of(unet):
            stack.enter_context(attention.processors(u, _record_processors(u, caches)))
        yield caches[0]


def _record_processors(unet, caches: Sequence[KVCache]) -> dict:
    current = attention.current_processors(unet)
    layers = sorted(set().union(*(c.layers for c in caches)))
    bad = [p for p in layers if not p.endswith("attn1") or p + ".processor" not in current]
    if bad:
        raise ValueError(f"{bad[0]} is not a self-attention layer of this UNet; pick paths from "
                         "attention.select_layers(unet, pattern, 'self')")
    busy = [p for p in layers if not _plain(current[p + ".processor"])]
    if busy:
        raise ValueError(f"{busy[0]} already runs {type(current[busy[0] + '.processor']).__name__};"
                         " record keys/values on layers that are not captured or swapped")
    return {p: KVRecordProcessor([c for c in caches if p in c.layers], p,
                                 current[p + ".processor"]) for p in layers}


def _plain(proc) -> bool:
    return not isinstance(proc, (attention.CaptureProcessor, SwapProcessor,
                                 KVRecordProcessor))
