"""Attention capture through diffusers' processor API (the swap of stage 2: lr_tutorial/swap.py).

Layers are addressed by module path, exactly as `unet.attn_processors` names them minus the
".processor" suffix, e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn1` (self-attention)
or `...attn2` (cross-attention). Selections are glob patterns over those paths plus optional
latent resolutions; a selection that matches nothing raises. Processors are installed per path
(`Attention.set_processor`, what `unet.set_attn_processor({path + ".processor": proc})` does for
each layer) and always restored on exit, also after an exception. Layers that are not selected
keep their original (fused SDPA) processor.

The denoising loop tells every processor which step it is in through observers:
`observer.on_step(k, t, cfg)` before the UNet call of step k (see sampling.denoise), where cfg
says whether the batch is [uncond; cond] (classifier-free guidance in one call).
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import weakref
from numbers import Integral
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- layer selection
_PATH = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\..*\.(attn1|attn2)$")


_LAYERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # unet -> tuple of paths


def attention_layers(unet) -> list[str]:
    """Module paths of every attention layer of the UNet, in the model's order. Cached per
    UNet: `unet.attn_processors` walks every module, every selection, capture and swap needs
    the paths, and adapters or processors never change which modules are attention layers."""
    paths = _LAYERS.get(unet)
    if paths is None:
        paths = _LAYERS[unet] = tuple(k[: -len(".processor")] for k in unet.attn_processors)
    return list(paths)


def current_processors(unet) -> dict[str, object]:
    """`unet.attn_processors` without the walk over every module: {path + ".processor": the
    processor installed now}, read from each attention module (`Attention.get_processor`)."""
    return {p + ".processor": unet.get_submodule(p).get_processor()
            for p in attention_layers(unet)}


def layer_resolution(unet, path: str, latent_size: int | None = None) -> int:
    """Side length of the latent grid a layer attends over, from the block's place in the UNet
    (down block i works at size / 2^i; up block i mirrors it; the mid block is the smallest)."""
    size = latent_size or unet.config.sample_size
    m = _PATH.match(path)
    if m is None:
        raise ValueError(f"not a UNet attention path: {path!r}")
    n = len(unet.config.down_block_types)
    if m.group(1) == "down_blocks":
        level = int(m.group(2))
    elif m.group(1) == "up_blocks":
        level = n - 1 - int(m.group(2))
    else:
        level = n - 1
    return size // 2 ** level


def select_layers(unet, patterns: str | Sequence[str] = "*", kind: str = "both",
                  resolutions: Sequence[int] | None = None, latent_size: int | None = None) -> list[str]:
    """Paths matching any glob pattern, of `kind` "self" (attn1), "cross" (attn2) or "both",
    at the given latent resolutions (None: all). Raises ValueError when nothing matches."""
    if kind not in ("self", "cross", "both"):
        raise ValueError(f"kind must be 'self', 'cross' or 'both', got {kind!r}")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    all_paths = attention_layers(unet)
    out = []
    for p in all_paths:
        if kind == "self" and not p.endswith("attn1") or kind == "cross" and not p.endswith("attn2"):
            continue
        if not any(fnmatch.fnmatchcase(p, pat) for pat in patterns):
            continue
        if resolutions is not None and layer_resolution(unet, p, latent_size) not in resolutions:
            continue
        out.append(p)
    if not out:
        sizes = sorted({layer_resolution(unet, p, latent_size) for p in all_paths})
        of_kind = [p for p in all_paths if kind == "both" or p.endswith(
            "attn1" if kind == "self" else "attn2")]
        examples = [next(p for p in of_kind if p.startswith(b))  # one per part of the UNet
                    for b in ("down_blocks", "mid_block", "up_blocks")
                    if any(p.startswith(b) for p in of_kind)]
        raise ValueError(
            f"no attention layer matches patterns={patterns} kind={kind!r} "
            f"resolutions={resolutions}. This UNet has {len(all_paths)} attention layers, e.g. "
            f"{examples}, at resolutions {sizes}; fix the pattern (globs over these paths, "
            "e.g. 'up_blocks.*attn1'; see attention_layers(unet)).")
    return out


@contextlib.contextmanager
def processors(unet, replacements: dict[str, object]):
    """Install processors for some layer paths; restore every original processor on exit.

    Each goes in through its module's own `Attention.set_processor`, the call that
    `unet.set_attn_processor({path + ".processor": proc})` makes per layer after walking every
    module of the UNet twice (a Layout-and-Retouch call installs six sets)."""
    original = current_processors(unet)
    missing = [p for p in replacements if p + ".processor" not in original]
    if missing:
        raise ValueError(f"unknown attention layers {missing[:3]}; see attention_layers(unet)")
    done = []  # (module, its original processor)
    try:
        for path, proc in replacements.items():
            module = unet.get_submodule(path)
            module.set_processor(proc)
            done.append((module, original[path + ".processor"]))
        yield
    finally:
        for module, proc in done:
            module.set_processor(proc)


# ----------------------------------------------------------------------------- explicit attention
def attention_input(attn, hidden_states):
    """What a diffusers Attention module's projections read: hidden_states (B, N, C) after the
    module's own group norm, if it has one."""
    if attn.spatial_norm is not None or hidden_states.ndim != 3:
        raise NotImplementedError("only the transformer-block attention of SD UNets is supported")
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def split_heads(attn, x):
    """(B, N, heads * d) -> (B, heads, N, d)."""
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def project_qkv(attn, hidden_states, encoder_hidden_states=None):
    """q, k, v of a diffusers Attention module, shaped (B, heads, N, d). hidden_states: (B, N, C)."""
    hidden_states = attention_input(attn, hidden_states)
    q = attn.to_q(hidden_states)
    ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        ctx = attn.norm_encoder_hidden_states(ctx)
    return (split_heads(attn, q), split_heads(attn, attn.to_k(ctx)),
            split_heads(attn, attn.to_v(ctx)))


def project_kv(attn, x):
    """k, v (B, heads, N, d) of a self-attention layer from its input x (attention_input)."""
    return split_heads(attn, attn.to_k(x)), split_heads(attn, attn.to_v(x))


def output(attn, o, residual):
    """Merge heads and apply the output projection. o: (B, heads, N, d) -> (B, N, C)."""
    b, h, n, d = o.shape
    o = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, n, h * d)))
    if attn.residual_connection:
        o = o + residual
    return o / attn.rescale_output_factor


def attention_probs(attn, q, k):
    """softmax(q k^T * scale) in float32. (B, heads, Nq, Nk)."""
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) * attn.scale, dim=-1)


# ----------------------------------------------------------------------------- capture
@dataclass
class CaptureSpec:
    """What to record: layers (glob patterns over module paths, and/or latent resolutions),
    attention kind ("cross", "self", "both"), steps (None: all), tokens (cross-attention key
    indices, the same for every row, or one list per batch row; None: all), heads ("mean" or
    "all"), whether to keep the unconditional CFG half, and the storage dtype. Maps are stored
    on the CPU.

    offload: when recorded maps move to the CPU. "end" (default): they stay on the model's
    device while the capture runs and move when it ends (one pass, no GPU/CPU synchronisation
    per layer; on a GPU the store's bytes, `estimate`, sit on the GPU until then); "step":
    each map moves as soon as it is recorded (the GPU holds none of the store, at one
    synchronising copy per layer and step). On the CPU both are the same (docs/performance.md,
    "Attention capture")."""
    layers: str | Sequence[str] = "*"
    kind: str = "cross"
    resolutions: Sequence[int] | None = None
    steps: Sequence[int] | None = None
    tokens: Sequence[int] | None = None
    heads: str = "mean"
    keep_uncond: bool = False
    dtype: torch.dtype = torch.float16
    offload: str = "end"

    def __post_init__(self):
        if self.heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', got {self.heads!r}")
        if self.offload not in ("end", "step"):
            raise ValueError(f"offload must be 'end' (maps move to the CPU when the capture "
                             f"ends) or 'step' (as each is recorded), got {self.offload!r}")
        if self.tokens is not None:
            rows = self.tokens if len(self.tokens) and isinstance(self.tokens[0], (list, tuple)) \
                else [self.tokens]
            bad = [i for row in rows for i in row if isinstance(i, bool) or not isinstance(i, Integral)
                   or i < 0]
            if bad or not all(len(r) for r in rows):
                raise ValueError(f"tokens must be non-negative int indices into the prompt's "
                                 f"tokens (or one list per batch row), got {self.tokens!r}")

    def match(self, unet, latent_size: int | None = None) -> list[str]:
        return select_layers(unet, self.layers, self.kind, self.resolutions, latent_size)

    def estimate(self, unet, steps: int, batch: int = 1, latent_size: int | None = None,
                 n_tokens: int | None = None, cfg: bool = True) -> int:
        """Bytes the store will hold after a run of `steps` steps on `batch` images.

        `unet`: the UNet, or a ModelBundle (then its UNet, its latent size and its tokenizer's
        text length). n_tokens: the text length, the keys of cross-attention when the spec
        keeps every token; a UNet alone does not know it: default the bundle's tokenizer
        length, else 77 (CLIP's, Stable Diffusion's; the toy backend's is 16)."""
        if hasattr(unet, "unet") and hasattr(unet, "tokenizer"):  # a ModelBundle
            bundle, unet = unet, unet.unet
            n_tokens = n_tokens or bundle.tokenizer.model_max_length
            latent_size = latent_size or bundle.latent_size
        n_tokens = n_tokens or 77
        n_steps = len([s for s in range(steps) if self.steps is None or s in self.steps])
        rows = batch * (2 if cfg and self.keep_uncond else 1)
        total = 0
        for p in self.match(unet, latent_size):
            hw = layer_resolution(unet, p, latent_size) ** 2
            keys = (_n_selected(self.tokens) or n_tokens) if p.endswith("attn2") else hw
            heads = 1 if self.heads == "mean" else _heads(unet, p)
            total += rows * heads * hw * keys
        return total * n_steps * torch.finfo(self.dtype).bits // 8


def _check_tokens(tokens, n: int) -> None:
    flat = [i for row in tokens for i in row] if isinstance(tokens[0], (list, tuple)) else tokens
    bad = [i for i in flat if not 0 <= i < n]
    if bad:
        raise IndexError(f"token index {bad[0]} is out of range: the prompt has {n} token "
                         f"positions (0..{n - 1}, padding included); find a word's index with "
                         "lr_tutorial.prompts.token_index(tokenizer, prompt, word)")


def _n_selected(tokens) -> int | None:
    if tokens is None:
        return None
    return len(tokens[0]) if len(tokens) and isinstance(tokens[0], (list, tuple)) else len(tokens)


def _heads(unet, path: str) -> int:
    return unet.get_submodule(path).heads


# Observers (attention stores, key/value caches) may share a UNet call with rows that are not
# theirs (the fast engine's inversion riding stage 1's calls): `rows` None = the whole batch, a slice = their rows,
# NO_ROWS = none of this call's rows (they sit the call out).
NO_ROWS = slice(0, 0)


class AttentionStore:
    """Recorded maps: `maps[(layer, step)]` is a (B, HW, K) tensor (heads averaged) or
    (B, heads, HW, K) (heads kept), K = selected tokens (cross) or HW (self)."""

    def __init__(self, spec: CaptureSpec):
        self.spec = spec
        self.maps: dict[tuple[str, int], torch.Tensor] = {}
        self.step: int | None = None
        self.cfg = False
        self.rows: slice | None = None  # this store's rows of the batch (None: all)
        self._index: dict = {}  # (device, B, heads, HW) -> gather index of per-row tokens

    def on_step(self, k: int, t: int | None = None, cfg: bool = False) -> None:
        self.step, self.cfg = k, cfg

    def wants(self) -> bool:
        if self.rows == NO_ROWS:  # not this store's call (it need not know the step)
            return False
        if self.step is None:
            raise RuntimeError("the attention store does not know the step: pass it to the "
                               "sampler (observers=[store]) or call store.on_step(k) yourself")
        return self.spec.steps is None or self.step in self.spec.steps

    def add(self, layer: str, probs: torch.Tensor) -> None:
        """probs: (B, heads, HW, K) float."""
        if self.rows is not None:
            probs = probs[self.rows]
        if self.cfg and not self.spec.keep_uncond:
            probs = probs[probs.shape[0] // 2:]
        tokens = self.spec.tokens
        if tokens is not None and layer.endswith("attn2"):
            _check_tokens(tokens, probs.shape[-1])
            if len(tokens) and isinstance(tokens[0], (list, tuple)):  # one list per row
                if len(tokens) != probs.shape[0]:
                    raise ValueError(f"spec.tokens has {len(tokens)} rows, the batch {probs.shape[0]}")
                probs = probs.gather(-1, self._token_index(probs))
            else:
                probs = probs[..., list(tokens)]
        if self.spec.heads == "mean":
            probs = probs.mean(1)
        # copy=True: a compact copy even when no conversion is needed (CPU, float32), so the
        # store never keeps a slice's whole parent (both CFG halves, all tokens) alive
        where = "cpu" if self.spec.offload == "step" else probs.device
        self.maps[(layer, self.step)] = probs.detach().to(where, self.spec.dtype, copy=True)

    def _token_index(self, probs: torch.Tensor) -> torch.Tensor:
        """gather's index of spec.tokens' per-row lists, (B, heads, HW, K), made once per device
        and shape: building it from the lists each call would copy it to the GPU and wait for
        the GPU's queue, once per captured layer and step."""
        b, h, hw, _ = probs.shape
        key = (probs.device, b, h, hw)
        if key not in self._index:
            idx = torch.tensor(self.spec.tokens, device=probs.device)  # (B, K)
            self._index[key] = idx[:, None, None, :].expand(-1, h, hw, -1)
        return self._index[key]

    def to_cpu(self) -> None:
        """Move every map to the CPU (capture() calls this when it ends; spec.offload)."""
        for key, m in self.maps.items():
            if m.device.type != "cpu":
                self.maps[key] = m.to("cpu")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.maps.values())

    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.maps))

    def steps(self) -> list[int]:
        return sorted({s for _, s in self.maps})

    def cross_map(self, token: int, size: int, steps: Sequence[int] | None = None,
                  layers: Sequence[str] | None = None) -> torch.Tensor:
        """Mean cross-attention map of one token (an index into the prompt's tokens, or into
        spec.tokens when the spec selected tokens) over steps and layers, each map resized to
        size x size: (B, size, size) float32."""
        keys = [(layer, s) for (layer, s) in self.maps if layer.endswith("attn2")
                and (steps is None or s in steps) and (layers is None or layer in layers)]
        if not keys:
            raise ValueError("no cross-attention maps stored for these steps/layers; "
                             f"stored steps {self.steps()}, layers {self.layers()[:3]}...")
        acc = 0
        for key in keys:
            m = self.maps[key].float()
            m = m.mean(1) if m.ndim == 4 else m  # heads
            if not 0 <= token < m.shape[-1]:
                raise IndexError(f"token index {token} out of range: the stored maps hold "
                                 f"{m.shape[-1]} tokens (0..{m.shape[-1] - 1}); with spec.tokens "
                                 "set, index into that list, else find the index with "
                                 "lr_tutorial.prompts.token_index(tokenizer, prompt, word)")
            side = int(math.isqrt(m.shape[1]))
            m = m[..., token].view(-1, 1, side, side)
            acc = acc + F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        return (acc / len(keys))[:, 0]


class CaptureProcessor:
    """Records attention probabilities of one layer into every store that wants the current
    step, then computes the layer's output explicitly. When no store wants the step, the call
    goes through the layer's original (fused) processor. Nested captures share one processor."""

    def __init__(self, stores: list[AttentionStore], path: str, original):
        self.stores, self.path, self.original = stores, path, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        active = [s for s in self.stores if s.wants()]
        if not active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("attention capture with an attention mask")
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)
        probs = attention_probs(attn, q, k)  # (B, heads, HW, K)
        for store in active:
            store.add(self.path, probs)
        return output(attn, (probs @ v.float()).to(q.dtype), hidden_states)


def unets_of(unet) -> list:
    """A UNet, or several (a ModelBundle's `unets`: the vanilla UNet and a full DreamBooth UNet),
    as a list of distinct modules."""
    many = list(unet) if isinstance(unet, (list, tuple)) else [unet]
    return list({id(u): u for u in many}.values())


@contextlib.contextmanager
def capture(unet, spec: CaptureSpec, latent_size: int | None = None):
    """`with capture(unet, spec) as store:` records attention for the layers `spec` selects.
    `unet` may be a list of UNets of one architecture (`bundle.unets`: with a full DreamBooth
    UNet, the vanilla steps and the personalized steps run different modules); all of them
    record into the one store. Captures nest (each store gets what its own spec asks for); a
    self-attention layer that a swap is running on cannot be captured (the capture would bypass
    the swap)."""
    store = AttentionStore(spec)
    try:
        with contextlib.ExitStack() as stack:
            for u in unets_of(unet):
                stack.enter_context(processors(u, _capture_processors(u, spec, store, latent_size)))
            yield store
    finally:
        store.to_cpu()


def _capture_processors(unet, spec: CaptureSpec, store: AttentionStore, latent_size) -> dict:
    current = current_processors(unet)
    procs = {}
    for p in spec.match(unet, latent_size):
        cur = current[p + ".processor"]
        if getattr(cur, "swaps_attention", False):
            raise ValueError(f"{p} runs the attention swap; capture cross-attention (attn2) "
                             "there, or capture self-attention without the swap")
        if isinstance(cur, CaptureProcessor):
            procs[p] = CaptureProcessor(cur.stores + [store], p, cur.original)
        else:
            procs[p] = CaptureProcessor([store], p, cur)
    return procs
