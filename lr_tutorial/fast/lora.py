"""ModelBundle's speed work on the LoRA and the CPU (fast engine's pieces, usable with either
engine): the kept merge (set_fuse_lora: the LoRA merged into the weights while personalized),
per-row LoRA (personal_rows: one UNet call running some rows personalized, the reference
inversion riding stage 1's vanilla calls) and the CPU's oneDNN switch (set_unet_onednn).
ModelBundle's methods of the same names call these. Each is tested equal to the plain path
within float rounding (tests/test_sd_loading.py, tests/test_fast.py, tests/test_toy_models.py).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def plain_lora(layer, adapter: str) -> bool:
    """Whether a peft layer applies `adapter` as plain LoRA, W x + B A x * scaling (or not at
    all): no variant (DoRA and the like), an A and a B module (Linear and Conv layers)."""
    if adapter not in getattr(layer, "lora_A", {}):
        return not hasattr(layer, "lora_embedding_A") or adapter not in layer.lora_embedding_A
    variants = getattr(layer, "lora_variant", {}) or {}
    return adapter not in variants and not getattr(layer, "use_dora", {}).get(adapter, False)


class _Fused:
    """One peft layer's base weight W and its merge W + s B A (peft's `merge`, run once), with
    the tensor version counters they were made from, so a later change to the LoRA's weights,
    its scaling, or W itself (training, a reload) is noticed and the merge redone."""

    def __init__(self, layer, weight, saved, merged, adapter):
        self.layer, self.weight, self.saved, self.merged = layer, weight, saved, merged
        self.adapter = adapter
        self.params = [p for name, p in layer.named_parameters()  # the adapter's A, B, ...
                       if f".{adapter}." in f".{name}."]
        self.state = self._state()  # as of W's last restore

    @classmethod
    def of(cls, layer, weight, adapter: str) -> "_Fused":
        saved = weight.detach().clone()
        layer.merge(adapter_names=[adapter])  # peft: W += s B A (any LoRA variant)
        merged = weight.detach().clone()
        layer.unmerge()
        weight.copy_(saved)  # unmerge leaves float rounding: W back bit for bit
        return cls(layer, weight, saved, merged, adapter)

    def _state(self) -> tuple:
        """What W and the LoRA are now: autograd's version counters (bumped by every write),
        storage, dtype and device, and the scaling."""
        w = self.weight
        return (w._version, w.data_ptr(), w.dtype, w.device,
                repr(self.layer.scaling.get(self.adapter)),
                tuple((p.data_ptr(), p._version) for p in self.params))

    def current(self, layer, weight, adapter: str) -> bool:
        return layer is self.layer and weight is self.weight and adapter == self.adapter \
            and self._state() == self.state

    def restore(self) -> None:
        self.weight.copy_(self.saved)
        self.state = self._state()


_ONEDNN_SAVED: list = []  # (module, its caller's torch.backends.mkldnn.enabled), innermost last


def _onednn_pre_hook(min_rows: int | None):
    """ModelBundle.set_unet_onednn's forward pre-hook: oneDNN off for a UNet call of fewer than
    `min_rows` rows (None: every call), the caller's setting saved for _onednn_restore."""
    def hook(module, args, kwargs) -> None:
        _ONEDNN_SAVED.append((module, torch.backends.mkldnn.enabled))
        sample = args[0] if args else kwargs.get("sample")
        if min_rows is None or not torch.is_tensor(sample) or sample.shape[0] < min_rows:
            torch.backends.mkldnn.enabled = False
    return hook


def _onednn_restore(module, args, out) -> None:  # forward hook, run after an exception too
    if _ONEDNN_SAVED and _ONEDNN_SAVED[-1][0] is module:  # not if another pre-hook failed first
        torch.backends.mkldnn.enabled = _ONEDNN_SAVED.pop()[1]


# The LoRA merged into the weights while personalized (fuse_lora): the base layer's weight
# holds W + s B A with the adapter off; switching to vanilla copies W back bit for bit, so
# vanilla outputs never drift. Both are computed once per layer (peft's own merge) and
# kept, so a switch is one copy per layer (a vanilla -> personalized -> vanilla round trip
# on the toy UNet: 7.7 ms, against 80.8 ms recomputing the merge).
@torch.no_grad()
def merge(bundle) -> None:
    """Write W + s B A into every LoRA layer's base weight (the kept merges)."""
    for layer in bundle._lora_layers[1]:
        layer.get_base_layer().weight.copy_(fused_of(bundle, layer).merged)
    bundle._holds_merged = True


def fused_of(bundle, layer) -> _Fused:
    """The layer's kept _Fused, made (again) where missing or out of date."""
    weight = layer.get_base_layer().weight
    fused = bundle._fused.get(id(layer))
    if fused is None or not fused.current(layer, weight, bundle.adapter_name):
        bundle._fused[id(layer)] = fused = _Fused.of(layer, weight, bundle.adapter_name)
    return fused


@torch.no_grad()
def unmerge(bundle) -> None:
    """W back in every merged layer, bit for bit."""
    if bundle._holds_merged:
        for fused in bundle._fused.values():
            fused.restore()
        bundle._holds_merged = False


def forget_merge(bundle) -> None:
    """W back in the weights, and the kept merges dropped."""
    unmerge(bundle)
    bundle._fused.clear()


def set_fuse_lora(bundle, fuse: bool) -> None:
    """ModelBundle.set_fuse_lora: merge the LoRA into the UNet's weights whenever the bundle is
    personalized (off by default). Inference only: an unmerged LoRA layer runs three ops (base, A, B) where a
    merged one runs one, which is most of the cost of a personalized step on the toy UNet
    (bench/pipeline.py --fuse-lora). Switching to vanilla copies the saved base weights
    back exactly, so the vanilla model is bit-for-bit unchanged; personalized outputs
    differ from the unmerged LoRA's by float rounding only. Memory: two copies of every
    adapted base weight (W, and W + s B A) while fuse_lora is on; a change to the LoRA's
    or the base's weights is noticed at the next switch and merged afresh.
    personalize.dreambooth_lora turns it off to train."""
    bundle.fuse_lora = bool(fuse)
    if bundle.personalization == "lora" and bundle.mode == "personalized":
        bundle._lora_switch(True)
    if not bundle.fuse_lora:
        forget_merge(bundle)


def set_unet_onednn(bundle, enabled: bool, min_rows: int = 1) -> None:
    """ModelBundle.set_unet_onednn: whether the UNets' convolutions on a CPU use oneDNN
    (torch.backends.mkldnn.enabled, on by default in torch): never (enabled False), or in UNet calls of at least `min_rows`
    rows (the batch of `sample`; 1: every call, torch's default). Where it is off for a
    call, each UNet forward (of `bundle.unets` as of this call) turns the flag off on entry
    and puts it back on exit, also after an exception (two module hooks); everything else,
    the VAE included, keeps the process's setting. GPU convolutions never use oneDNN, so
    this changes CPU runs only.

    oneDNN reorders a convolution's weights into its own layout on every call, a fixed cost
    that only large convolutions pay back. The toy UNet's smallest convolution takes
    0.16-0.20 ms with it and 0.04 ms without, and its forward of 2-3 rows (one image)
    0.74-0.90x the time without it; but at 17 rows (8 images and the riding reference row)
    1.53x, so the toy loader keeps oneDNN for calls of TOY_ONEDNN_MIN_ROWS rows or more.
    The toy VAE (64 x 64 images) is 1.5-2.1x slower without it, and so is Stable
    Diffusion's UNet at 512 px (1.11x; at 128 px it is faster without, 0.60x). Results
    differ from oneDNN's by float rounding only.
    Not thread-safe: the flag is the process's, so do not run another CPU model in a
    second thread during a UNet forward.
    """
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows must be an int >= 1 (1: oneDNN in every UNet call), got "
                         f"{min_rows!r}")
    for handle in bundle._onednn_hooks:
        handle.remove()
    bundle._onednn_hooks = []
    bundle.unet_onednn, bundle.unet_onednn_min_rows = bool(enabled), min_rows
    if not bundle.unet_onednn or min_rows > 1:
        pre = _onednn_pre_hook(min_rows if bundle.unet_onednn else None)
        for unet in bundle.unets:
            bundle._onednn_hooks += [
                unet.register_forward_pre_hook(pre, with_kwargs=True),
                unet.register_forward_hook(_onednn_restore, always_call=True)]


@contextlib.contextmanager
def personal_rows(bundle, start: int, merged: bool | None = None):
    """ModelBundle.personal_rows: `with bundle.personal_rows(n):` in vanilla mode, the UNet calls in the block run the
    personalized model on their rows from `start` on and the vanilla one on the others (the
    reference inversion riding stage 1's vanilla steps, riding.denoise_riding).

    LoRA: a forward hook on every LoRA layer gives those rows the personalized output while
    the adapter stays off for the others (the base weights are never merged in vanilla mode).
    `merged` (None: when fuse_lora is on): the hook recomputes the rows with the layer's
    merged weight W + s B A, out[start:] = W' x[start:] + b, the op the merged personalized
    model runs (the same bits), from the merges fuse_lora keeps anyway; else it adds the
    adapter's update, out[start:] += B(A(x[start:])) * scaling, the formula of peft's own
    LoRA forward. The merged hook is one op per layer where the update is two modules and a
    scale (toy UNet, one image's vanilla call with the riding row: 78.4 ms instead of 88.3
    ms). peft's mixed-batch inference (`adapter_names`) does the update with a row index
    per layer, slower here (277.3 against 249.9 ms per 17-row toy call). Textual inversion
    and none: nothing to do (the rows' prompt embeddings already differ). The hooks are removed on exit, also after an exception."""
    if bundle.mode != "vanilla":
        raise RuntimeError(f"personal_rows mixes personalized rows into vanilla UNet calls, "
                           f"but the bundle is {bundle.mode}: enter it inside "
                           "bundle.using('vanilla')")
    if not bundle.mixes_rows:
        raise ValueError(f"this {bundle.personalization} bundle cannot run personalized and "
                         "vanilla rows in one UNet call (its personalized model is another "
                         "UNet, or a LoRA variant): run the personalized rows in calls of "
                         "their own")
    if bundle.personalization != "lora":
        yield bundle
        return
    name = bundle.adapter_name
    weights = merged_weights(bundle) if (bundle.fuse_lora if merged is None else merged) else {}

    def add_lora(layer, args, kwargs, out):  # (rows, ...): rows start.. get the LoRA
        if name not in layer.lora_A:
            return out
        x = (args[0] if args else kwargs["x"])[start:]
        w = weights.get(id(layer))
        if w is not None:  # the merged layer's op on those rows: W' x + b
            base = layer.get_base_layer()
            out[start:] = (F.linear(x, w, base.bias) if isinstance(base, torch.nn.Linear)
                           else F.conv2d(x, w, base.bias, base.stride, base.padding,
                                         base.dilation, base.groups))
            return out
        a = layer.lora_A[name]
        x = layer.lora_dropout[name](x.to(a.weight.dtype))
        out[start:] += (layer.lora_B[name](a(x)) * layer.scaling[name]).to(out.dtype)
        return out
    handles = []
    try:
        for layer in bundle._peft_layers():
            handles.append(layer.register_forward_hook(add_lora, with_kwargs=True))
        yield bundle
    finally:
        for handle in handles:
            handle.remove()
        if not bundle.fuse_lora:  # merged=True without fuse_lora: keep no merges after
            bundle._fused.clear()


@torch.no_grad()
def merged_weights(bundle) -> dict:
    """{id(layer): W + s B A} of every plain Linear / zero-padded Conv2d LoRA layer, the
    merges fuse_lora keeps (_Fused: computed here where missing or out of date); other
    layers (LoRA variants, other kinds) are left out and take the B A x update."""
    out = {}
    for layer in bundle._peft_layers():
        base = layer.get_base_layer()
        if not (type(base) is torch.nn.Linear or (type(base) is torch.nn.Conv2d
                                                   and base.padding_mode == "zeros")) \
                or not plain_lora(layer, bundle.adapter_name) \
                or bundle.adapter_name not in layer.lora_A:
            continue
        out[id(layer)] = fused_of(bundle, layer).merged
    return out
