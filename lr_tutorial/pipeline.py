"""LayoutAndRetouch: both stages in one call, returning every intermediate.

    lr = LayoutAndRetouch(load_models("toy"))
    result = lr("a sks star on the left in the snow", seed=0)   # reference: the toy subject
    result.images[0], result.layout.images[0], result.masks.context[0].mask, ...
    result.save("outputs/run")

Stage 1 (layout.py) -> masks of the context (masks.py) -> reference inversion (cached per
reference image, reused across prompts and seeds) -> stage 2 (retouch.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import attention, masks, sampling
from .layout import LayoutConfig, LayoutResult, resolve_steps, step_blended
from .prompts import check_personal_prompt, token_index
from .kv import KVCache, record_kv
from .retouch import (ReferenceInversion, aggregate, invert_reference, kv_plan, mask_layers,
                      reference_kv, retouch)


@dataclass
class LRConfig:
    """Every knob of the method (docs/method.md): stage 1 (`layout`: lambda1, steps, guidance),
    the swap (`swap`: lambda2, layers, mode), the masks and blending (`mask`: thresholds,
    feather, lambda3, adaptive). reference_prompt: prompt of the reference inversion (None:
    "a <identifier> <class noun>" [ours]); reference_index: which reference image is inverted;
    start_step: the step at which the target branch leaves the context trajectory (None: at
    lambda2, so the structure phase is the context itself [ours; method.md allows "z^c at an
    early step"]; 0: from z_0, with the structure phase's attention swap).
    stage2: "cached" runs the target alone, reading the context's keys/values recorded in
    stage 1 and the reference's from a replay cached per reference (needs start >= lambda1);
    "batched" runs the three branches in one UNet call per step. Same result (tested), the
    cached path at about a third of the UNet work; a `capture=` of stage 2 uses "batched"
    since it records every branch."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    swap: attention.SwapConfig = field(default_factory=attention.SwapConfig)
    mask: masks.MaskConfig = field(default_factory=masks.MaskConfig)
    reference_prompt: str | None = None
    reference_index: int = 0
    start_step: int | None = None
    stage2: str = "cached"

    def __post_init__(self):
        if self.stage2 not in ("cached", "batched"):
            raise ValueError(f"stage2 must be 'cached' or 'batched', got {self.stage2!r}")

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
    attention: object  # AttentionStore of the class token in stage 2 (all three branches)
    config: dict
    versions: dict
    capture: object = None  # the caller's own AttentionStore of stage 2 (capture= argument)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write final and layout images (PNG), masks (NPZ) and config + versions (JSON).
        Refuses to touch an existing folder unless overwrite=True; writes go to a temporary
        folder that is renamed at the end, so an interruption leaves nothing half-written."""
        from PIL import Image

        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder} exists; choose another folder or pass overwrite=True")
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder


def versions() -> dict:
    import diffusers
    import torch
    import transformers

    from . import __version__
    return {"lr_tutorial": __version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


class LayoutAndRetouch:
    """The method as one callable. `segmenter`: SAM's predictor interface (SamSegmenter on SD;
    default on the toy backend: ShapeWorldSegmenter); None on SD means attention-only masks."""

    def __init__(self, models, config: LRConfig | None = None, segmenter="auto"):
        self.models = models
        self.config = config or LRConfig()
        if segmenter == "auto":
            segmenter = masks.ShapeWorldSegmenter() if models.backend == "toy" else None
        self.segmenter = segmenter
        self._references: dict[str, ReferenceInversion] = {}
        self._reference_kv: dict[tuple, KVCache] = {}

    # ------------------------------------------------------------------ references
    def default_references(self) -> np.ndarray:
        if self.models.backend != "toy":
            raise ValueError("give reference_images: photos of your subject (the toy subject's "
                             "photos are only the default on the toy backend)")
        from .toy.subject import reference_images
        return reference_images()

    def reference(self, images: np.ndarray | None = None) -> ReferenceInversion:
        """The inversion of the chosen reference image, computed once and cached (keyed by the
        image bytes, the prompt and the settings that change it)."""
        cfg = self.config
        images = self.default_references() if images is None else np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        image = images[cfg.reference_index]
        prompt = cfg.reference_prompt or f"a {self.models.identifier} {self.models.class_noun}"
        key = hashlib.sha1(image.tobytes() + prompt.encode() + repr(
            (cfg.layout.steps, asdict(cfg.mask))).encode()).hexdigest()
        if key not in self._references:
            idx = token_index(self.models.tokenizer, prompt, self.models.class_noun)
            self._references[key] = invert_reference(
                self.models, image, prompt, idx, steps=cfg.layout.steps, mask_cfg=cfg.mask,
                segmenter=self.segmenter)
        return self._references[key]

    # ------------------------------------------------------------------ call
    def __call__(self, prompt: str | list[str], reference_images: np.ndarray | None = None,
                 seed: int | list[int] = 0, callback=None,
                 capture: attention.CaptureSpec | None = None) -> Result:
        """Run both stages. `capture`: an extra CaptureSpec recorded during stage 2 for all
        three branches (rows [reference; context; target] x B), e.g. what a scrubber shows."""
        cfg, bundle = self.config, self.models
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds")
        for p in prompts:
            check_personal_prompt(p, bundle.identifier, bundle.class_noun)
        n, size = cfg.layout.steps, bundle.latent_size
        resolve_steps(cfg.mask.lambda3, n, "lambda3")
        cls = [token_index(bundle.tokenizer, p, bundle.class_noun) for p in prompts]
        ref = self.reference(reference_images)

        start = self.start_step()
        cached = cfg.stage2 == "cached" and capture is None
        lambda1 = resolve_steps(cfg.layout.lambda1, n, "lambda1")
        if cached and start < lambda1:
            raise ValueError(
                f"stage2='cached' reads the context's keys/values from stage 1's personalized "
                f"steps (k >= lambda1 = {lambda1}), but the target starts at step {start}. Use "
                f"start_step >= {lambda1}, or LRConfig(stage2='batched').")
        layers, kv_steps = kv_plan(bundle, cfg.swap, n, start) if cached else ([], [])
        kv_device = "cpu" if bundle.device.type == "cuda" else None  # keep GPU memory free

        # stage 1, capturing the class token's cross-attention for the context masks (and,
        # for the cached stage 2, the context's self-attention keys/values)
        spec = attention.CaptureSpec(layers=mask_layers(bundle.unet, cfg.mask, size),
                                     kind="cross", tokens=[[i] for i in cls])
        ctx_kv = KVCache(layers, kv_steps, device=kv_device)
        with attention.capture(bundle.unet, spec) as store, record_kv(bundle.unet, ctx_kv):
            layout = step_blended(bundle, prompts, seeds, cfg.layout, observers=(store, ctx_kv))
        layout.store = store
        attn = aggregate(store, slice(None), n, cfg.mask, size)
        ctx_masks = [masks.subject_mask(img, a, self.segmenter, cfg.mask)
                     for img, a in zip(layout.images, attn)]

        # stage 2
        kv = None
        if cached:
            key = (id(ref), tuple(layers), tuple(kv_steps), cfg.layout.guidance)
            if key not in self._reference_kv:
                self._reference_kv[key] = reference_kv(bundle, ref, layers, kv_steps, n,
                                                       cfg.layout.guidance, device=kv_device)
            kv = {"reference": self._reference_kv[key], "context": ctx_kv}
        with contextlib.ExitStack() as stack:
            user = stack.enter_context(attention.capture(bundle.unet, capture)) if capture else None
            z, traj, per_step, store2 = retouch(
                bundle, layout, ref, np.stack([m.mask for m in ctx_masks]), cls,
                swap_cfg=cfg.swap, mask_cfg=cfg.mask, steps=n, guidance=cfg.layout.guidance,
                start_step=start, callback=callback, observers=(user,) if user else (), kv=kv)
        return Result(prompts, seeds, sampling.decode(bundle, z), layout, traj, ref,
                      Masks(ctx_masks, ref.mask, per_step), store2, cfg.to_dict(), versions(),
                      capture=user)

    def start_step(self) -> int:
        """The step the target branch starts from (config.start_step; None: lambda2)."""
        cfg = self.config
        if cfg.start_step is not None:
            return resolve_steps(cfg.start_step, cfg.layout.steps, "start_step")
        return attention.SwapController(self.models.unet, cfg.swap, cfg.layout.steps,
                                        self.models.latent_size).lambda2
