"""The methods a benchmark compares, as named settings of the existing knobs.

| name               | what runs                                  | knobs (docs/method.md)               |
| ------------------ | ------------------------------------------ | ------------------------------------ |
| vanilla            | eps on y^-p, all steps                     | stage 1 with lambda1 = N             |
| personalized       | eps* on y^p, all steps (the baseline)      | stage 1 with lambda1 = 0             |
| stage1             | step-blended layout only                   | stage 1, lambda1 from the config     |
| layout_and_retouch | both stages, the paper's method            | defaults of LRConfig                 |
| no_swap            | retouch without attention swap             | swap.mode = "none"                   |
| reference_swap     | single-source swap: target reads reference | swap.mode = "reference"              |
| attention_mask     | mask from cross-attention only             | mask.source = "attention"            |
| segmenter_mask     | mask from the segmenter only               | mask.source = "segmenter"            |
| no_blending        | no latent blending                         | mask.lambda3 = 0                     |
| adaptive_mask      | mask re-grown each step from the target    | mask.adaptive = True                 |

vanilla / personalized go through stage 1 with lambda1 = N / 0, which is bit-for-bit plain
sampling with either model (tests/test_pipeline.py), so every method shares one code path.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Method:
    """kind: "layout" (stage 1 only) or "lr" (both stages). overrides: dotted LRConfig fields
    fixed by the method (they win over the benchmark's and a sweep's)."""
    name: str
    kind: str
    description: str
    overrides: tuple[tuple[str, object], ...] = ()


METHODS = {m.name: m for m in (
    Method("vanilla", "layout", "base model on the prompt without identifier",
           (("layout.lambda1", 1.0),)),
    Method("personalized", "layout", "personalized model only", (("layout.lambda1", 0),)),
    Method("stage1", "layout", "step-blended layout (stage 1) only"),
    Method("layout_and_retouch", "lr", "full Layout-and-Retouch"),
    Method("no_swap", "lr", "retouch without attention swap", (("swap.mode", "none"),)),
    Method("reference_swap", "lr", "single-source swap from the reference",
           (("swap.mode", "reference"),)),
    Method("attention_mask", "lr", "mask from cross-attention only", (("mask.source", "attention"),)),
    Method("segmenter_mask", "lr", "mask from the segmenter only", (("mask.source", "segmenter"),)),
    Method("no_blending", "lr", "no latent blending", (("mask.lambda3", 0),)),
    Method("adaptive_mask", "lr", "mask re-grown each step from the target's attention",
           (("mask.adaptive", True),)),
)}
SWEEPABLE = ("stage1", "layout_and_retouch")


def apply_overrides(config, overrides: dict):
    """A copy of an LRConfig with dotted fields set, e.g. {"layout.lambda1": 0.3,
    "mask.tau_lo": 0.4}; sub-configs are rebuilt so their validation runs. JSON lists become
    tuples where the field holds a tuple."""
    cfg = copy.deepcopy(config)
    for key, value in overrides.items():
        parts = key.split(".")
        obj, parents = cfg, []
        for p in parts[:-1]:
            parents.append((obj, p))
            obj = _field(obj, p, key)
        _field(obj, parts[-1], key)
        if isinstance(getattr(obj, parts[-1]), tuple) and isinstance(value, list):
            value = tuple(value)
        new = dataclasses.replace(obj, **{parts[-1]: value})
        if not parents:
            cfg = new
        for parent, name in reversed(parents):
            setattr(parent, name, new)
            new = parent
    return cfg


def _field(obj, name: str, key: str):
    names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
    if name not in names:
        raise ValueError(f"config override {key!r}: {type(obj).__name__} has no field {name!r}; "
                         f"fields: {names}")
    return getattr(obj, name)


def method_config(method: str, base, extra: dict | None = None):
    """The LRConfig a method runs with: `base`, then `extra` (a sweep's), then the method's own."""
    m = METHODS[method]
    cfg = apply_overrides(base, extra or {})
    return apply_overrides(cfg, dict(m.overrides))


def generate(method: str, bundle, lr, prompts: list[str], seeds: list[int],
             references=None, masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (B, H, W, 3) uint8 of `method` (its config is lr.config) and, if masks=True,
    the subject mask each image's layout came with (B, h, w) bool: the class token's
    cross-attention support in stage 1 (tau_lo of the normalized map), or the final target
    mask of the retouch."""
    from . import attention
    from .layout import resolve_steps, step_blended
    from .masks import normalize
    from .prompts import strip_identifier, token_index
    from .retouch import aggregate, mask_layers

    cfg = lr.resolved_config()
    if METHODS[method].kind == "lr":
        res = lr(prompts, references, seed=seeds)
        final = res.masks.per_step[-1] if len(res.masks.per_step) else \
            np.stack([m.mask for m in res.masks.context])  # no retouch step ran (start = N)
        return res.images, (final >= 0.5 if masks else None)
    if not masks:
        return step_blended(bundle, prompts, seeds, cfg.layout).images, None
    # the class token as the model sees it: y^-p when every step is vanilla
    vanilla = resolve_steps(cfg.layout.lambda1, cfg.layout.steps) == cfg.layout.steps
    seen = [strip_identifier(p, bundle.identifier) for p in prompts] if vanilla else prompts
    size = bundle.latent_size
    spec = attention.CaptureSpec(layers=mask_layers(bundle.unet, cfg.mask, size), kind="cross",
                                 tokens=[[token_index(bundle.tokenizer, p, bundle.class_noun)]
                                         for p in seen])
    with attention.capture(bundle.unets, spec) as store:
        out = step_blended(bundle, prompts, seeds, cfg.layout, observers=(store,))
    attn = aggregate(store, slice(None), cfg.layout.steps, cfg.mask, size)
    return out.images, normalize(attn) >= cfg.mask.tau_lo
