"""Peak accelerator memory of a Layout-and-Retouch run, estimated before it starts.

An out-of-memory crash on a Colab T4 after ten minutes teaches nothing; a warning before the
first step that names what takes the memory and what to change does. `check()` is called by
LayoutAndRetouch before every run on a GPU; on a CPU it does nothing (no free-memory figure).

The estimate is a model of the run, not a measurement (rough, meant to be within a factor of
about two; the safety factor covers allocator overhead):

    peak = weights on the device + max(UNet call of stage 2, VAE decode)
    UNet call  = rows x (skip connections + largest transformer working set) x 2 (safety)
                 + explicit attention of the largest captured layer
                 + the caller's capture store while it runs (CaptureSpec.offload="end")
                 (rows = (2 x batch + 1) x 2 for the three-branch batch [reference (1);
                 context; target] under classifier-free guidance, batch x 2 when cached)
    explicit attention (captured layers run without fused SDPA) = 2 x rows x heads x HW x K x 4 B
    VAE decode = batch x 6 x the largest decoder activation (channels x pixels) x bytes

Every term is reported, so the options in the warning come with the amount they save.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import attention
from .config import LRConfig, SwapConfig, resolve_guidance
from .swap import SwapController

GiB = 1024 ** 3
SAFETY = 2.0  # allocator caching, fragmentation, short-lived temporaries


class MemoryWarning(ResourceWarning):
    """The run is estimated not to fit in the device's free memory."""


@dataclass
class MemoryEstimate:
    """Bytes, by what holds them. `captured` names the layers computed with explicit attention
    (the most expensive first); `weights_by_model` splits `weights`."""
    weights: int
    unet_activations: int
    attention: int
    vae_decode: int
    rows: int
    captured: list[str] = field(default_factory=list)
    weights_by_model: dict[str, int] = field(default_factory=dict)
    user_layers: list[str] = field(default_factory=list)  # captured for the caller's spec
    stored: int = 0  # the caller's capture store, held on the device until the capture ends
    kv_caches: int = 0  # the cached stage 2's keys/values, on the device (kv_device="model")

    @property
    def total(self) -> int:
        return self.weights + self.kv_caches + max(
            self.unet_activations + self.attention + self.stored, self.vae_decode)

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        return (f"about {g(self.total)} at the peak: weights {g(self.weights)}, UNet activations "
                f"{g(self.unet_activations)} ({self.rows} rows per UNet call), explicit attention "
                f"{g(self.attention)} ({len(self.captured)} captured layers), "
                + (f"capture store {g(self.stored)}, " if self.stored else "")
                + (f"key/value caches {g(self.kv_caches)}, " if self.kv_caches else "")
                + f"VAE decode {g(self.vae_decode)}")


def _nbytes(module, device_type: str | None) -> int:
    if module is None:
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors
               if device_type is None or t.device.type == device_type)


def free_memory(device) -> int | None:
    """Free bytes on a CUDA device; None where that is unknown (CPU, MPS)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _captured_layers(bundle, config, capture) -> tuple[list[str], list[str]]:
    """(every layer run with explicit attention in stage 2, those of the caller's spec)."""
    user = capture.match(bundle.unet, bundle.latent_size) if capture is not None else []
    layers = list(config.mask.layers(bundle.unet, bundle.latent_size)) + user
    return list(dict.fromkeys(layers)), user


def attention_bytes(bundle, path: str, rows: int) -> int:
    """Transient bytes of one layer run with explicit attention: logits and probabilities in
    float32, (rows, heads, HW, K) each."""
    from .attention import layer_resolution
    hw = layer_resolution(bundle.unet, path, bundle.latent_size) ** 2
    keys = bundle.tokenizer.model_max_length if path.endswith("attn2") else hw
    heads = bundle.unet.get_submodule(path).heads
    return 2 * rows * heads * hw * keys * 4


def estimate(bundle, config=None, batch: int = 1, capture=None, stage2: str = "batched",
             ) -> MemoryEstimate:
    """The peak memory of `LayoutAndRetouch(bundle, config)(prompts, capture=capture)` on
    `batch` prompts, on the device the UNet is on (see the module docstring). stage2: the
    path stage 2 takes (LayoutAndRetouch.stage2_path): "batched" runs 2 x batch + 1 rows per
    CFG half, "cached" the batch's target rows (its key/value caches live in host memory on a
    GPU machine, so they are not part of the device's peak, unless config.kv_device="model")."""
    config = config or LRConfig()
    device_type = bundle.device.type
    models = {"unet": bundle._vanilla_unet, "personal_unet": bundle.personal_unet,
              "text_encoder": bundle.text_encoder, "vae": bundle.vae}
    by_model = {k: _nbytes(m, device_type) for k, m in models.items() if m is not None}
    el = torch.finfo(bundle.dtype).bits // 8
    if stage2 not in ("batched", "cached"):
        raise ValueError(f"stage2 must be 'batched' or 'cached', got {stage2!r}")
    branch_rows = 2 * batch + 1 if stage2 == "batched" else batch
    cfg_on = resolve_guidance(bundle, config.layout.guidance) != 1.0
    rows = branch_rows * (2 if cfg_on else 1)

    cfg = bundle.unet.config
    s, chans, lpb = bundle.latent_size, list(cfg.block_out_channels), cfg.layers_per_block
    lpb = lpb if isinstance(lpb, int) else max(lpb)
    skips = sum((lpb + 1) * c * (s // 2 ** i) ** 2 for i, c in enumerate(chans))
    working = max(14 * c * (s // 2 ** i) ** 2 for i, c in enumerate(chans))  # GEGLU FF: 8C
    unet_act = int(SAFETY * rows * (skips + working) * el)

    captured, user = _captured_layers(bundle, config, capture)
    per_layer = {p: attention_bytes(bundle, p, rows) for p in captured}
    captured.sort(key=per_layer.get, reverse=True)
    attn = max(per_layer.values(), default=0)
    stored = 0  # stage 2's capture records every branch (batched rows) until the capture ends
    if capture is not None and capture.offload == "end" and device_type != "cpu":
        stored = capture.estimate(bundle, config.layout.steps, batch=2 * batch + 1,
                                  cfg=cfg_on)

    kv = 0
    if stage2 == "cached" and config.kv_device == "model" and device_type != "cpu":
        kv = kv_bytes(bundle, config, batch)  # the caches on the GPU: exact bytes

    vcfg = bundle.vae.config
    vch = list(reversed(vcfg.block_out_channels))
    n = len(vch)
    sizes = [vch[i] * (s * 2 ** min(i + 1, n - 1)) ** 2 for i in range(n)]
    vae_el = torch.finfo(bundle.vae.dtype).bits // 8
    vae = batch * 6 * max(sizes) * vae_el if bundle.vae.device.type == device_type else 0
    return MemoryEstimate(sum(by_model.values()), unet_act, attn, int(vae), rows, captured,
                          by_model, user, stored, kv)


# ----------------------------------------------------------------------------- key/value caches
def cache_bytes(unet, layers: Sequence[str], steps: Sequence[int], rows: int,
                latent_size: int | None = None, dtype: torch.dtype = torch.float32,
                store: str = "kv") -> int:
    """Bytes a KVCache of `layers` x `steps` holds for `rows` batch rows, before recording:

        sum over layers of rows x HW x width x element size, x steps
        width: 2 x the inner dim (K and V; store="kv") or the input's channels (store="hidden")

    Exact (a test compares it with KVCache.nbytes). Stable Diffusion 1.5 at 512 px, the
    default retouch layers (9 decoder layers), fp16, store="kv": 27.5 MB per row and step, so
    the context's cache of one image (2 rows under CFG, 40 steps) holds 2.2 GB; "hidden" half."""
    def width(p):
        m = unet.get_submodule(p)
        return m.to_k.in_features if store == "hidden" else 2 * m.to_k.out_features
    per_row = sum(attention.layer_resolution(unet, p, latent_size) ** 2 * width(p) for p in layers)
    return rows * per_row * len(list(steps)) * (torch.finfo(dtype).bits // 8)


def kv_plan(bundle, swap_cfg: SwapConfig, steps: int, start_step: int
            ) -> tuple[list[str], list[int]]:
    """(self-attention layers, steps) whose context keys and values the target reads when it
    runs from `start_step`: the retouch layers from lambda2 on, and the structure layers before
    it (the reference's: reference_plan)."""
    ctl = SwapController(bundle.unet, swap_cfg, steps, bundle.latent_size)
    if swap_cfg.mode == "none":
        return [], []
    layers = ctl.retouch | (ctl.structure if start_step < ctl.lambda2 else set())
    return sorted(layers), list(range(start_step, steps))


def reference_plan(bundle, swap_cfg: SwapConfig, steps: int, start_step: int
                   ) -> tuple[list[str], list[int]]:
    """(self-attention layers, steps) whose reference keys/values the target reads when it runs
    from `start_step`: the retouch layers from max(start_step, lambda2) on, in modes "multi"
    and "reference"; none in "context" and "none" (the structure phase reads the context)."""
    ctl = SwapController(bundle.unet, swap_cfg, steps, bundle.latent_size)
    if swap_cfg.mode not in ("multi", "reference"):
        return [], []
    return sorted(ctl.retouch), list(range(max(start_step, ctl.lambda2), steps))


def kv_bytes(bundle, config, batch: int, store: str | None = None, dtype=None) -> int:
    """Bytes of the key/value caches the cached stage 2 adds for `batch` prompts under
    `config` (an LRConfig): the context's (2 rows per prompt under CFG) and the reference's
    (one row, once per reference: its inversion's own UNet call), as `store` holds them (None:
    config.kv_store, "kv" for "auto"), in `dtype` (None: config.kv_dtype, else the model's)."""
    config = dataclasses.replace(config, layout=config.layout.resolved(bundle))  # lambda1 None
    n = config.layout.steps
    start = config.target_start()
    store = store or (config.kv_store if config.kv_store != "auto" else "kv")
    dtype = dtype or (getattr(torch, config.kv_dtype) if config.kv_dtype else bundle.dtype)
    layers, steps = kv_plan(bundle, config.swap, n, start)
    ref_layers, ref_steps = reference_plan(bundle, config.swap, n, start)
    halves = 2 if resolve_guidance(bundle, config.layout.guidance) != 1.0 else 1
    size = bundle.latent_size
    return (cache_bytes(bundle.unet, layers, steps, halves * batch, size, dtype, store)
            + cache_bytes(bundle.unet, ref_layers, ref_steps, 1, size, dtype, store))


def options(est: MemoryEstimate, bundle, batch: int) -> list[str]:
    """Concrete ways to fit, each with what it saves (largest first)."""
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    out = []
    if est.captured and est.captured[0] in est.user_layers:
        out.append((est.attention, f"capture fewer or smaller layers: the largest captured "
                    f"layer ({est.captured[0]}) alone takes {g(est.attention)} while it runs "
                    "without fused attention; capture cross-attention (kind='cross') or lower "
                    "resolutions (CaptureSpec(resolutions=[16]))"))
    if est.kv_caches:
        out.append((est.kv_caches, "keep the key/value caches in host memory: "
                    "LRConfig(kv_device='host'), the default (copied on a side stream; about as "
                    "fast once the reference is cached), or LRConfig(stage2='batched')"))
    if est.stored:
        out.append((est.stored, "keep the capture store on the CPU while it records: "
                    "CaptureSpec(offload='step') (slower: one synchronising copy per layer)"))
    if bundle.dtype == torch.float32:
        out.append(((est.weights + est.unet_activations + est.attention) // 2,
                    "half precision: load_models('sd', ..., dtype=torch.float16) halves weights "
                    "and activations"))
    if batch > 1:
        share = (batch - 1) * max(est.unet_activations + est.attention, est.vae_decode) // batch
        out.append((share, f"fewer prompts per call: {batch} -> 1 (loop over them)"))
    off = est.weights_by_model.get("vae", 0) + est.weights_by_model.get("text_encoder", 0)
    if off or est.vae_decode:
        out.append((off + max(0, est.vae_decode - est.unet_activations - est.attention),
                    "CPU offload of the small models: bundle.vae.to('cpu', torch.float32); "
                    "bundle.text_encoder.to('cpu') (slower decoding)"))
    if est.weights_by_model.get("personal_unet"):
        out.append((est.weights_by_model["personal_unet"],
                    "a LoRA instead of a full DreamBooth UNet: one UNet shared by both models"))
    out.sort(key=lambda t: -t[0])
    return [f"{text} (saves about {g(saved)})" for saved, text in out]


def check(bundle, config=None, batch: int = 1, capture=None, free_bytes: int | None = None,
          stage2: str = "batched") -> MemoryEstimate | None:
    """Estimate the run's peak and warn (MemoryWarning) with concrete options when it exceeds
    the free memory. `free_bytes` None: ask the device (returns None without a check on a CPU)."""
    if free_bytes is None:
        free_bytes = free_memory(bundle.device)
        if free_bytes is None:
            return None
    est = estimate(bundle, config, batch, capture, stage2)
    if est.total > free_bytes:
        opts = "\n".join(f"  - {o}" for o in options(est, bundle, batch))
        warnings.warn(MemoryWarning(
            f"this run is estimated to need {est.summary()}, but only {free_bytes / GiB:.2f} GiB "
            f"is free on {bundle.device}: it will probably run out of memory. Options:\n{opts}"),
            stacklevel=2)
    return est
