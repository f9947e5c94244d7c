"""Every knob of the method, in one place that every stage imports (docs/method.md).

    LRConfig(layout=LayoutConfig(lambda1=0.3), swap=SwapConfig(lambda2=0.2),
             mask=MaskConfig(lambda3=0.8), engine="reference")

A step boundary (lambda1, lambda2, lambda3, start_step) is a fraction of the N steps (a float in
[0, 1]) or a step count (an int); `resolve_steps` turns it into a step. Each dataclass checks
its fields when made and again in `validate()`, raising an error that names the knob and the fix.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from . import attention

ENGINE_NAMES = ("reference", "fast")  # LRConfig.engine
def resolve_steps(value: float | int, n: int, name: str = "lambda") -> int:
    """A step boundary given as a fraction of N (float in [0, 1]) or a step count (int)."""
    check_boundary(value, name)
    if isinstance(value, numbers.Integral):
        if not 0 <= value <= n:
            raise ValueError(f"{name} = {value} steps is outside [0, {n}] for {n} steps; give a "
                             f"step count from 0 to {n}, or a fraction such as 0.2")
        return int(value)
    return int(round(float(value) * n))


def check_boundary(value, name: str) -> None:
    """A step boundary must be a fraction (float in [0, 1]) or a step count (int >= 0); the
    upper bound of a count is checked against N by resolve_steps."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a fraction of the steps (float in [0, 1]) or a step "
                        f"count (int), got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{name} = {value} steps is negative; give a step count >= 0")
    elif not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} = {value} as a fraction of the steps must be in [0, 1]; "
                         "give an int for a step count")


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}; 50 is the usual DDIM "
                         "setting (a few steps suffice for a quick look on the toy backend)")


def check_guidance(guidance, allow_none: bool = False) -> None:
    if guidance is None and allow_none:
        return
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not guidance >= 0:
        raise ValueError(f"guidance must be a number >= 0{' or None' if allow_none else ''}, got "
                         f"{guidance!r}; 7.5 is Stable Diffusion's usual setting, 3.0 the toy "
                         "backend's (1 means no classifier-free guidance)")


def resolve_lambda1(bundle, lambda1):
    """`lambda1`, or the bundle's own hand-over (ModelBundle.lambda1) when it is None."""
    lambda1 = getattr(bundle, "lambda1", 0.2) if lambda1 is None else lambda1
    check_boundary(lambda1, "lambda1")
    return lambda1


def resolve_guidance(bundle, guidance) -> float:
    """`guidance`, or the bundle's own weight (ModelBundle.guidance) when it is None."""
    guidance = getattr(bundle, "guidance", 7.5) if guidance is None else guidance
    check_guidance(guidance)
    return float(guidance)


@dataclass
class LayoutConfig:
    """Stage 1 knobs (docs/method.md "Stage 1"). lambda1: vanilla steps, a fraction of N or a
    count; None (default): the models' own hand-over (ModelBundle.lambda1: Stable Diffusion's
    0.2 N [ours], the toy backend's 0.6 N, where its vanilla model has fixed the layout:
    `python -m lr_tutorial toy-diagnose --only 1`). steps: N DDIM steps. guidance: CFG weight;
    None (default): the models' own (ModelBundle.guidance: Stable Diffusion's 7.5, the toy
    backend's 3.0) [ours]."""
    lambda1: float | int | None = None
    steps: int = 50
    guidance: float | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError/TypeError naming the bad knob (also after fields were changed)."""
        check_steps(self.steps)
        check_guidance(self.guidance, allow_none=True)
        if self.lambda1 is not None:
            resolve_steps(self.lambda1, self.steps, "lambda1")

    def resolved(self, bundle) -> "LayoutConfig":
        """A copy with lambda1 and guidance filled in from the bundle where they are None."""
        return replace(self, lambda1=resolve_lambda1(bundle, self.lambda1),
                       guidance=resolve_guidance(bundle, self.guidance))


@dataclass
class SwapConfig:
    """Multi-source attention swap (docs/method.md "Stage 2").

    lambda2: end of the structure phase, fraction of N or step count (default 0.2 N, never
    before step 4 [ours]). structure_layers / retouch_layers: glob patterns over self-attention
    paths (structure: all self-attention; retouch: the decoder's, SD 1.x up_blocks 1-3 [prior]).
    mode: "multi" (masked reference + context, the paper's), "reference" (single-source: the
    target reads the whole reference, MasaCtrl-like ablation), "context" (context only) or "none".
    """
    lambda2: float | int = 0.2
    min_lambda2: int = 4
    structure_layers: str | Sequence[str] = "*attn1"
    retouch_layers: str | Sequence[str] = "up_blocks.*attn1"
    mode: str = "multi"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise naming the bad knob (layer patterns are matched against a UNet by
        SwapController, which raises when a pattern selects no self-attention layer)."""
        if self.mode not in ("multi", "reference", "context", "none"):
            raise ValueError(f"swap mode must be 'multi', 'reference', 'context' or 'none', "
                             f"got {self.mode!r}")
        check_boundary(self.lambda2, "lambda2")
        if isinstance(self.min_lambda2, bool) or not isinstance(self.min_lambda2, int) \
                or self.min_lambda2 < 0:
            raise ValueError(f"min_lambda2 must be a step count >= 0, got {self.min_lambda2!r}")
        for name in ("structure_layers", "retouch_layers"):
            pats = getattr(self, name)
            pats = [pats] if isinstance(pats, str) else pats
            if not pats or not all(isinstance(p, str) and p for p in pats):
                raise ValueError(f"{name} must be a glob pattern or a list of them over attention "
                                 f"paths (e.g. 'up_blocks.*attn1'), got {getattr(self, name)!r}")

    def lambda2_steps(self, n: int) -> int:
        """lambda2 as a step of n: the structure phase ends there, never before min_lambda2."""
        return max(resolve_steps(self.lambda2, n, "lambda2"), min(self.min_lambda2, n))


SOURCES = ("fused", "attention", "segmenter")


@dataclass
class MaskConfig:
    """Knobs of the mask recipe [ours], docs/method.md "Adaptive mask blending".

    attention_fractions: cross-attention layers used, by resolution as a fraction of the latent
      side (SD 1.x at 64 latents: 0.25 -> the 16x16 layers, 0.5 -> 32x32).
    attention_window: (start, end) steps of the aggregation window, fractions of N.
    tau_lo / tau_hi: support and confident thresholds on the normalized map.
    feather: w, the feather width in latent pixels of the signed-distance ramp.
    n_positive / n_negative: SAM prompt points at attention peaks / confident background.
    lambda3: latent blending for k < lambda3 (fraction of N or step count).
    adaptive: recompute the target mask every step from the target's own cross-attention,
      united with the context mask (docs/method.md "Adaptive mask blending" [ours]). Off by
      default: the paper's adaptive mask blending is the fusion of attention and segmenter
      masks above, which M^c already is. On the toy the per-step update costs identity and
      fidelity with the default LoRA (docs/results.md, the ablation "per-step mask update"):
      the target's attention is diffuse and, unlike the context's, no segmenter gates it, so
      the mask opens the backdrop to the personalized model.
    adaptive_reach: with `adaptive`, how far (a fraction of the latent side) the mask may grow
      beyond the context's object {M^c >= 1/2}: the target's support counts only within this
      Euclidean distance of it. None: anywhere (unbounded).
    source: which sources build M: "fused" (the recipe above), "attention" (the attention
      support alone, feathered: as with no segmenter) or "segmenter" (the segmenter's mask
      alone, feathered; it is still prompted from the attention). Ablations of step 3.
    """
    attention_fractions: tuple[float, ...] = (0.25, 0.5)
    attention_window: tuple[float, float] = (0.0, 1.0)
    tau_lo: float = 0.3
    tau_hi: float = 0.7
    feather: float = 1.0
    n_positive: int = 3
    n_negative: int = 2
    lambda3: float | int = 0.8
    adaptive: bool = False
    adaptive_reach: float | None = None
    source: str = "fused"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise naming the bad knob and its valid range (also after fields were changed)."""
        if self.source not in SOURCES:
            raise ValueError(f"mask source must be one of {SOURCES}, got {self.source!r}")
        if not 0 <= self.tau_lo <= self.tau_hi <= 1:
            raise ValueError(f"need 0 <= tau_lo <= tau_hi <= 1, got {self.tau_lo}, {self.tau_hi}; "
                             "defaults are 0.3 and 0.7")
        if self.feather < 0:
            raise ValueError(f"feather must be >= 0 latent pixels, got {self.feather}")
        check_boundary(self.lambda3, "lambda3")
        lo, hi = self.attention_window
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"attention_window must be (start, end) fractions with 0 <= start "
                             f"<= end <= 1, got {self.attention_window}; default (0.0, 1.0)")
        fr = tuple(self.attention_fractions)
        if not fr or not all(0 < f <= 1 for f in fr):
            raise ValueError(f"attention_fractions must be fractions in (0, 1] of the latent "
                             f"side (0.25 -> 16x16 layers at 64 latents), got {fr}")
        if self.adaptive_reach is not None and not self.adaptive_reach >= 0:
            raise ValueError(f"adaptive_reach must be None (unbounded) or a fraction >= 0 of "
                             f"the latent side, got {self.adaptive_reach}")
        if self.n_positive < 1 or self.n_negative < 0:
            raise ValueError(f"need n_positive >= 1 and n_negative >= 0 segmenter points, got "
                             f"{self.n_positive}, {self.n_negative}")

    def layers(self, unet, latent_size: int) -> list[str]:
        """The cross-attention layers whose class-token maps build the mask: those at
        `attention_fractions` of the latent side."""
        sizes = sorted({max(1, int(round(f * latent_size))) for f in self.attention_fractions})
        return attention.select_layers(unet, "*", "cross", resolutions=sizes,
                                       latent_size=latent_size)

    def window(self, n: int) -> list[int]:
        """The steps of the attention window, of n steps (at least one)."""
        lo, hi = self.attention_window
        return list(range(int(round(lo * n)), max(int(round(hi * n)), int(round(lo * n)) + 1)))


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
    kv_budget_gb: memory the cached path may hold in keys/values (memory.cache_bytes); None: half
    the memory available where the caches live when the run starts.
    kv_device: where those caches live: "host" (the CPU's memory; on a GPU they are copied
    through pinned memory on a side stream, so the GPU's peak stays plain sampling's), "model"
    (the UNet's device: no copies, more GPU memory) or "auto" (default: "host").
    kv_store: "kv" (keys and values), "hidden" (each layer's input, projected with the layer's
    to_k / to_v when read: half the bytes) or "auto" (default: "kv"; "hidden" where the caches
    cross between host and GPU and only it fits kv_budget_gb).
    kv_dtype: storage dtype of those caches, None (the model's) or "float16" / "bfloat16":
    half a float32 model's memory, at the cost of rounding the keys/values the target reads.

    engine: "reference" (default) runs the equations of docs/method.md as written, three
    branches per stage-2 UNet call; "fast" (lr_tutorial/fast/) gives the same result within
    float rounding with the speed work above: the knobs stage2 ("cached" needs it) and kv_*
    act there only."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    reference_prompt: str | None = None
    reference_index: int = 0
    reference_inversion: str = "full"
    start_step: int | None = None
    stage2: str = "auto"
    kv_budget_gb: float | None = None
    kv_device: str = "auto"
    kv_store: str = "auto"
    kv_dtype: str | None = None
    engine: str = "reference"

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
        if self.start_step is not None and (
                isinstance(self.start_step, bool) or not isinstance(self.start_step, numbers.Integral)
                or not 0 <= self.start_step < n):
            raise ValueError(f"start_step = {self.start_step!r} must be None (start at the later "
                             f"of lambda2 and lambda1) or a step in [0, {n - 1}] for {n} steps "
                             "(0: the target starts from the context's noise)")
        if isinstance(self.reference_index, bool) \
                or not isinstance(self.reference_index, numbers.Integral) \
                or self.reference_index < 0:
            raise ValueError(f"reference_index must be an int >= 0, got {self.reference_index!r}")
        self.validate_engine()
        if unet is not None:
            size = latent_size or unet.config.sample_size
            attention.select_layers(unet, self.swap.structure_layers, "self")
            attention.select_layers(unet, self.swap.retouch_layers, "self")
            self.mask.layers(unet, size)

    def validate_engine(self) -> None:
        """The engine and the fast engine's knobs (stage2, kv_*)."""
        if self.engine not in ENGINE_NAMES:
            raise ValueError(f"engine must be one of {ENGINE_NAMES} (the method as written, or "
                             f"with its speed work), got {self.engine!r}")
        if self.engine == "reference" and self.stage2 == "cached":
            raise ValueError("stage2='cached' (key/value caches) is the fast engine's: "
                             "LRConfig(engine='fast', stage2='cached'); the reference engine "
                             "runs stage 2 batched")
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

    def target_start(self) -> int:
        """The step the target branch starts from: start_step, or (None) max(lambda2, lambda1)."""
        n = self.layout.steps
        if self.start_step is not None:
            return resolve_steps(self.start_step, n, "start_step")
        if self.layout.lambda1 is None:
            raise ValueError("lambda1 is None (the models' own hand-over): resolve the config "
                             "first, LayoutConfig.resolved(bundle) or LayoutAndRetouch.resolved_config()")
        return max(self.swap.lambda2_steps(n), resolve_steps(self.layout.lambda1, n, "lambda1"))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


