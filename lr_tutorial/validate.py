"""Checks at the boundary: every field of a config dataclass, seeds, and the settings that make
a stage do nothing, before any model runs.

    from lr_tutorial.validate import check_config, check_seeds
    check_config(LRConfig(...))     # TypeError / ValueError naming the field, the value, the fix
    check_seeds([0, 1])

`check_config` reads each dataclass's fields and their annotations, so a field added later is
checked too: a value of a type the annotation does not allow (a string for a number, a float
for an int, a number for a flag, None where None is not allowed), NaN and infinities, empty
strings and sequences; then it runs the dataclass's own `validate()` (ranges, orderings).
`noop_notes` lists the combinations under which a stage silently does nothing (e.g. so few
steps that the retouch never starts); the pipeline warns about them (`NoOpWarning`), the
command line refuses them.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

SEED_MAX = 2 ** 63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed here
MAX_STEPS = 1000  # DDIM steps beyond the scheduler's training timesteps repeat timesteps


# Ranges of numeric fields the dataclasses' own validate() leaves open at the top, by
# "Class.field" or by field name; a value outside is refused naming the field and the range.
RANGES: dict[str, tuple[float, float]] = {
    "guidance": (0, 100),
    "lambda1": (0, MAX_STEPS), "lambda2": (0, MAX_STEPS), "lambda3": (0, MAX_STEPS),
    "min_lambda2": (0, MAX_STEPS),
    "feather": (0, 1024),  # latent pixels: wider than any latent is a flat ramp
    "n_positive": (1, 64), "n_negative": (0, 64),
    "adaptive_reach": (0, 2),  # a fraction of the latent side (its diagonal is 1.41)
    "kv_budget_gb": (0, 1e6),
    "seed": (0, SEED_MAX),
    "DreamBoothConfig.prior_weight": (0, 100),
    "DreamBoothConfig.num_class_images": (0, 10 ** 6),
    "DreamBoothConfig.rank": (1, 4096),
    "DreamBoothConfig.alpha": (1e-12, 1e4),
    "DreamBoothConfig.steps": (1, 10 ** 8),
    "DreamBoothConfig.batch_size": (1, 4096),
    "DreamBoothConfig.lr": (1e-12, 1),
    "DreamBoothConfig.identifier_lr": (0, 1),
    "DreamBoothConfig.offset_noise": (0, 10),
    "DreamBoothConfig.pyramid_noise": (0, 10),
    "ToyPersonalConfig.background_augment": (0, 10 ** 5),
    "ToyPersonalConfig.layout_augment": (0, 10 ** 5),
    "ToyPersonalConfig.augment_max_timestep": (1, 1000),
}


class NoOpWarning(UserWarning):
    """A setting under which a stage of the method does nothing."""


def _split_top(text: str, sep: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def _members(annotation) -> list[str]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                  str(annotation))
    text = text.replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1] + " | None"
    return _split_top(text, "|")


_HEADS = {"int", "float", "bool", "str", "None", "tuple", "list", "Sequence", "dict", "object",
          "Any"}


def _kinds(annotation) -> set[str]:
    """The top-level kinds a field annotation allows ('str | Sequence[str]' -> {str,
    Sequence}); unknown names (other dataclasses) are left out."""
    return {m.split("[", 1)[0] for m in _members(annotation)} & _HEADS


def _element(annotation) -> tuple[set[str], int | None] | None:
    """The element kinds and fixed length (None: any) of the annotation's sequence member."""
    for m in _members(annotation):
        head, _, rest = m.partition("[")
        if head in ("tuple", "list", "Sequence") and rest:
            parts = _split_top(rest[:-1], ",")
            fixed = None if (head != "tuple" or "..." in parts) else len(parts)
            return {p.split("[", 1)[0] for p in parts if p != "..."} & _HEADS, fixed
    return None


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        try:
            return f.default_factory()  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - only a hint
            return None
    return None


def _hint(f: dataclasses.Field) -> str:
    d = _default(f)
    return "" if dataclasses.is_dataclass(d) else f" (default {d!r})"


def _check_number(name: str, v, f) -> None:
    if isinstance(v, float) or (isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} = {v!r} is not a finite number; give a finite value"
                             f"{_hint(f)}")


def check_fields(obj, prefix: str = "") -> None:
    """Type, NaN/inf and emptiness of every field of the dataclass `obj` (recursively),
    judged from the field annotations; raise TypeError/ValueError naming `prefix.field`."""
    for f in dataclasses.fields(obj):
        name = f"{prefix}{f.name}"
        v = getattr(obj, f.name)
        kinds = _kinds(f.type)
        d = _default(f)
        if dataclasses.is_dataclass(d) and not isinstance(v, type(d)):
            raise TypeError(f"{name} = {v!r} must be a {type(d).__name__} (e.g. "
                            f"{type(d).__name__}()), got a {type(v).__name__}")
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            check_fields(v, name + ".")
            continue
        if not kinds or kinds & {"object", "Any"}:
            continue
        if v is None:
            if "None" not in kinds:
                raise TypeError(f"{name} = None is not allowed; give a value{_hint(f)}")
            continue
        if isinstance(v, bool):
            if "bool" not in kinds:
                raise TypeError(f"{name} = {v!r} is a flag (bool), not a "
                                f"{'/'.join(sorted(kinds - {'None'}))}; give a value{_hint(f)}")
            continue
        if kinds == {"bool"} or kinds == {"bool", "None"}:
            raise TypeError(f"{name} must be True or False, got {v!r} ({type(v).__name__})")
        if isinstance(v, numbers.Number):
            if not isinstance(v, numbers.Real):
                raise TypeError(f"{name} = {v!r} is not a real number; give a value{_hint(f)}")
            if not kinds & {"int", "float"}:
                raise TypeError(f"{name} = {v!r} is a number; expected "
                                f"{'/'.join(sorted(kinds - {'None'}))}{_hint(f)}")
            if "float" not in kinds and not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} = {v!r} must be an int (a count, not a fraction)"
                                f"{_hint(f)}")
            _check_number(name, v, f)
            rng = RANGES.get(f"{type(obj).__name__}.{f.name}", RANGES.get(f.name))
            if rng is not None and not rng[0] <= v <= rng[1]:
                raise ValueError(f"{name} = {v!r} is outside [{rng[0]:g}, {rng[1]:g}]; give a "
                                 f"value in that range{_hint(f)}")
            continue
        if isinstance(v, str):
            if "str" not in kinds and not kinds & {"Sequence"}:
                raise TypeError(f"{name} = {v!r} is a string; expected "
                                f"{'/'.join(sorted(kinds - {'None'}))}{_hint(f)}")
            if not v.strip():
                raise ValueError(f"{name} is an empty string; give a value{_hint(f)}")
            continue
        if isinstance(v, (list, tuple)):
            if not kinds & {"tuple", "list", "Sequence"}:
                raise TypeError(f"{name} = {v!r} is a {type(v).__name__}; expected "
                                f"{'/'.join(sorted(kinds - {'None'}))}{_hint(f)}")
            if not v and (d is None or (isinstance(d, (list, tuple)) and d)):
                raise ValueError(f"{name} is empty; give at least one value{_hint(f)}")
            el = _element(f.type)
            if el is not None:
                ekinds, fixed = el
                if fixed is not None and len(v) != fixed:
                    raise ValueError(f"{name} = {v!r} must hold {fixed} values{_hint(f)}")
                for x in v:
                    number = isinstance(x, numbers.Real) and not isinstance(x, bool)
                    if ekinds and ekinds <= {"int", "float"} and not number:
                        raise TypeError(f"{name} = {v!r}: {x!r} is not a number{_hint(f)}")
                    if ekinds == {"str"} and not (isinstance(x, str) and x.strip()):
                        raise TypeError(f"{name} = {v!r}: {x!r} is not a non-empty string"
                                        f"{_hint(f)}")
                    if number:
                        _check_number(name, x, f)
            continue
        if isinstance(v, dict):
            if "dict" not in kinds:
                raise TypeError(f"{name} = {v!r} is a dict; expected "
                                f"{'/'.join(sorted(kinds - {'None'}))}{_hint(f)}")
            continue
        if kinds <= {"int", "float", "bool", "str", "None"}:
            raise TypeError(f"{name} = {v!r} ({type(v).__name__}) is not a "
                            f"{'/'.join(sorted(kinds - {'None'}))}{_hint(f)}")


def check_config(cfg, *, max_steps: int = MAX_STEPS) -> None:
    """Every field of a config dataclass (check_fields), then its own validate(), then the
    number of steps against the scheduler's `max_steps`."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config object (e.g. LRConfig()), got {type(cfg).__name__}")
    check_fields(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    layout = getattr(cfg, "layout", cfg)
    steps = getattr(layout, "steps", None)
    if isinstance(steps, numbers.Integral) and steps > max_steps:
        raise ValueError(f"steps = {steps} is more than the scheduler's {max_steps} training "
                         "timesteps; give at most that many (50 is the usual DDIM setting)")


def _resolve(value, n: int) -> int:
    from .config import resolve_steps
    return resolve_steps(value, n)


def noop_notes(cfg) -> list[str]:
    """Sentences naming each combination under which a stage of an LRConfig does nothing."""
    notes = []
    layout, swap = getattr(cfg, "layout", None), getattr(cfg, "swap", None)
    if layout is None or swap is None:
        return notes
    n = layout.steps
    l2 = max(_resolve(swap.lambda2, n), min(swap.min_lambda2, n))
    if l2 >= n:
        notes.append(
            f"with steps = {n} the retouch phase never runs: it starts at lambda2 = "
            f"max({swap.lambda2!r} of {n} steps, min_lambda2 = {swap.min_lambda2}) = {l2} >= "
            f"{n}, so the final image equals the layout; give more steps (e.g. 50) or a "
            "smaller min_lambda2")
    return notes


def check_call(cfg, seeds=None, bundle=None) -> None:
    """Everything check_config checks (with the bundle's scheduler's step limit), the seeds,
    and a NoOpWarning per note of noop_notes: one line before any denoising."""
    max_steps = MAX_STEPS
    sched = getattr(bundle, "scheduler", None)
    if sched is not None:
        max_steps = int(getattr(sched, "config", {}).get("num_train_timesteps", MAX_STEPS))
    check_config(cfg, max_steps=max_steps)
    if seeds is not None:
        check_seeds(seeds)
    for note in noop_notes(cfg):
        warnings.warn(note, NoOpWarning, stacklevel=3)


def check_seeds(seeds, name: str = "seed") -> list[int]:
    """Seeds as ints in [0, SEED_MAX]; a TypeError/ValueError naming the bad one otherwise."""
    seeds = [seeds] if isinstance(seeds, numbers.Number) or isinstance(seeds, str) else list(seeds)
    if not seeds:
        raise ValueError(f"no {name} given; give one or more ints, e.g. 0")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{name} {s!r} is not an int; give whole numbers from 0 to {SEED_MAX}")
        if not 0 <= s <= SEED_MAX:
            raise ValueError(f"{name} {s} is outside [0, {SEED_MAX}] (the random generator's "
                             "seed range); give a seed in that range, e.g. 0")
        out.append(int(s))
    return out
