"""The benchmark runner behind `python -m lr_tutorial evaluate`.

    run(shapeworld(), "outputs/eval")            # one process
    accelerate launch -m lr_tutorial evaluate --benchmark shapeworld --out outputs/eval

Work is a list of batches (variant x subject x prompts x seeds, `batch` samples each), fixed by
the spec alone, so every sample is computed in the same batch whatever the number of processes:
sharded results equal single-process ones. Under accelerate each process takes its share of
the unfinished batches (PartialState.split_between_processes); the main process merges.

Output folder:
    spec.json                                   the benchmark as run
    samples/<variant>/<subject>/<p>_s<seed>.png  each sample, and .json: its row (metrics,
                                                settings hash); written atomically, the .json
                                                last, so a rerun skips exactly what is done
    results.csv, results.md, rows.csv, plots/   merged tables and figures (lr_tutorial.results)
A rerun resumes; a finished sample that is damaged (its image does not decode, its row does not
parse) is named and redone. Samples whose settings differ from the folder's are never
overwritten without overwrite=True (--overwrite), which discards the folder's own results
first; a folder holding anything else (files an evaluation does not write) is refused, naming
them, before any model loads.

The ShapeWorld replication (every method and ablation, 48 prompts incl. 16 hard, 4 seeds,
50 steps, and the lambda1 sweep; resumable, so it may run in several sittings):
    python -m lr_tutorial evaluate --benchmark shapeworld --out outputs/eval/shapeworld \
        --lambda1-sweep 0,0.1,0.3,0.4,0.6,0.8,1
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import files, methods, metrics
from .benchmarks import Benchmark, Subject


@dataclass
class Variant:
    """A method with extra config overrides (a lambda1 sweep point)."""
    name: str
    method: str
    overrides: dict = field(default_factory=dict)


@dataclass
class Item:
    variant: Variant
    subject: Subject
    prompt_index: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant.name}/{self.subject.name}/{self.prompt_index:03d}_s{self.seed}"


def variants(spec: Benchmark) -> list[Variant]:
    out = [Variant(m, m) for m in spec.methods]
    for l1 in spec.lambda1_sweep:
        out += [Variant(f"{m}@lambda1={float(l1):g}", m, {"layout.lambda1": float(l1)})
                for m in spec.sweep_methods]
    return out


def batches(spec: Benchmark, size: int) -> list[list[Item]]:
    """All samples, in fixed batches of at most `size` (one variant and subject each)."""
    if size < 1:
        raise ValueError(f"batch must be >= 1, got {size}")
    out = []
    for v in variants(spec):
        for s in spec.subjects:
            items = [Item(v, s, i, seed) for i in range(len(s.prompts)) for seed in spec.seeds]
            out += [items[j:j + size] for j in range(0, len(items), size)]
    return out


def config_for(spec: Benchmark, item: Item):
    from .config import LRConfig
    base = methods.apply_overrides(LRConfig(), {**spec.config, "layout.steps": spec.steps,
                                                "layout.guidance": spec.guidance,
                                                "reference_index": item.subject.source})
    return methods.method_config(item.variant.method, base, item.variant.overrides)


def settings_hash(spec: Benchmark, item: Item, protocol: str) -> str:
    """What a sample depends on; a stored sample with another hash is not this sample."""
    from types import SimpleNamespace
    from .models import backend_defaults
    s = item.subject
    cfg = config_for(spec, item)  # lambda1/guidance None: the backend's own, hashed as such
    cfg.layout = cfg.layout.resolved(SimpleNamespace(**backend_defaults(spec.backend)))
    data = {"config": cfg.to_dict(), "method": item.variant.method,
            "backend": spec.backend, "base": spec.base, "sam": spec.sam,
            "subject": [s.name, s.class_noun, s.identifier, s.source, s.personalized,
                        [Path(r).name for r in s.references]],
            "prompt": s.prompts[item.prompt_index].personal(s), "seed": item.seed,
            "metrics": spec.metric_names, "protocol": protocol}
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the folder
def _paths(out: Path, item: Item) -> tuple[Path, Path]:
    base = out / "samples" / item.key
    return base.with_suffix(".png"), base.with_suffix(".json")


# What an evaluation folder holds; anything else in it is the user's, never touched.
OWN_FILES = files.OUTPUT_NAMES["evaluation"]  # spec, results, rows, plots, samples


def _stored(out: Path, item: Item, say: bool = True) -> dict | None:
    """The finished sample's row, or None when it is missing; a damaged sample (an image that
    does not decode, a row that does not parse) counts as missing and is named on stderr, so
    the run redoes it."""
    png, js = _paths(out, item)
    if not (js.is_file() and png.is_file()):
        return None
    problem = _damage(png, js)
    if problem:
        if say:
            print(f"redoing damaged sample {item.key}: {problem}", file=sys.stderr, flush=True)
        return None
    return json.loads(js.read_text())


def _damage(png: Path, js: Path) -> str | None:
    from PIL import Image
    try:
        row = json.loads(js.read_text(encoding="utf-8"))
        if not isinstance(row, dict) or "settings" not in row:
            return f"{js.name} is not a sample row"
    except (OSError, ValueError) as e:
        return f"{js.name} does not parse ({e})"
    try:
        with Image.open(png) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder error means a damaged file
        return f"{png.name} does not decode ({e})"
    return None


def foreign_files(out: Path) -> list[str]:
    """Files in `out` that an evaluation did not write (files.OUTPUT_NAMES' rule, OWN_FILES)."""
    return files.foreign_files(out, "evaluation")


def check_folder(out: Path, spec: Benchmark, protocol: str, overwrite: bool) -> None:
    """Refuse, before any model loads: a path that is a file or cannot be written; a folder
    that is not an evaluation folder (holds files but no spec.json); with `overwrite`, a folder
    holding files an evaluation did not write (named); without it, samples made with other
    settings."""
    from . import files
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for the results")
    files._check_writable(out / "x" if out.is_dir() else out, "--out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "spec.json").is_file():
        held = sorted(p.name for p in out.iterdir())
        raise FileExistsError(f"{out} exists and is not an evaluation folder (no spec.json; it "
                              f"holds {', '.join(held[:5])}); choose another --out")
    if overwrite:
        foreign = foreign_files(out)
        if foreign:
            raise FileExistsError(
                f"{out} holds files an evaluation did not write: {', '.join(foreign[:5])}"
                f"{' and more' if len(foreign) > 5 else ''}; --overwrite only discards the "
                "evaluation's own files. Move them away or choose another --out")
        return
    for b in batches(spec, 1 << 30):
        for it in b:
            png, js = _paths(out, it)
            if not js.is_file():
                continue
            try:
                row = json.loads(js.read_text())
            except ValueError:
                continue  # damaged: redone by the run
            if row.get("settings") != settings_hash(spec, it, protocol):
                raise FileExistsError(
                    f"{out} holds {it.key} made with other settings (config, steps, models or "
                    "metrics differ). Choose another --out to keep both, or pass --overwrite to "
                    "discard the folder's results")


def _discard(out: Path) -> None:
    """Delete the evaluation's own files in `out` (check_folder has refused foreign ones)."""
    for rel in files._all_files(out):
        if rel == files.MANIFEST or any(files._matches(rel, p) for p in OWN_FILES):
            (out / rel).unlink(missing_ok=True)
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()


def _write_atomic(path: Path, data: bytes) -> None:
    from .files import write_bytes_atomic
    write_bytes_atomic(path, data)


# ----------------------------------------------------------------------------- workers
class _Worker:
    """Models, references and metric scorers of one process, loaded once and cached."""

    def __init__(self, spec: Benchmark, protocol: str, dino: str, clip: str, device):
        self.spec, self.protocol, self.device = spec, protocol, device
        self.dino_id, self.clip_id = dino, clip
        self._bundle_key, self._bundle = None, None
        self._lr, self._refs, self._ref_emb, self._scorers = {}, {}, {}, {}

    def bundle(self, subject: Subject):
        from .models import load_models
        key = (self.spec.backend, subject.personalized, subject.class_noun, subject.identifier)
        if key != self._bundle_key:
            if self.spec.backend == "toy":
                self._bundle = load_models("toy", personalized=subject.personalized or "default",
                                           device=str(self.device))
                if (subject.class_noun, subject.identifier) != (self._bundle.class_noun,
                                                                self._bundle.identifier):
                    raise ValueError(f"toy subject {subject.name!r} must be "
                                     f"'{self._bundle.identifier} {self._bundle.class_noun}'")
            else:
                kw = {"base": self.spec.base} if self.spec.base else {}
                self._bundle = load_models("sd", personalized=subject.personalized,
                                           class_noun=subject.class_noun,
                                           identifier=subject.identifier, device=self.device, **kw)
            self._bundle_key, self._lr, self._refs = key, {}, {}
        return self._bundle

    def pipeline(self, item: Item):
        from .masks import SamSegmenter
        from .pipeline import LayoutAndRetouch
        key = (item.variant.name, item.subject.name)
        if key not in self._lr:
            seg = "auto"
            if self.spec.backend == "sd" and self.spec.sam:
                seg = SamSegmenter(self.spec.sam, device=str(self.device))
            self._lr[key] = LayoutAndRetouch(self._bundle, config_for(self.spec, item), seg)
        return self._lr[key]

    def references(self, subject: Subject) -> np.ndarray:
        from .images import load_images
        if subject.name not in self._refs:
            self._refs[subject.name] = load_images(subject.references, self._bundle.image_size)
        return self._refs[subject.name]

    def scorer(self, kind: str):
        if kind not in self._scorers:
            load = metrics.load_dino if kind == "dino" else metrics.load_clip
            s = load(self.dino_id if kind == "dino" else self.clip_id, device=str(self.device))
            s.protocol = metrics.Protocol(self.protocol)
            self._scorers[kind] = s
        return self._scorers[kind]

    def reference_embedding(self, kind: str, subject: Subject):
        key = (kind, subject.name)
        if key not in self._ref_emb:
            photos = [self.scorer(kind).protocol.load_photo(p) for p in subject.references]
            self._ref_emb[key] = self.scorer(kind).embed(photos)
        return self._ref_emb[key]

    def run(self, batch: list[Item]) -> tuple[np.ndarray, list[dict]]:
        from .config import resolve_steps
        first = batch[0]
        subject, spec = first.subject, self.spec
        bundle = self.bundle(subject)
        lr = self.pipeline(first)
        prompts = [subject.prompts[it.prompt_index].personal(subject) for it in batch]
        seeds = [it.seed for it in batch]
        refs = self.references(subject) if methods.METHODS[first.variant.method].kind == "lr" else None
        t0 = time.perf_counter()
        images, masks = methods.generate(first.variant.method, bundle, lr, prompts, seeds, refs,
                                         masks=spec.backend != "toy")
        elapsed = (time.perf_counter() - t0) / len(batch)
        steps = lr.config.layout.steps
        rows = [{"key": it.key, "variant": it.variant.name, "method": it.variant.method,
                 "lambda1": resolve_steps(lr.resolved_config().layout.lambda1, steps) / steps,
                 "subject": subject.name, "prompt_index": it.prompt_index,
                 "category": subject.prompts[it.prompt_index].category, "prompt": p,
                 "seed": it.seed, "settings": settings_hash(spec, it, self.protocol),
                 "elapsed_s": round(elapsed, 4)} for it, p in zip(batch, prompts)]
        names = spec.metric_names
        if "oracle" in names:
            for row, o in zip(rows, metrics.toy_scores(images, prompts)):
                row.update({k: o[k] for k in ("fidelity", "match", "identity", "stated", "read",
                                              "centroid", "layout")})
        elif masks is not None:
            for row, m in zip(rows, masks):
                row["layout"] = metrics.mask_layout(m)
        if "dino" in names:
            e = self.scorer("dino").embed(images)
            sim = metrics.identity_similarity(e, self.reference_embedding("dino", subject))
            for row, s, v in zip(rows, sim, e):
                row["i_dino"], row["dino"] = float(s), [round(float(x), 6) for x in v]
        if "clip" in names:
            e = self.scorer("clip").embed(images)
            sim = metrics.identity_similarity(e, self.reference_embedding("clip", subject))
            texts = [subject.prompts[it.prompt_index].clip_text(subject, self.protocol) for it in batch]
            ts = metrics.text_similarity(e, self.scorer("clip").embed_text(texts))
            for row, s, t in zip(rows, sim, ts):
                row["i_clip"], row["t_clip"] = float(s), float(t)
        return images, rows


def _state():
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def run(spec: Benchmark, out: str | Path, *, overwrite: bool = False, batch: int = 16,
        progress: bool = True, protocol: str = "ours", dino: str = metrics.DINO_ID,
        clip: str = metrics.CLIP_ID, state=None) -> Path:
    """Generate, score and store every missing sample of `spec` in `out`, sharded over the
    accelerate processes, then (main process) write the merged tables and plots."""
    from PIL import Image

    from . import results
    from .files import atomic_file

    metrics.Protocol(protocol)  # validate early
    out = Path(out)
    state = state or _state()
    check_folder(out, spec, protocol, overwrite)  # every process: all raise alike
    if state.is_main_process:
        if overwrite and out.exists():
            _discard(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "spec.json", json.dumps(spec.to_dict(), indent=1).encode())
    state.wait_for_everyone()
    todo = [b for b in batches(spec, batch) if any(_stored(out, it) is None for it in b)]
    state.wait_for_everyone()  # nobody writes before every process has listed the work
    worker = _Worker(spec, protocol, dino, clip, state.device)
    with state.split_between_processes(todo) as mine:
        print(f"process {state.process_index + 1}/{state.num_processes}: {len(mine)} of "
              f"{len(todo)} batches to do", flush=True)
        bar = tqdm(mine, desc=f"evaluate [{state.process_index}]",
                   disable=not progress or not state.is_local_main_process)
        for b in bar:
            images, rows = worker.run(b)
            for it, img, row in zip(b, images, rows):
                if _stored(out, it, say=False) is not None:
                    continue  # another run finished it; never overwrite
                png, js = _paths(out, it)
                with atomic_file(png) as tmp:
                    Image.fromarray(img).save(tmp)
                _write_atomic(js, json.dumps(row).encode())
    state.wait_for_everyone()
    if state.is_main_process:
        results.write(out, spec, [v.name for v in variants(spec)])
    state.wait_for_everyone()
    return out
