"""LayoutAndRetouch: both stages in one call, returning every intermediate.

    lr = LayoutAndRetouch(load_models("toy"))
    result = lr("a sks star on the left in the snow", seed=0)   # reference: the toy subject
    result.images[0], result.layout.images[0], result.masks.context[0].mask, ...
    result.save("outputs/run")

Stage 1 (layout.py) -> masks of the context (masks.py) -> stage 2 (retouch.py). The reference
inversion is computed once per reference image and reused across prompts and seeds; the first
call with a new reference runs it inside stage 1, as one more row of stage 1's UNet calls
(sampling.Inversion, retouch.riding_inversion; in the vanilla steps only that row runs the
personalized model, ModelBundle.personal_rows; a full DreamBooth UNet runs those lambda1
inversion steps alone instead), recording the reference's keys/values for the cached stage 2
as it goes. With LRConfig(reference_inversion="start") it inverts only as far as stage 2 reads
it, to the target's first step (retouch.reference_stop): fewer rows, a narrower M^r.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import attention, masks, memory, sampling
from .files import atomic_folder
from .images import as_batch
from .config import LayoutConfig, LRConfig, SwapConfig, resolve_guidance, resolve_steps  # noqa: F401
from .kv import KVCache, kv_bytes, kv_plan, record_kv, reference_plan
from .layout import LayoutResult, step_blended
from .prompts import check_prompts, token_index
from .validate import check_call
from .retouch import (ReferenceInversion, aggregate, invert_reference, mask_layers,
                      reference_from, reference_kv, reference_stop, retouch,
                      rideable_steps, riding_inversion)


@dataclass
class Masks:
    context: list[masks.FusedMask]  # one per image, latent resolution
    reference: masks.FusedMask
    per_step: np.ndarray  # (steps, B, h, w): the target mask used at each retouch step


@dataclass
class Result:
    """Everything one call produced. images: final (B, H, W, 3) uint8."""
    prompts: list[str]
    seeds: list[int]
    images: np.ndarray
    layout: LayoutResult
    target: sampling.Trajectory
    reference: ReferenceInversion
    masks: Masks
    attention: object  # AttentionStore of the class token in stage 2 (batched: rows [ref (1); ctx (B); tgt (B)])
    config: dict
    versions: dict
    capture: object = None  # the caller's own AttentionStore of stage 2 (capture= argument)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write final and layout images (PNG), masks (NPZ) and config + versions (JSON).
        Refuses to touch an existing folder unless overwrite=True; writes go to a temporary
        folder that is renamed at the end, so an interruption leaves nothing half-written
        (files.atomic_folder)."""
        from PIL import Image

        with atomic_folder(folder, overwrite, what="result") as tmp:
            for i, (img, lay) in enumerate(zip(self.images, self.layout.images)):
                Image.fromarray(img).save(tmp / f"final_{i:02d}.png")
                Image.fromarray(lay).save(tmp / f"layout_{i:02d}.png")
            Image.fromarray(self.reference.image).save(tmp / "reference.png")
            np.savez_compressed(tmp / "masks.npz", per_step=self.masks.per_step,
                                context=np.stack([m.mask for m in self.masks.context]),
                                reference=self.reference.mask.mask)
            meta = {"prompts": self.prompts, "seeds": self.seeds, "config": self.config,
                    "versions": self.versions}
            (tmp / "result.json").write_text(json.dumps(meta, indent=1))
        return Path(folder)


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


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    from . import __version__
    out = {"lr_tutorial": __version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "torch": torch.__version__,
           "numpy": np.__version__, "python": platform.python_version()}
    for name in ("peft", "safetensors", "segment_anything"):
        try:
            from importlib.metadata import version
            out[name] = version(name.replace("_", "-"))
        except Exception:  # not installed: nothing to record
            pass
    return out


def run_record(bundle, config: LRConfig, segmenter, reference_image: np.ndarray) -> dict:
    """The full configuration of a run: every knob of the method, plus what the knobs do not
    say: the models (backend, identifier, class noun, personalization, sizes, dtype, device,
    scheduler), the segmenter and the reference image's hash."""
    unet = bundle._vanilla_unet
    models = {"backend": bundle.backend, "identifier": bundle.identifier,
              "class_noun": bundle.class_noun, "personalization": bundle.personalization,
              "source": getattr(bundle, "source", None),
              "image_size": bundle.image_size, "latent_size": bundle.latent_size,
              "dtype": str(bundle.dtype), "device": str(bundle.device),
              "scheduler": type(bundle.scheduler).__name__,
              "fuse_lora": bool(getattr(bundle, "fuse_lora", False)),
              "prediction_type": bundle.scheduler.config.get("prediction_type"),
              "unet_parameters": sum(p.numel() for p in unet.parameters())}
    return {**config.to_dict(), "models": models,
            "segmenter": type(segmenter).__name__ if segmenter is not None else None,
            "reference_sha1": hashlib.sha1(np.ascontiguousarray(reference_image).tobytes()
                                           ).hexdigest()}


class LayoutAndRetouch:
    """The method as one callable. `segmenter`: SAM's predictor interface (SamSegmenter on SD;
    default on the toy backend: ShapeWorldSegmenter); None on SD means attention-only masks.

    Kept between calls: each reference's inversion (small: its latent trajectory and masks)
    and, for the cached stage 2, the reference's keys/values (1.1 GB at SD 1.5's 512 px in
    fp16, pinned host memory on a GPU) for the `reference_kv_kept` (default 1) most recently
    used references and settings; an older one is freed before a new one is made, so a
    notebook that changes lambda2 or the reference call after call does not pile them up.
    `clear_caches()` frees everything."""

    def __init__(self, models, config: LRConfig | None = None, segmenter="auto",
                 reference_kv_kept: int = 1):
        if isinstance(reference_kv_kept, bool) or not isinstance(reference_kv_kept, int) \
                or reference_kv_kept < 0:
            raise ValueError(f"reference_kv_kept must be an int >= 0 (how many references' "
                             f"key/value caches to keep between calls), got {reference_kv_kept!r}")
        self.models = models
        self.config = config or LRConfig()
        if segmenter == "auto":
            segmenter = masks.ShapeWorldSegmenter() if models.backend == "toy" else None
        self.segmenter = segmenter
        self.reference_kv_kept = reference_kv_kept
        self._references: dict[str, ReferenceInversion] = {}
        self._reference_kv: dict[tuple, KVCache] = {}  # least recently used first

    def clear_caches(self) -> None:
        """Forget every reference inversion and key/value cache. Their memory is freed; on a
        GPU, torch's caching host allocator keeps the pinned part for the next call to reuse."""
        self._references.clear()
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

    # ------------------------------------------------------------------ references
    def default_references(self) -> np.ndarray:
        if self.models.backend != "toy":
            raise ValueError("give reference_images: photos of your subject (the toy subject's "
                             "photos are only the default on the toy backend)")
        from .toy.subject import reference_images
        return reference_images()

    def reference(self, images: np.ndarray | None = None) -> ReferenceInversion:
        """The inversion of the chosen reference image, computed once and cached (keyed by the
        image bytes, the prompt and the settings that change it), from z^r_N down to
        `reference_stop()` (its trajectory's `start`), as a call uses it."""
        key, image, prompt = self._reference_key(images)
        if key not in self._references:
            idx = token_index(self.models.tokenizer, prompt, self.models.class_noun)
            self._references[key] = invert_reference(
                self.models, image, prompt, idx, steps=self.config.layout.steps,
                mask_cfg=self.config.mask, segmenter=self.segmenter, stop=self.reference_stop())
        return self._references[key]

    def reference_stop(self) -> int:
        """The last step the reference is inverted to (LRConfig.reference_inversion): 0, or with
        "start" the target's first step, `start_step()`, unless the mask window ends before it
        (retouch.reference_stop)."""
        cfg = self.config
        if cfg.reference_inversion == "full":
            return 0
        return reference_stop(cfg.mask, cfg.layout.steps, self.start_step())

    def _reference_key(self, images: np.ndarray | None) -> tuple[str, np.ndarray, str]:
        """(cache key, the chosen reference image, the inversion's prompt); checks the images."""
        cfg = self.config
        images = self.default_references() if images is None else as_batch(
            images, self.models.image_size)
        if cfg.reference_index >= len(images):
            raise IndexError(f"reference_index = {cfg.reference_index}, but only {len(images)} "
                             f"reference images were given; use 0..{len(images) - 1}")
        image = images[cfg.reference_index]
        prompt = cfg.reference_prompt or f"a {self.models.identifier} {self.models.class_noun}"
        key = hashlib.sha1(image.tobytes() + prompt.encode() + repr(
            (cfg.layout.steps, asdict(cfg.mask), self.reference_stop())).encode()).hexdigest()
        return key, image, prompt

    # ------------------------------------------------------------------ call
    def __call__(self, prompt: str | list[str], reference_images: np.ndarray | None = None,
                 seed: int | list[int] = 0, callback=None,
                 capture: attention.CaptureSpec | None = None) -> Result:
        """Run both stages. `capture`: an extra CaptureSpec recorded during stage 2 for all
        three branches (rows [reference (1); context (B); target (B)]), e.g. what a scrubber
        shows."""
        cfg, bundle = self.resolved_config(), self.models
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] * len(prompts) if isinstance(seed, numbers.Integral) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed, "
                             "or one per prompt")
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in seeds):
            raise TypeError(f"seeds must be ints, got {seeds!r}")
        seeds = [int(x) for x in seeds]
        if not prompts:
            raise ValueError("no prompt given; write e.g. "
                             f"'a {bundle.identifier} {bundle.class_noun} on the beach'")
        check_call(self.config, seeds, bundle)  # every field's type, NaN/inf, seeds, no-op stages
        n, size = cfg.layout.steps, bundle.latent_size
        cfg.validate(bundle.unet, size)  # every knob, before any denoising
        cls = check_prompts(bundle, prompts)
        ref_key, ref_image, ref_prompt = self._reference_key(reference_images)
        stage2 = self.stage2_path(len(prompts), capture, ref_key not in self._references)
        memory.check(bundle, cfg, batch=len(prompts), capture=capture, stage2=stage2)

        start = self.start_step()
        cached = stage2 == "cached"
        layers, kv_steps = kv_plan(bundle, cfg.swap, n, start) if cached else ([], [])
        ref_layers, ref_steps = reference_plan(bundle, cfg.swap, n, start) if cached else ([], [])
        kv_device = self.cache_device()
        kv_dtype = self.cache_dtype()

        # stage 1, capturing the class token's cross-attention for the context masks (and,
        # for the cached stage 2, the context's self-attention keys/values)
        spec = attention.CaptureSpec(layers=mask_layers(bundle.unet, cfg.mask, size),
                                     kind="cross", tokens=[[i] for i in cls])
        kv_store = self.cache_store(len(prompts))
        ctx_kv = KVCache(layers, kv_steps, device=kv_device, dtype=kv_dtype, store=kv_store)
        ref_kv = None  # the reference's, recorded from its inversion's own UNet calls
        with contextlib.ExitStack() as stack:
            rider = None
            if ref_key not in self._references:  # the reference inversion rides stage 1
                lambda1 = resolve_steps(cfg.layout.lambda1, n, "lambda1")
                if cached:
                    ref_kv = KVCache(ref_layers, ref_steps, device=kv_device, dtype=kv_dtype,
                                     store=kv_store)
                rider, ref_store = stack.enter_context(riding_inversion(
                    bundle, ref_image, ref_prompt,
                    token_index(bundle.tokenizer, ref_prompt, bundle.class_noun), steps=n,
                    mask_cfg=cfg.mask, ride_steps=rideable_steps(bundle, n, lambda1), kv=ref_kv,
                    stop=self.reference_stop()))
            store = stack.enter_context(attention.capture(bundle.unets, spec))
            stack.enter_context(record_kv(bundle.unets,
                                          *(c for c in (ctx_kv, ref_kv) if c is not None)))
            layout = step_blended(bundle, prompts, seeds, cfg.layout, observers=(store, ctx_kv),
                                  checked=True, rider=rider)
        if rider is not None:
            self._references[ref_key] = reference_from(bundle, rider, ref_store, ref_image,
                                                       cfg.mask, self.segmenter)
        ref = self._references[ref_key]
        layout.store = store
        attn = aggregate(store, slice(None), n, cfg.mask, size)
        ctx_masks = [masks.subject_mask(img, a, self.segmenter, cfg.mask)
                     for img, a in zip(layout.images, attn)]

        # stage 2
        kv = None
        if cached:
            key = (id(ref), tuple(ref_layers), tuple(ref_steps), str(kv_dtype), kv_device,
                   kv_store)

            def reference_cache():  # recorded by the inversion that rode stage 1, or replayed
                if ref_kv is not None:
                    return ref_kv
                return reference_kv(bundle, ref, ref_layers, ref_steps, n, device=kv_device,
                                    dtype=kv_dtype, store=kv_store)
            kv = {"reference": self._reference_keys_values(key, reference_cache),
                  "context": ctx_kv}
        with contextlib.ExitStack() as stack:
            user = (stack.enter_context(attention.capture(bundle.unets, capture)) if capture
                    else None)
            z, traj, per_step, store2 = retouch(
                bundle, layout, ref, np.stack([m.mask for m in ctx_masks]), cls,
                swap_cfg=cfg.swap, mask_cfg=cfg.mask, steps=n, guidance=cfg.layout.guidance,
                start_step=start, callback=callback, observers=(user,) if user else (), kv=kv)
        record = {**run_record(bundle, cfg, self.segmenter, ref.image), "stage2_used": stage2,
                  "kv_store_used": kv_store if cached else None}
        return Result(prompts, seeds, sampling.decode(bundle, z), layout, traj, ref,
                      Masks(ctx_masks, ref.mask, per_step), store2, record, versions(),
                      capture=user)

    def stage2_path(self, batch: int, capture=None, new_reference: bool = False) -> str:
        """"cached" or "batched": the stage-2 path a call on `batch` prompts takes (LRConfig.stage2).
        "auto" takes "batched" when the key/value caches would not fit kv_budget_gb, and, where
        the caches live in pinned host memory on a GPU, for one prompt with a reference not seen
        before (`new_reference`: pinning the memory costs more than the cache saves in one
        call). On a CPU a new reference costs the cached path nothing, since its keys/values are
        recorded while it is inverted. Raises for "cached" when the target starts before
        lambda1."""
        cfg = self.config
        n = cfg.layout.steps
        if capture is not None or cfg.stage2 == "batched":
            return "batched"
        pinned = self.models.device.type != "cpu" and self.cache_device() == "cpu"
        if cfg.stage2 == "auto" and batch == 1 and new_reference and pinned:
            return "batched"
        start, lambda1 = self.start_step(), resolve_steps(cfg.layout.lambda1, n, "lambda1")
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

    def resolved_config(self) -> LRConfig:
        """The config a call runs with: guidance None filled in from the models
        (ModelBundle.guidance); recorded in Result.config."""
        return replace(self.config, layout=self.config.layout.resolved(self.models))

    def kv_bytes(self, batch: int, store: str | None = None) -> int:
        """Bytes of the key/value caches the cached stage 2 adds for `batch` prompts: the
        context's (2 rows per prompt under CFG) and the reference's (one row, once per
        reference: its inversion's own UNet call, kv.reference_plan's layers and steps), as
        `store` holds them (None: what `cache_store(batch)` picks)."""
        return kv_bytes(self.models, self.config, batch, store or self.cache_store(batch),
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

    def start_step(self) -> int:
        """The step the target branch starts from (config.start_step; None: max(lambda1, lambda2))."""
        return self.config.target_start()
