"""The fast engine's LayoutAndRetouch: LRConfig(engine="fast").

The same method as lr_tutorial.pipeline, the same results within float rounding
(tests/test_fast.py), with the speed work of this subpackage:
- stage 2 on the target rows alone, reading the context's keys/values recorded in stage 1 and
  the reference's recorded by its inversion (LRConfig.stage2 "cached"; kv.py, stage2.py), or
  the reference engine's three-branch stage 2 ("batched") where the caches do not fit
  (`stage2_path`);
- a new reference's inversion riding stage 1's UNet calls (riding.py);
- the reference's key/value caches kept for the `reference_kv_kept` most recently used
  references and settings (1.1 GB each at SD 1.5's 512 px in fp16, pinned host memory on a
  GPU); an older one is freed before a new one is made.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import attention, masks, memory, sampling
from ..config import LRConfig, resolve_steps
from ..pipeline import ENGINES, LayoutAndRetouch, Masks, Result, run_record, versions
from ..prompts import check_prompts, token_index
from ..retouch import aggregate, reference_result, retouch
from .kv import KVCache, kv_bytes, kv_plan, record_kv, reference_plan
from .riding import rideable_steps, riding_inversion, step_blended_riding
from .stage2 import reference_kv, retouch_cached


def available_memory() -> int:
    """Bytes of host memory available now (psutil's `available`, else free pages), plus the
    pinned memory torch's host allocator holds cached but unused (an earlier call's key/value
    caches, which the next call reuses: without them the budget would shrink call by call)."""
    try:
        import psutil
        free = int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with Jupyter; without it, the free pages (Linux, macOS)
        import os
        free = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return free + idle_pinned_bytes()


def idle_pinned_bytes() -> int:
    """Pinned host bytes cached by torch's host allocator and not in use (0 without CUDA).
    The statistics' names changed across torch releases; both spellings are read."""
    import torch
    if not torch.cuda.is_available():
        return 0
    s = torch.cuda.host_memory_stats()
    if "active_bytes.current" in s:  # allocated = owned (in use + cached), active = in use
        idle = s.get("allocated_bytes.current", 0) - s["active_bytes.current"]
    else:  # older: reserved = owned, allocated = in use
        idle = s.get("reserved_bytes.current", 0) - s.get("allocated_bytes.current", 0)
    return max(0, int(idle))


class FastLayoutAndRetouch(LayoutAndRetouch):
    """LayoutAndRetouch with the fast engine (module docstring). `clear_caches()` frees the
    reference inversions and key/value caches; on a GPU, torch's caching host allocator keeps
    the pinned part for the next call to reuse."""

    def __init__(self, models, config: LRConfig | None = None, segmenter="auto",
                 reference_kv_kept: int = 1):
        if isinstance(reference_kv_kept, bool) or not isinstance(reference_kv_kept, int) \
                or reference_kv_kept < 0:
            raise ValueError(f"reference_kv_kept must be an int >= 0 (how many references' "
                             f"key/value caches to keep between calls), got {reference_kv_kept!r}")
        super().__init__(models, config, segmenter)
        self.reference_kv_kept = reference_kv_kept
        self._reference_kv: dict[tuple, KVCache] = {}  # least recently used first

    def clear_caches(self) -> None:
        super().clear_caches()
        self._reference_kv.clear()

    def _reference_keys_values(self, key: tuple, make) -> KVCache:
        """The reference's key/value cache under `key`, made by `make()` if absent: least
        recently used ones beyond reference_kv_kept are dropped first, so their memory is
        reused by the new one."""
        if key in self._reference_kv:
            self._reference_kv[key] = self._reference_kv.pop(key)  # now the most recent
            return self._reference_kv[key]
        while self._reference_kv and len(self._reference_kv) >= max(self.reference_kv_kept, 1):
            del self._reference_kv[next(iter(self._reference_kv))]
        cache = make()
        if self.reference_kv_kept:
            self._reference_kv[key] = cache
        return cache

    def __call__(self, prompt, reference_images=None, seed=0, callback=None,
                 capture: attention.CaptureSpec | None = None) -> Result:
        """LayoutAndRetouch.__call__, fast (module docstring)."""
        from ..exercises import in_use
        if in_use():
            raise RuntimeError(f"{', '.join(in_use())} is plugged into the reference engine, which "
                               "this fast engine does not run; use LRConfig(engine=\"reference\") "
                               "(the default) while it is plugged in")
        cfg, bundle = self.resolved_config(), self.models
        prompts, seeds = self.checked(prompt, seed)
        cls = check_prompts(bundle, prompts)
        ref_key, ref_image, ref_prompt = self._reference_key(reference_images)
        stage2 = self.stage2_path(len(prompts), capture, ref_key not in self._references)
        memory.check(bundle, cfg, batch=len(prompts), capture=capture, stage2=stage2)
        caches = self._caches(len(prompts)) if stage2 == "cached" else None
        layout, attn, ctx_kv, ref_kv = self.stage1_riding(prompts, seeds, cls, ref_key,
                                                          ref_image, ref_prompt, caches)
        ref = self._references[ref_key]
        ctx_masks = [masks.subject_mask(img, a, self.segmenter, cfg.mask)
                     for img, a in zip(layout.images, attn)]
        kv = None if caches is None else {"reference": self._reference_cache(ref, ref_kv, caches),
                                          "context": ctx_kv}
        run = retouch if kv is None else retouch_cached
        with (attention.capture(bundle.unets, capture) if capture
              else contextlib.nullcontext()) as user:
            z, traj, per_step, store = run(
                bundle, layout, ref, np.stack([m.mask for m in ctx_masks]), cls,
                swap_cfg=cfg.swap, mask_cfg=cfg.mask, steps=cfg.layout.steps,
                guidance=cfg.layout.guidance, start_step=cfg.target_start(), callback=callback,
                observers=(user,) if user else (), **({} if kv is None else {"kv": kv}))
        record = {**run_record(bundle, cfg, self.segmenter, ref.image), "stage2_used": stage2,
                  "kv_store_used": caches["store"] if caches else None}
        return Result(prompts, seeds, sampling.decode(bundle, z), layout, traj, ref,
                      Masks(ctx_masks, ref.mask, per_step), store, record, versions(),
                      capture=user)

    def _caches(self, batch: int) -> dict:
        """Where and how this call's key/value caches are kept, and what they hold."""
        cfg, bundle = self.resolved_config(), self.models
        n, start = cfg.layout.steps, cfg.target_start()
        return {"device": self.cache_device(), "dtype": self.cache_dtype(),
                "store": self.cache_store(batch), "context": kv_plan(bundle, cfg.swap, n, start),
                "reference": reference_plan(bundle, cfg.swap, n, start)}

    def _cache(self, caches: dict, which: str) -> KVCache:
        layers, steps = caches[which]
        return KVCache(layers, steps, device=caches["device"], dtype=caches["dtype"],
                       store=caches["store"])

    def stage1_riding(self, prompts, seeds, cls, ref_key, ref_image, ref_prompt, caches):
        """Stage 1 with the class token's capture; a new reference's inversion riding its
        UNet calls (kept in self._references); with `caches`, the context's keys/values and
        the new reference's recorded on the way. Returns (layout, class-token maps, the
        context's KVCache or None, the reference's KVCache or None)."""
        cfg, bundle = self.resolved_config(), self.models
        n = cfg.layout.steps
        spec = attention.CaptureSpec(layers=cfg.mask.layers(bundle.unet, bundle.latent_size),
                                     kind="cross", tokens=[[i] for i in cls])
        ctx_kv = self._cache(caches, "context") if caches else None
        ref_kv, rider = None, None
        with contextlib.ExitStack() as stack:
            if ref_key not in self._references:  # the reference inversion rides stage 1
                ref_kv = self._cache(caches, "reference") if caches else None
                lambda1 = resolve_steps(cfg.layout.lambda1, n, "lambda1")
                rider, ref_store = stack.enter_context(riding_inversion(
                    bundle, ref_image, ref_prompt,
                    token_index(bundle.tokenizer, ref_prompt, bundle.class_noun), steps=n,
                    mask_cfg=cfg.mask, ride_steps=rideable_steps(bundle, n, lambda1), kv=ref_kv,
                    stop=self.reference_stop()))
            store = stack.enter_context(attention.capture(bundle.unets, spec))
            recording = [c for c in (ctx_kv, ref_kv) if c is not None]
            if recording:
                stack.enter_context(record_kv(bundle.unets, *recording))
            layout = step_blended_riding(bundle, prompts, seeds, cfg.layout, checked=True,
                                         observers=(store, *([ctx_kv] if ctx_kv else [])),
                                         rider=rider)
        if rider is not None:
            self._references[ref_key] = reference_result(
                bundle, ref_image, ref_prompt, rider.trajectory(), ref_store, n, cfg.mask,
                self.segmenter)
        layout.store = store
        return layout, aggregate(store, slice(None), n, cfg.mask, bundle.latent_size), \
            ctx_kv, ref_kv

    def _reference_cache(self, ref, ref_kv, caches: dict) -> KVCache:
        """The reference's key/value cache: recorded by its inversion riding this call's stage
        1, or kept from an earlier call, or replayed (stage2.reference_kv)."""
        layers, steps = caches["reference"]
        key = (id(ref), tuple(layers), tuple(steps), str(caches["dtype"]), caches["device"],
               caches["store"])

        def make():
            if ref_kv is not None:
                return ref_kv
            return reference_kv(self.models, ref, layers, steps, self.config.layout.steps,
                                device=caches["device"], dtype=caches["dtype"],
                                store=caches["store"])
        return self._reference_keys_values(key, make)

    def stage2_path(self, batch: int, capture=None, new_reference: bool = False) -> str:
        """"cached" or "batched": the stage-2 path a call on `batch` prompts takes (LRConfig.stage2).
        "auto" takes "batched" when the key/value caches would not fit kv_budget_gb, and, where
        the caches live in pinned host memory on a GPU, for one prompt with a reference not seen
        before (`new_reference`: pinning the memory costs more than the cache saves in one
        call). On a CPU a new reference costs the cached path nothing, since its keys/values are
        recorded while it is inverted. Raises for "cached" when the target starts before
        lambda1."""
        cfg = self.resolved_config()
        n = cfg.layout.steps
        if capture is not None or cfg.stage2 == "batched":
            return "batched"
        pinned = self.models.device.type != "cpu" and self.cache_device() == "cpu"
        if cfg.stage2 == "auto" and batch == 1 and new_reference and pinned:
            return "batched"
        start, lambda1 = cfg.target_start(), resolve_steps(cfg.layout.lambda1, n, "lambda1")
        if start < lambda1:
            if cfg.stage2 == "auto":
                return "batched"
            raise ValueError(
                f"stage2='cached' reads the context's keys/values from stage 1's personalized "
                f"steps (k >= lambda1 = {lambda1}), but the target starts at step {start}. Use "
                f"start_step >= {lambda1}, or LRConfig(stage2='batched').")
        if cfg.stage2 == "cached":
            return "cached"
        need = self.kv_bytes(batch)
        return "cached" if need <= self.kv_budget() else "batched"

    def kv_bytes(self, batch: int, store: str | None = None) -> int:
        """Bytes of the key/value caches the cached stage 2 adds for `batch` prompts: the
        context's (2 rows per prompt under CFG) and the reference's (one row, once per
        reference: its inversion's own UNet call, kv.reference_plan's layers and steps), as
        `store` holds them (None: what `cache_store(batch)` picks)."""
        return kv_bytes(self.models, self.resolved_config(), batch, store or self.cache_store(batch),
                        self.cache_dtype())

    def cache_device(self):
        """Where the key/value caches are stored (LRConfig.kv_device): "cpu", or None (where
        they are computed, the UNet's device)."""
        on_model = self.config.kv_device == "model" or self.models.device.type == "cpu"
        return None if on_model else "cpu"

    def cache_store(self, batch: int | None = None) -> str:
        """What the key/value caches hold (LRConfig.kv_store): "kv" or "hidden". "auto" takes
        "kv", the faster (on an H200 the re-projection costs stage 2 more than the halved copies
        save), unless the caches cross between host and GPU
        (kv_device "host" on a GPU) and, for `batch` prompts, only "hidden" fits kv_budget:
        then the cached path still runs, on half the host memory."""
        store = self.config.kv_store
        if store != "auto":
            return store
        crossing = self.models.device.type != "cpu" and self.cache_device() == "cpu"
        if not crossing or batch is None:
            return "kv"
        return "kv" if self.kv_bytes(batch, "kv") <= self.kv_budget() else "hidden"

    def cache_dtype(self):
        """The torch dtype the key/value caches are stored in (LRConfig.kv_dtype)."""
        import torch
        name = self.config.kv_dtype
        return self.models.dtype if name is None else getattr(torch, name)

    def kv_budget(self) -> int:
        """LRConfig.kv_budget_gb in bytes; None: half the memory available where the caches
        live (host RAM; the GPU's free memory with kv_device="model" on a GPU)."""
        if self.config.kv_budget_gb is not None:
            return int(self.config.kv_budget_gb * 1024 ** 3)
        if self.cache_device() is None and self.models.device.type != "cpu":
            return (memory.free_memory(self.models.device) or 0) // 2
        return available_memory() // 2


ENGINES["fast"] = FastLayoutAndRetouch
