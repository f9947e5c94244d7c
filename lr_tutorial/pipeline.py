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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import attention, masks, memory, sampling
from .files import atomic_folder
from .images import as_batch
from .layout import LayoutConfig, LayoutResult, resolve_guidance, resolve_steps, step_blended
from .swap import SwapConfig, SwapController
from .kv import KVCache, cache_bytes, record_kv
from .prompts import check_prompts, token_index
from .validate import check_call
from .retouch import (ReferenceInversion, aggregate, invert_reference, kv_plan, mask_layers,
                      reference_from, reference_kv, reference_plan, reference_stop, retouch,
                      rideable_steps, riding_inversion)


@dataclass
class LRConfig:
    """Every knob of the method (docs/method.md): stage 1 (`layout`: lambda1, steps, guidance),
    the swap (`swap`: lambda2, layers, mode), the masks and blending (`mask`: thresholds,
    feather, lambda3, adaptive).

    reference_prompt: the prompt of the reference inversion (None: "a <identifier> <class
    noun>" [ours]). reference_index: which reference image is inverted. reference_inversion:
    "full" (default) walks the photo to pure noise, z^r_0, and M^r averages the class token's
    attention over the whole mask window; "start" stops at the target's first step
    (retouch.reference_stop), all that stage 2 reads: fewer inversion steps per new reference,
    but a narrower M^r (docs/performance.md) [ours].
    start_step: the step at which the target branch leaves the context trajectory (None: at
    lambda2, so the structure phase is the context itself [ours; docs/method.md "Stage 2"
    allows "z^c at an early step"], or at lambda1 when that is later, since the context is
    the vanilla model's before it; 0: from z_0, with the structure phase's attention swap).

    Speed and memory (same result within float rounding, tested; docs/performance.md):
    stage2: "cached" runs the target alone, reading the context's keys/values recorded in
    stage 1 and the reference's recorded by its inversion's own UNet calls (needs start >=
    lambda1); "batched" runs the three branches in one UNet call per step (one reference row
    for all targets: 2B + 1 rows); "auto" (default) takes "cached" when its key/value caches
    fit `kv_budget_gb` and the target starts after lambda1, else "batched" (also on a GPU
    with host caches for one prompt with a new reference: `stage2_path`). A `capture=` of
    stage 2 uses "batched", since it records every branch.
    kv_budget_gb: memory the cached path may hold in keys/values (kv.cache_bytes); None: half
    the memory available where the caches live when the run starts.
    kv_device: where those caches live: "host" (the CPU's memory; on a GPU they are copied
    through pinned memory on a side stream, so the GPU's peak stays plain sampling's), "model"
    (the UNet's device: no copies, more GPU memory) or "auto" (default: "host").
    kv_store: "kv" (keys and values), "hidden" (each layer's input, projected with the layer's
    to_k / to_v when read: half the bytes) or "auto" (default: "kv"; "hidden" where the caches
    cross between host and GPU and only it fits kv_budget_gb).
    kv_dtype: storage dtype of those caches, None (the model's) or "float16" / "bfloat16":
    half a float32 model's memory, at the cost of rounding the keys/values the target reads."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    mask: masks.MaskConfig = field(default_factory=masks.MaskConfig)
    reference_prompt: str | None = None
    reference_index: int = 0
    reference_inversion: str = "full"
    start_step: int | None = None
    stage2: str = "auto"
    kv_budget_gb: float | None = None
    kv_device: str = "auto"
    kv_store: str = "auto"
    kv_dtype: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self, unet=None, latent_size: int | None = None) -> None:
        """Check every knob (fields may have been changed since construction) and, given the
        UNet, that every layer pattern selects attention layers; raise ValueError/TypeError
        naming the knob and the fix. Cheap: runs before each call, before any denoising."""
        self.layout.validate()
        self.swap.validate()
        self.mask.validate()
        n = self.layout.steps
        l2 = resolve_steps(self.swap.lambda2, n, "lambda2")
        l3 = resolve_steps(self.mask.lambda3, n, "lambda3")
        if 0 < l3 < l2:
            raise ValueError(
                f"lambda3 = {self.mask.lambda3} (latent blending ends at step {l3}) comes before "
                f"lambda2 = {self.swap.lambda2} (the retouch phase starts at step {l2} of {n}): "
                "blending would stop before the retouch it keeps to the subject. Give "
                "lambda3 >= lambda2, or lambda3 = 0 to switch blending off")
        if self.reference_inversion not in ("full", "start"):
            raise ValueError(f"reference_inversion must be 'full' (to pure noise) or 'start' "
                             f"(to the target's first step), got {self.reference_inversion!r}")
        if self.stage2 not in ("auto", "cached", "batched"):
            raise ValueError(f"stage2 must be 'auto', 'cached' or 'batched', got {self.stage2!r}")
        if self.kv_device not in ("auto", "host", "model"):
            raise ValueError(f"kv_device must be 'auto', 'host' or 'model', got {self.kv_device!r}")
        if self.kv_store not in ("auto", "kv", "hidden"):
            raise ValueError(f"kv_store must be 'auto', 'kv' or 'hidden', got {self.kv_store!r}")
        if self.kv_dtype not in (None, "float16", "bfloat16", "float32"):
            raise ValueError(f"kv_dtype must be None (the model's dtype), 'float16', 'bfloat16' "
                             f"or 'float32', got {self.kv_dtype!r}")
        if self.kv_budget_gb is not None and (
                isinstance(self.kv_budget_gb, bool) or not isinstance(self.kv_budget_gb, numbers.Real)
                or not self.kv_budget_gb >= 0):
            raise ValueError(f"kv_budget_gb must be None (half the available memory) or a number "
                             f"of GB >= 0, got {self.kv_budget_gb!r}")
        if self.start_step is not None and (
                isinstance(self.start_step, bool) or not isinstance(self.start_step, numbers.Integral)
                or not 0 <= self.start_step < n):
            raise ValueError(f"start_step = {self.start_step!r} must be None (start at lambda2) "
                             f"or a step in [0, {n - 1}] for {n} steps (0: the target starts "
                             "from the context's noise)")
        if isinstance(self.reference_index, bool) \
                or not isinstance(self.reference_index, numbers.Integral) \
                or self.reference_index < 0:
            raise ValueError(f"reference_index must be an int >= 0, got {self.reference_index!r}")
        if unet is not None:
            size = latent_size or unet.config.sample_size
            attention.select_layers(unet, self.swap.structure_layers, "self")
            attention.select_layers(unet, self.swap.retouch_layers, "self")
            mask_layers(unet, self.mask, size)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


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
        reference: its inversion's own UNet call, retouch.reference_plan's layers and steps), as
        `store` holds them (None: what `cache_store(batch)` picks)."""
        cfg, bundle = self.config, self.models
        n = cfg.layout.steps
        start, dtype, store = self.start_step(), self.cache_dtype(), store or self.cache_store(batch)
        layers, steps = kv_plan(bundle, cfg.swap, n, start)
        ref_layers, ref_steps = reference_plan(bundle, cfg.swap, n, start)
        halves = 2 if resolve_guidance(bundle, cfg.layout.guidance) != 1.0 else 1
        return (cache_bytes(bundle.unet, layers, steps, halves * batch, bundle.latent_size, dtype,
                            store)
                + cache_bytes(bundle.unet, ref_layers, ref_steps, 1, bundle.latent_size, dtype,
                              store))

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
        cfg = self.config
        if cfg.start_step is not None:
            return resolve_steps(cfg.start_step, cfg.layout.steps, "start_step")
        lambda2 = SwapController(self.models.unet, cfg.swap, cfg.layout.steps,
                                           self.models.latent_size).lambda2
        return max(lambda2, resolve_steps(cfg.layout.lambda1, cfg.layout.steps, "lambda1"))
