"""Benchmark specs: subjects (reference photos, class noun), prompt templates, seeds, methods,
config overrides (docs/method.md "Evaluation").

    spec = shapeworld()                       # our ShapeWorld benchmark (toy backend)
    spec = vico("/path/to/vico")              # ViCo + DreamMatcher's challenging prompts
    spec.save("bench.json"); Benchmark.load("bench.json")   # JSON (or YAML with pyyaml)

A prompt is a template where "{}" stands for the subject ("a {} on the beach" -> "a sks dog on
the beach"). ViCo is read from a local folder of DreamMatcher's `inputs/` layout; without one,
the same files are fetched from that public repository into a cache (`fetch_vico`).
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.request
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .methods import METHODS, SWEEPABLE

# DreamMatcher's repository, pinned to the commit whose inputs/ this package's checksums describe.
VICO_URL = ("https://raw.githubusercontent.com/cvlab-kaist/DreamMatcher/"
            "a7c29240c65594e1ac18f1230b152728b6d065b8/inputs/")
VICO_LIVE = ("black_cat", "brown_cat", "brown_dog", "brown_dog2", "fat_dog")
# Class nouns of ViCo's concepts [ours: from the concept names; DreamMatcher's scripts name them
# e.g. cat_statue, alarm_clock, red_vase, wooden_barn]. Override per subject in a spec.
VICO_CLASS = {"barn": "barn", "black_cat": "cat", "brown_cat": "cat", "brown_dog": "dog",
              "brown_dog2": "dog", "cat-toy": "statue", "clock": "clock", "duck_toy": "toy",
              "elephant_statue": "statue", "fat_dog": "dog", "monster_toy": "toy",
              "pink_sunglasses": "sunglasses", "red_teapot": "teapot", "teddybear": "teddybear",
              "tortoise_plushy": "plushy", "vase": "vase"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Prompt:
    """A template ("{}" = identifier + class noun) and its category ("normal", "challenging";
    ShapeWorld: "hard")."""
    template: str
    category: str = "normal"

    def __post_init__(self):
        if self.template.count("{}") != 1:
            raise ValueError(f"prompt template {self.template!r} must hold '{{}}' exactly once "
                             "(where the subject goes), e.g. 'a {} on the beach'")

    def personal(self, subject: "Subject") -> str:
        return self.template.format(f"{subject.identifier} {subject.class_noun}")

    def clip_text(self, subject: "Subject", protocol: str = "ours") -> str:
        """T_CLIP's text: the class noun in place of the subject ("ours"), or the template line
        verbatim, '{}' included, as DreamMatcher's evaluate.py passes it ("dreammatcher")."""
        return self.template if protocol == "dreammatcher" else self.template.format(subject.class_noun)


@dataclass
class Subject:
    """name, class_noun, reference photo paths (source: index of the one that is inverted),
    the identifier, the personalized model (sd: a LoRA / DreamBooth path; toy: None = the
    shipped LoRA) and the prompts."""
    name: str
    class_noun: str
    references: list[str]
    prompts: list[Prompt]
    source: int = 0
    identifier: str = "sks"
    personalized: str | None = None

    def __post_init__(self):
        self.prompts = [p if isinstance(p, Prompt) else Prompt(**p) for p in self.prompts]
        if not self.references:
            raise ValueError(f"subject {self.name!r} has no reference photos")
        if not 0 <= self.source < len(self.references):
            raise ValueError(f"subject {self.name!r}: source {self.source} is not an index of its "
                             f"{len(self.references)} references")


@dataclass
class Benchmark:
    """Everything a run needs. methods: names of lr_tutorial.methods.METHODS. lambda1_sweep:
    extra variants of `sweep_methods` at these lambda1 values (fractions of N). config: dotted
    overrides of LRConfig for every method, e.g. {"mask.tau_lo": 0.4}. metrics: "oracle"
    (ShapeWorld), "dino", "clip"; None = oracle on toy, dino + clip on sd. base / sam: the sd
    base model and SAM checkpoint (None: attention-only masks)."""
    name: str
    subjects: list[Subject]
    backend: str = "toy"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    lambda1_sweep: list[float] = field(default_factory=list)
    sweep_methods: list[str] = field(default_factory=lambda: list(SWEEPABLE))
    steps: int = 50
    guidance: float | None = None  # None: the backend's (ModelBundle.guidance)
    config: dict = field(default_factory=dict)
    metrics: list[str] | None = None
    base: str | None = None
    sam: str | None = None

    def __post_init__(self):
        self.subjects = [s if isinstance(s, Subject) else Subject(**s) for s in self.subjects]
        unknown = [m for m in (*self.methods, *self.sweep_methods) if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        bad = [m for m in self.sweep_methods if m not in SWEEPABLE]
        if bad and self.lambda1_sweep:
            raise ValueError(f"{bad} fix lambda1 themselves; sweep only {list(SWEEPABLE)}")
        if self.backend not in ("toy", "sd"):
            raise ValueError(f"backend must be 'toy' or 'sd', got {self.backend!r}")
        if len({s.name for s in self.subjects}) != len(self.subjects):
            raise ValueError("subject names must be unique")
        from .methods import apply_overrides
        from .pipeline import LRConfig
        apply_overrides(LRConfig(), self.config)  # unknown or invalid knobs fail here

    @property
    def metric_names(self) -> list[str]:
        return list(self.metrics) if self.metrics else (["oracle"] if self.backend == "toy"
                                                         else ["dino", "clip"])

    def limit(self, prompts: int | None = None, seeds: int | None = None,
              subjects: list[str] | None = None) -> "Benchmark":
        """A smaller copy: the first `prompts` prompts of each category (round-robin over
        categories, so hard prompts stay in), the first `seeds` seeds, the named subjects."""
        subs = [s for s in self.subjects if subjects is None or s.name in subjects]
        if subjects is not None and len(subs) != len(set(subjects)):
            raise ValueError(f"unknown subjects in {subjects}; have {[s.name for s in self.subjects]}")
        if prompts:
            subs = [replace(s, prompts=_round_robin(s.prompts, prompts)) for s in subs]
        return replace(self, subjects=subs, seeds=self.seeds[:seeds] if seeds else self.seeds)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def save(self, path) -> Path:
        path = Path(path)
        text = (_yaml().safe_dump(self.to_dict(), sort_keys=False)
                if path.suffix in (".yaml", ".yml") else json.dumps(self.to_dict(), indent=1))
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path) -> "Benchmark":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"benchmark spec {path} not found; give a JSON/YAML file, or "
                                    "'shapeworld' / 'vico' for the built-in benchmarks")
        text = path.read_text()
        data = _yaml().safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        return cls(**data)


def _round_robin(prompts: list[Prompt], n: int) -> list[Prompt]:
    cats: dict[str, list[Prompt]] = {}
    for p in prompts:
        cats.setdefault(p.category, []).append(p)
    out, i = [], 0
    while len(out) < min(n, len(prompts)):
        for group in cats.values():
            if i < len(group) and len(out) < n:
                out.append(group[i])
        i += 1
    return out


def _yaml():
    try:
        import yaml
    except ImportError as e:
        raise ImportError("YAML specs need pyyaml (`pip install pyyaml`); or write the spec as "
                          ".json") from e
    return yaml


# ----------------------------------------------------------------------------- ShapeWorld
def shapeworld(n_normal: int = 32, n_hard: int = 16, seeds=(0, 1, 2, 3), **kw) -> Benchmark:
    """Our benchmark: the toy subject `sks star`, its five reference photos, and held-out
    prompts from data/prompts/heldout_personal.txt (never training captions). "hard" prompts
    ask for what the references never show: a small subject away from the centre (the
    references are big and centred: the personalized model's layout collapse fights them)."""
    from .toy import report, subject, world

    prompts_file = _data() / "prompts" / "heldout_personal.txt"
    normal, hard = [], []
    for p in report.read_prompts(prompts_file):
        facts = world.parse_prompt(p)
        hard_one = facts["size"] == "small" and facts["position"] not in (None, "centre")
        (hard if hard_one else normal).append(
            Prompt(p.replace(f"{world.SUBJECT_IDENTIFIER} {world.SUBJECT_CLASS}", "{}"),
                   "hard" if hard_one else "normal"))
    if len(normal) < n_normal or len(hard) < n_hard:
        raise ValueError(f"{prompts_file} has {len(normal)} normal and {len(hard)} hard prompts; "
                         f"asked for {n_normal} and {n_hard}")
    refs = [str(p) for p in subject.reference_paths()]
    sub = Subject("sks_star", world.SUBJECT_CLASS, refs, normal[:n_normal] + hard[:n_hard],
                  identifier=world.SUBJECT_IDENTIFIER)
    return Benchmark("shapeworld", [sub], backend="toy", seeds=list(seeds), **kw)


def _data() -> Path:
    from .models import data_dir
    return data_dir()


# ----------------------------------------------------------------------------- ViCo
def default_cache() -> Path:
    return Path(os.environ.get("LR_TUTORIAL_CACHE", Path.home() / ".cache" / "lr_tutorial")) / "vico"


def check_vico(root: Path) -> None:
    missing = [f for f in ("prompts_live_objects.txt", "prompts_nonlive_objects.txt",
                           "imgs_source.txt") if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a ViCo folder of DreamMatcher's inputs/ layout (missing {missing}). "
            "Give the folder that holds the concept folders and prompts_*.txt (--vico PATH)")


def fetch_vico(cache: str | Path | None = None, base_url: str = VICO_URL,
               timeout: float = 30.0) -> Path:
    """Download the ViCo files (lr_tutorial.vico_files) from DreamMatcher's public repository
    into `cache` (default ~/.cache/lr_tutorial/vico); files already there are kept. Offline:
    a ConnectionError naming the local-folder option."""
    from .vico_files import FILES

    cache = Path(cache) if cache else default_cache()
    for rel, sha in FILES.items():
        dest = cache / rel
        if dest.is_file():
            continue
        try:
            with urllib.request.urlopen(base_url + rel, timeout=timeout) as r:
                data = r.read()
        except OSError as e:  # URLError, timeouts, refused connections
            raise ConnectionError(
                f"could not download the ViCo benchmark file {rel} from {base_url} ({e}). "
                "Offline? Give a local copy of the folder instead: `--vico PATH` on the command "
                "line or vico(root=PATH), a folder of DreamMatcher's inputs/ layout "
                "(concept folders + prompts_*.txt)") from e
        if hashlib.sha256(data).hexdigest() != sha:
            warnings.warn(f"{rel} differs from the copy this package's checksums describe; "
                          "numbers may not be comparable", stacklevel=2)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return cache


def vico(root: str | Path | None = None, *, cache: str | Path | None = None,
         categories=("normal", "challenging"), personalized_dir: str | Path | None = None,
         **kw) -> Benchmark:
    """The paper's benchmark: ViCo's concepts with ViCo's prompts ("normal") and DreamMatcher's
    challenging prompts, live or non-live by concept. `root`: a local folder; None: the cache,
    fetched when incomplete. personalized_dir/<concept>: each concept's LoRA or DreamBooth."""
    if root is None:
        from .vico_files import FILES
        cache = Path(cache) if cache else default_cache()
        root = cache if all((cache / f).is_file() for f in FILES) else fetch_vico(cache)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ViCo folder {root} does not exist; give the folder that holds "
                                "the concept folders and prompts_*.txt (--vico PATH)")
    check_vico(root)
    sources = json.loads((root / "imgs_source.txt").read_text())
    files = {"normal": "prompts_{}_objects.txt", "challenging": "prompts_{}_objects_challenging.txt"}
    subjects = []
    for concept in sorted(d.name for d in root.iterdir() if d.is_dir()):
        refs = sorted(p for p in (root / concept).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not refs:
            continue
        live = "live" if concept in VICO_LIVE else "nonlive"
        prompts = [Prompt(line.strip(), cat) for cat in categories
                   for line in (root / files[cat].format(live)).read_text().splitlines()
                   if line.strip()]
        names = [p.name for p in refs]
        src = names.index(sources[concept]) if sources.get(concept) in names else 0
        pers = str(Path(personalized_dir) / concept) if personalized_dir else None
        subjects.append(Subject(concept, VICO_CLASS.get(concept, concept.split("_")[-1]),
                                [str(p) for p in refs], prompts, source=src, personalized=pers))
    kw.setdefault("backend", "sd")
    kw.setdefault("seeds", list(range(8)))  # the paper: 8 samples per prompt
    return Benchmark("vico", subjects, **kw)
