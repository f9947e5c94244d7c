"""Measure the toy models with the oracle: prompt fidelity per attribute, identity, layout spread.

For a prompt file (one prompt per line; lines with an identifier, e.g. `a sks star at night`,
are measured twice: personalized with the identifier, vanilla without it), sample `seeds` images
per prompt and mode, analyze each with the oracle and summarize:
- fidelity[attr]: share of images whose attr matches the prompt, over prompts that state attr;
- identity: mean identity score to the personal subject;
- position_*: where the subject lands when the prompt omits the position (layout diversity).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from tqdm.auto import tqdm

from .. import sampling
from . import heldout, oracle, world

ATTRS = ("shape", "colour", "size", "position", "background")


def read_prompts(path) -> list[str]:
    from ..prompts import read_prompt_file
    prompts = read_prompt_file(path)  # UTF-8 with or without BOM; other encodings refused
    for p in prompts:
        world.parse_prompt(p)  # fails early, naming the unknown word
    return prompts


def generate(bundle, prompts: list[str], seeds: list[int], mode: str, *, steps: int = 50,
             guidance: float | None = None, batch: int = 64, progress: bool = True) -> np.ndarray:
    """Images (len(prompts) * len(seeds), 64, 64, 3), prompt-major, sampled in `mode`."""
    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    with bundle.using(mode):
        for i in tqdm(range(0, len(jobs), batch), desc=f"sample {mode}", disable=not progress):
            chunk = jobs[i:i + batch]
            z, _ = sampling.sample(bundle, [p for p, _ in chunk], [s for _, s in chunk],
                                   steps=steps, guidance=guidance)
            out.append(sampling.decode(bundle, z))
    return np.concatenate(out)


def generate_method(bundle, prompts: list[str], seeds: list[int], method: str, *,
                    steps: int = 50, guidance: float | None = None, batch: int = 32, config=None,
                    progress: bool = True, reference_images=None) -> np.ndarray:
    """Images of `method`: "stage1" (step-blended layout only) or "layout_and_retouch"
    (`reference_images`: photos of the subject; None: the toy subject's)."""
    from ..layout import step_blended
    from ..pipeline import LayoutAndRetouch, LRConfig

    import copy
    cfg = copy.deepcopy(config) if config is not None else LRConfig()  # never mutate the caller's
    cfg.layout.steps, cfg.layout.guidance = steps, guidance
    lr = LayoutAndRetouch(bundle, cfg)
    jobs = [(p, s) for p in prompts for s in seeds]
    out = []
    for i in tqdm(range(0, len(jobs), batch), desc=method, disable=not progress):
        ps, ss = [p for p, _ in jobs[i:i + batch]], [s for _, s in jobs[i:i + batch]]
        if method == "stage1":
            out.append(step_blended(bundle, ps, ss, cfg.layout).images)
        elif method == "layout_and_retouch":
            out.append(lr(ps, reference_images, seed=ss).images)
        else:
            raise ValueError(f"unknown method {method!r}")
    return np.concatenate(out)


def score(images: np.ndarray, prompts: list[str]) -> list[dict]:
    """One row per image: the prompt's stated attributes, what the oracle read, identity."""
    rows = []
    for img, prompt in zip(images, prompts):
        facts = oracle.analyze(img)
        stated = world.parse_prompt(prompt)
        rows.append({
            "prompt": prompt, "stated": stated,
            "read": {a: getattr(facts, a) for a in ATTRS},
            "match": facts.matches(stated),
            "identity": oracle.identity_score(img, facts),
            "centroid": (tuple(float(c) for c in np.argwhere(facts.mask).mean(0)[::-1])
                         if facts.found else None),
        })
    return rows


def summarize(rows: list[dict]) -> dict:
    fid = {}
    for a in ATTRS:
        hits = [r["match"][a] for r in rows if a in r["match"]]
        if hits:
            fid[a] = round(float(np.mean(hits)), 4)
    free = [r for r in rows if r["stated"]["position"] is None]
    hist = Counter(r["read"]["position"] for r in free if r["read"]["position"])
    n_free = max(1, len(free))
    cents = np.array([r["centroid"] for r in free if r["centroid"] is not None])
    out = {
        "images": len(rows),
        "fidelity": fid,
        "fidelity_mean": round(float(np.mean([v for r in rows for v in r["match"].values()])), 4)
        if rows else None,
        "identity": round(float(np.mean([r["identity"] for r in rows])), 4),
        "found": round(float(np.mean([r["read"]["shape"] is not None for r in rows])), 4),
        "position_free_images": len(free),
        "position_hist": {p: round(hist.get(p, 0) / n_free, 4) for p in world.POSITIONS},
    }
    out["identity_by"] = identity_by(rows)
    out["position_classes"] = sum(v > 0.05 for v in out["position_hist"].values())
    out["position_max_share"] = max(out["position_hist"].values()) if free else None
    out["centroid_spread_px"] = (round(float(np.linalg.norm(cents - cents.mean(0), axis=1).mean()), 3)
                                 if len(cents) > 1 else None)
    return out


def identity_by(rows: list[dict], attrs: tuple[str, ...] = ("background", "size")) -> dict:
    """Mean identity grouped by what each prompt states, e.g. {"background": {"night": 0.07,
    "none": 0.79, ...}, "size": {...}}: where a personalized model loses its subject."""
    out = {}
    for a in attrs:
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(r["stated"].get(a) or "none", []).append(r["identity"])
        out[a] = {k: round(float(np.mean(v)), 4) for k, v in sorted(groups.items())}
    return out


def toy_report(bundle, prompts: list[str], seeds: list[int], *, steps: int = 50,
               guidance: float | None = None, progress: bool = True, methods: tuple[str, ...] = (),
               config=None) -> dict:
    """{'vanilla': summary over every prompt without identifier,
        'personalized': summary over the prompts that carry the identifier (if the bundle has
        a personalized model), and one summary per extra method ("stage1",
        "layout_and_retouch") on those prompts}."""
    from ..layout import resolve_guidance
    guidance = resolve_guidance(bundle, guidance)  # None: the bundle's own
    vanilla_prompts = [heldout.strip_identifier(p) for p in prompts]
    report = {"prompts": len(prompts), "seeds": list(seeds), "steps": steps, "guidance": guidance}
    imgs = generate(bundle, vanilla_prompts, seeds, "vanilla", steps=steps, guidance=guidance,
                    progress=progress)
    report["vanilla"] = summarize(score(imgs, [p for p in vanilla_prompts for _ in seeds]))
    personal = [p for p in prompts if world.parse_prompt(p)["identifier"]]
    if personal and bundle.has_personal:
        imgs = generate(bundle, personal, seeds, "personalized", steps=steps, guidance=guidance,
                        progress=progress)
        report["personalized"] = summarize(score(imgs, [p for p in personal for _ in seeds]))
        # the vanilla model on the same prompts (identifier removed), for a like-for-like row
        same = [heldout.strip_identifier(p) for p in personal]
        if len(same) != len(prompts):
            imgs = generate(bundle, same, seeds, "vanilla", steps=steps, guidance=guidance,
                            progress=progress)
            report["vanilla_same_prompts"] = summarize(score(imgs, [p for p in same for _ in seeds]))
        for method in methods:
            imgs = generate_method(bundle, personal, seeds, method, steps=steps,
                                   guidance=guidance, progress=progress, config=config)
            report[method] = summarize(score(imgs, [p for p in personal for _ in seeds]))
    return report
