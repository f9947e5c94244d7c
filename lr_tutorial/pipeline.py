"""LayoutAndRetouch: both stages in one call, returning every intermediate.

    lr = LayoutAndRetouch(load_models("toy"))
    result = lr("a sks star on the left in the snow", seed=0)   # reference: the toy subject
    result.images[0], result.layout.images[0], result.masks.context[0].mask, ...
    result.save("outputs/run")

The method of docs/method.md, in the order a call runs it: stage 1 (layout.step_blended)
capturing the class token's cross-attention, the context masks M^c (masks.subject_mask), the
reference's DDIM inversion and its mask M^r (retouch.invert_reference: once per reference
image, reused across prompts and seeds), stage 2 (retouch.retouch).

LRConfig(engine="fast") makes a LayoutAndRetouch of the fast engine (lr_tutorial/fast/): the
same method, the same results within float rounding, with key/value caches, the reference
inversion riding stage 1's UNet calls and a choice of stage-2 path (docs/performance.md).
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
from .config import ENGINE_NAMES, LayoutConfig, LRConfig, SwapConfig  # noqa: F401
from .files import atomic_folder
from .images import as_batch
from .layout import LayoutResult, step_blended
from .prompts import check_prompts, token_index
from .retouch import ReferenceInversion, aggregate, invert_reference, reference_stop, retouch
from .validate import check_call
from .version import __version__

# engine name -> its LayoutAndRetouch class; lr_tutorial/__init__.py registers "fast"
ENGINES: dict[str, type] = {}


def engine_class(name: str) -> type:
    if name not in ENGINES:
        raise ValueError(f"engine {name!r} is not available; engines: {sorted(ENGINES)} "
                         "(LRConfig.engine)")
    return ENGINES[name]


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


def versions() -> dict:
    import diffusers
    import torch
    import transformers

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
    Each reference's inversion is kept between calls (small: its latent trajectory and masks);
    `clear_caches()` forgets them. The engine is chosen when the pipeline is made, by
    config.engine: LayoutAndRetouch(models, LRConfig(engine="fast")) makes the fast engine's."""

    def __new__(cls, models=None, config: LRConfig | None = None, *args, **kwargs):
        if cls is LayoutAndRetouch:
            cls = engine_class((config if config is not None else LRConfig()).engine)
        return super().__new__(cls)

    def __init__(self, models, config: LRConfig | None = None, segmenter="auto"):
        self.models = models
        self.config = config or LRConfig()
        if segmenter == "auto":
            segmenter = masks.ShapeWorldSegmenter() if models.backend == "toy" else None
        self.segmenter = segmenter
        self._references: dict[str, ReferenceInversion] = {}

    def clear_caches(self) -> None:
        """Forget every reference inversion."""
        self._references.clear()

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
        "start" the target's first step, unless the mask window ends before it
        (retouch.reference_stop)."""
        cfg = self.resolved_config()
        if cfg.reference_inversion == "full":
            return 0
        return reference_stop(cfg.mask, cfg.layout.steps, cfg.target_start())

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
        """Run the method (docs/method.md) on the prompts, one seed each. `capture`: an extra
        CaptureSpec recorded during stage 2 for all three branches (rows [reference (1);
        context (B); target (B)]), e.g. what a scrubber shows."""
        cfg, bundle = self.resolved_config(), self.models
        prompts, seeds = self.checked(prompt, seed)
        cls = check_prompts(bundle, prompts)  # the class token's index in each prompt
        memory.check(bundle, cfg, batch=len(prompts), capture=capture, stage2="batched")
        ref = self.reference(reference_images)  # x^r inverted, and M^r
        layout, attn = self.stage1(prompts, seeds, cls)  # x^c, and its class-token attention
        ctx_masks = [masks.subject_mask(img, a, self.segmenter, cfg.mask)  # M^c
                     for img, a in zip(layout.images, attn)]
        with (attention.capture(bundle.unets, capture) if capture
              else contextlib.nullcontext()) as user:
            z, traj, per_step, store = retouch(
                bundle, layout, ref, np.stack([m.mask for m in ctx_masks]), cls,
                swap_cfg=cfg.swap, mask_cfg=cfg.mask, steps=cfg.layout.steps,
                guidance=cfg.layout.guidance, start_step=cfg.target_start(),
                callback=callback, observers=(user,) if user else ())
        record = {**run_record(bundle, cfg, self.segmenter, ref.image), "stage2_used": "batched",
                  "kv_store_used": None}
        return Result(prompts, seeds, sampling.decode(bundle, z), layout, traj, ref,
                      Masks(ctx_masks, ref.mask, per_step), store, record, versions(),
                      capture=user)

    def stage1(self, prompts: list[str], seeds: list[int], cls: list[int], observers: tuple = (),
               ) -> tuple[LayoutResult, np.ndarray]:
        """Stage 1 (layout.step_blended), capturing the class token's cross-attention: the
        LayoutResult (its `store` set) and the mean class-token maps (B, h, w)."""
        cfg, bundle = self.resolved_config(), self.models
        spec = attention.CaptureSpec(layers=cfg.mask.layers(bundle.unet, bundle.latent_size),
                                     kind="cross", tokens=[[i] for i in cls])
        with attention.capture(bundle.unets, spec) as store:
            layout = step_blended(bundle, prompts, seeds, cfg.layout,
                                  observers=(store, *observers), checked=True)
        layout.store = store
        return layout, aggregate(store, slice(None), cfg.layout.steps, cfg.mask,
                                 bundle.latent_size)

    def checked(self, prompt: str | list[str], seed: int | list[int]) -> tuple[list, list]:
        """(prompts, seeds) of a call, every input and knob checked before any denoising."""
        bundle = self.models
        if type(self) is not engine_class(self.config.engine):
            raise ValueError(f"this pipeline runs the {type(self).__name__} engine, but "
                             f"config.engine is {self.config.engine!r}: the engine is chosen "
                             "when the pipeline is made, LayoutAndRetouch(models, "
                             f"LRConfig(engine={self.config.engine!r}))")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] * len(prompts) if isinstance(seed, numbers.Integral) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; give one seed, "
                             "or one per prompt")
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in seeds):
            raise TypeError(f"seeds must be ints, got {seeds!r}")
        if not prompts:
            raise ValueError("no prompt given; write e.g. "
                             f"'a {bundle.identifier} {bundle.class_noun} on the beach'")
        check_call(self.config, seeds, bundle)  # every field's type, NaN/inf, seeds, no-op stages
        self.config.validate(bundle.unet, bundle.latent_size)  # every knob
        return prompts, [int(x) for x in seeds]

    def resolved_config(self) -> LRConfig:
        """The config a call runs with: lambda1 and guidance None filled in from the models
        (ModelBundle.lambda1, ModelBundle.guidance); recorded in Result.config."""
        return replace(self.config, layout=self.config.layout.resolved(self.models))

    def start_step(self) -> int:
        """The step the target branch starts from (LRConfig.target_start)."""
        return self.resolved_config().target_start()


ENGINES["reference"] = LayoutAndRetouch
