"""ModelBundle: the five Stable Diffusion components plus a vanilla/personalized switch.

    bundle = load_models("toy")                  # ShapeWorld models shipped in data/toy (models.py)
    with bundle.using("vanilla"): ...            # eps   (base model)
    with bundle.using("personalized"): ...       # eps*  (LoRA on, or the DreamBooth UNet)

LoRA personalization shares one UNet between the two modes (adapter off/on: half the memory of
two UNets, docs/method.md "Stage 1"); a full DreamBooth fine-tune holds two UNets and swaps them;
textual inversion keeps one UNet and only the prompt changes (mode "personalized" is then a no-op).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch


MODES = ("vanilla", "personalized")


@dataclass
class ModelBundle:
    """tokenizer, text_encoder, vae, unet, scheduler, and how to switch eps <-> eps*.

    `personalization` is "lora" (adapter `adapter_name` on `unet`), "dreambooth"
    (`personal_unet` is a second UNet), "textual_inversion" or "none".
    """
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    backend: str = "toy"
    identifier: str | None = None  # e.g. "sks"
    class_noun: str | None = None  # e.g. "dog"
    personalization: str = "none"
    adapter_name: str = "personal"
    personal_unet: torch.nn.Module | None = None
    mode: str = field(default="vanilla")
    # (token id, (D,) learned input embedding of the identifier): written into the text encoder
    # in personalized mode only (DreamBoothConfig.identifier_lr); None when not learned
    identifier_embedding: tuple | None = None
    source: dict = field(default_factory=dict)  # where the weights came from (recorded in Results)
    # the backend's classifier-free guidance weight, used wherever a guidance is left None:
    # Stable Diffusion's usual 7.5; the toy's TOY_GUIDANCE
    guidance: float = 7.5
    # the backend's default hand-over lambda1 of stage 1, used wherever LayoutConfig.lambda1 is
    # left None: where its vanilla model has fixed the layout. Stable Diffusion: 0.2 N
    # (docs/method.md "Stage 1"); the toy backend sets its own (models.TOY_LAMBDA1)
    lambda1: float = 0.2
    # whether the UNets' convolutions on a CPU go through oneDNN (torch.backends.mkldnn, torch's
    # default), and in UNet calls of at least how many rows; set_unet_onednn. The toy loader
    # keeps it for calls of TOY_ONEDNN_MIN_ROWS rows or more: its layers are too small for it
    # in smaller calls
    unet_onednn: bool = True
    unet_onednn_min_rows: int = 1

    def __post_init__(self):
        self._vanilla_unet = self.unet
        self._base_identifier_row = None
        self._lora_layers = None  # (key, peft layers) cached by _lora_switch
        self._fused: dict = {}  # id(layer) -> _Fused: its W and W + s B A (fuse_lora)
        self._holds_merged = False  # whether the base weights hold W + s B A now
        self.fuse_lora = False  # set_fuse_lora
        self._onednn_hooks: list = []  # set_unet_onednn's hook handles
        if self.personal_unet is not None:
            check_same_architecture(self.unet.config, self.personal_unet.config, "personal_unet")
        self._apply(self.mode)
        self.set_unet_onednn(self.unet_onednn, self.unet_onednn_min_rows)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype, read from its first weight (diffusers' `unet.dtype` looks at
        every parameter: 17 ms a call on the toy UNet with a LoRA, and the samplers ask often)."""
        return next(self.unet.parameters()).dtype

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def image_size(self) -> int:
        return self.latent_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def has_personal(self) -> bool:
        return self.personalization != "none"

    @property
    def unets(self) -> list:
        """Every UNet a run may call: the vanilla UNet, and a full DreamBooth UNet if there is one
        (a LoRA lives inside the vanilla UNet). Install attention processors on all of them
        (`attention.capture(bundle.unets, ...)`): `bundle.unet` is only the current mode's."""
        return [self._vanilla_unet] + ([self.personal_unet] if self.personal_unet is not None
                                       else [])

    @property
    def mixes_rows(self) -> bool:
        """Whether one UNet call can run its last rows with the personalized model while the
        bundle is vanilla (`personal_rows`): with a plain LoRA, textual inversion or none (one
        UNet: the modes differ in the prompt's embedding only); not with a full DreamBooth
        fine-tune, whose personalized model is another module, nor with a LoRA variant such as
        DoRA, whose update is not B A x."""
        if self.personalization == "lora":
            from .fast.lora import plain_lora  # speed work lives in fast/, loaded on use
            return all(plain_lora(layer, self.adapter_name) for layer in self._peft_layers())
        return self.personalization in ("textual_inversion", "none")

    @property
    def personal_mode(self) -> str:
        """The mode that draws the subject: "personalized", or "vanilla" for a bundle without a
        personalized model (`with bundle.using(bundle.personal_mode):`)."""
        return "personalized" if self.has_personal else "vanilla"

    # ------------------------------------------------------------------ switching
    def _apply(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "personalized" and not self.has_personal:
            raise ValueError("this bundle has no personalized model: load one with "
                             "load_models(..., personalized=PATH) or personalize.dreambooth_lora()")
        if self.personalization == "lora":
            self._lora_switch(mode == "personalized")
        elif self.personalization == "dreambooth":
            if self.personal_unet is None:
                raise ValueError("personalization='dreambooth' needs personal_unet=<the "
                                 "fine-tuned UNet>; or load it with load_models('sd', "
                                 "personalized=FOLDER)")
            self.unet = self.personal_unet if mode == "personalized" else self._vanilla_unet
        if self.identifier_embedding is not None:
            row, learned = self.identifier_embedding
            weight = self.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[row] = (learned if mode == "personalized" else self._base_identifier_row).to(weight)
        self.mode = mode

    def _lora_switch(self, on: bool) -> None:
        """Turn the LoRA adapter on or off. The first switch per (UNet, adapter) goes through
        diffusers' `enable_adapters` + `set_adapters` / `disable_adapters`, which walk every
        module (about 28 ms each on the toy UNet; a Layout-and-Retouch call switches ten
        times, in five `using` blocks). It keeps the peft layers they touched; later switches
        call each layer's own `enable_adapters(on)`, which is what diffusers does per layer,
        minus the walk, and only where the layer is not in that state already. Code that adds
        or removes adapters sets `_lora_layers = None` (attach_lora, personalize). With
        fuse_lora the adapter stays off in both modes and personalized mode writes the merged
        weights in (fast/lora.py)."""
        key = (id(self.unet), self.adapter_name)
        if self._holds_merged:  # fuse_lora's merge (fast/lora.py) leaves the weights first
            from .fast import lora
            lora.unmerge(self)
        if self._lora_layers is None or self._lora_layers[0] != key:
            if on:
                self.unet.enable_adapters()
                self.unet.set_adapters([self.adapter_name])
            else:
                self.unet.disable_adapters()
            from peft.tuners.tuners_utils import BaseTunerLayer
            self._lora_layers = (key, [m for m in self.unet.modules()
                                       if isinstance(m, BaseTunerLayer)])
            self._fused.clear()  # new layers or adapters: merge afresh
        adapter_on = on and not self.fuse_lora
        for layer in self._lora_layers[1]:
            if layer.disable_adapters == adapter_on:  # peft's flag: "off" now
                layer.enable_adapters(adapter_on)
        if on and self.fuse_lora:
            from .fast import lora
            lora.merge(self)

    def set_fuse_lora(self, fuse: bool) -> None:
        """Merge the LoRA into the UNet's weights whenever the bundle is personalized (off by
        default; inference only): personalized outputs differ from the unmerged LoRA's by float
        rounding, vanilla ones not at all (fast/lora.py)."""
        from .fast import lora
        lora.set_fuse_lora(self, fuse)

    def set_unet_onednn(self, enabled: bool, min_rows: int = 1) -> None:
        """Whether the UNets' CPU convolutions use oneDNN: never (enabled False) or in UNet
        calls of at least `min_rows` rows (fast/lora.py)."""
        from .fast import lora
        lora.set_unet_onednn(self, enabled, min_rows)

    def personal_rows(self, start: int, merged: bool | None = None):
        """`with bundle.personal_rows(n):` in vanilla mode, the block's UNet calls run the
        personalized model on their rows from `start` on (fast/lora.py)."""
        from .fast import lora
        return lora.personal_rows(self, start, merged)

    def set_identifier_embedding(self, row: int | None, learned: torch.Tensor | None = None) -> None:
        """Give the personalized model a learned input embedding (D,) for token `row` (the
        identifier), or remove it (row=None). The base row is kept and used in vanilla mode."""
        weight = self.text_encoder.get_input_embeddings().weight
        if self.identifier_embedding is not None:  # put the base row back first
            with torch.no_grad():
                weight[self.identifier_embedding[0]] = self._base_identifier_row.to(weight)
            self.identifier_embedding = self._base_identifier_row = None
        if row is None:
            return
        learned = torch.as_tensor(learned).reshape(-1)
        if learned.shape != weight.shape[1:]:
            raise ValueError(f"identifier embedding of shape {tuple(learned.shape)}; this text "
                             f"encoder needs ({weight.shape[1]},): made for another base model?")
        self._base_identifier_row = weight[row].detach().clone()
        self.identifier_embedding = (int(row), learned.detach().clone().cpu())
        self._apply(self.mode)

    def _peft_layers(self) -> list:
        """The UNet's peft layers (cached by _lora_switch)."""
        if self._lora_layers is None or self._lora_layers[0] != (id(self.unet), self.adapter_name):
            self._lora_switch(self.mode == "personalized")  # (re)collects them
        return self._lora_layers[1]

    @contextlib.contextmanager
    def using(self, mode: str):
        """Temporarily switch to `mode` ("vanilla" or "personalized"); restored on exit."""
        previous = self.mode
        self._apply(mode)
        try:
            yield self
        finally:
            self._apply(previous)

    def to(self, device=None, dtype=None) -> "ModelBundle":
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        merged = self._holds_merged  # the kept merge is made again where the weights go
        if merged or self._fused:
            from .fast import lora
            lora.forget_merge(self)
        for m in (self.text_encoder, self.vae, self._vanilla_unet, self.personal_unet):
            if m is not None and kw:
                m.to(**kw)
        if merged:
            from .fast import lora
            lora.merge(self)
        return self

    def pipeline(self):
        """A diffusers StableDiffusionPipeline over the same components (current mode)."""
        from diffusers import StableDiffusionPipeline
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)


IDENTIFIER_FILE = "identifier_embedding.safetensors"  # {identifier: (D,)}, next to the LoRA


def attach_lora(bundle: ModelBundle, path: str | Path, adapter_name: str = "personal") -> ModelBundle:
    """Load diffusers-format LoRA weights (pytorch_lora_weights.safetensors) onto the UNet,
    after checking that they were made for this UNet (ValueError naming the misfit if not)."""
    path = Path(path)
    if path.is_dir():  # diffusers looks for the .bin name in a folder unless told otherwise
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}; give the folder or file that "
                                "personalize.dreambooth_lora (or diffusers' training script) wrote")
    check_lora(bundle.unet, path)
    learned = read_identifier_embedding(bundle, path.parent)
    try:
        bundle.unet.load_lora_adapter(str(path), prefix="unet", adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(other_base(path, f"{type(err).__name__}: {err}")) from err
    bundle.personalization, bundle.adapter_name = "lora", adapter_name
    bundle._lora_layers = None  # the adapters changed: the next switch walks the UNet again
    bundle.set_identifier_embedding(None)
    if learned is not None:
        bundle.set_identifier_embedding(*learned)
    bundle._apply(bundle.mode)
    return bundle


def read_identifier_embedding(bundle: ModelBundle, folder: Path) -> tuple[int, torch.Tensor] | None:
    """(token row, learned embedding (D,)) from a LoRA folder's IDENTIFIER_FILE, None if it has
    none; ValueError if it was learned for another identifier or the identifier is not one token."""
    ident = Path(folder) / IDENTIFIER_FILE
    if not ident.is_file():
        return None
    embeds = load_state_dict(ident)
    if list(embeds) != [bundle.identifier]:
        raise ValueError(f"{ident} holds an embedding for {list(embeds)}, but this bundle's "
                         f"identifier is {bundle.identifier!r}; load it with identifier=...")
    ids = bundle.tokenizer(bundle.identifier, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{ident}: the identifier {bundle.identifier!r} is not one token here")
    return ids[0], embeds[bundle.identifier].reshape(-1)


# ----------------------------------------------------------------------------- compatibility
# UNet config keys that fix the architecture: a personalized UNet must agree on all of them.
ARCH_KEYS = ("in_channels", "out_channels", "sample_size", "block_out_channels", "layers_per_block",
             "down_block_types", "up_block_types", "mid_block_type", "cross_attention_dim",
             "attention_head_dim", "num_attention_heads", "use_linear_projection",
             "transformer_layers_per_block", "norm_num_groups", "class_embed_type",
             "addition_embed_type", "time_cond_proj_dim")


def load_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a pickle loaded with weights_only=True (no
    code from the file runs; anything but tensors and plain containers is refused)."""
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def check_same_architecture(base_cfg, personal_cfg, where) -> None:
    """ValueError naming every architecture key on which two UNet configs differ."""
    diff = [k for k in ARCH_KEYS if _norm(base_cfg.get(k)) != _norm(personal_cfg.get(k))]
    if diff:
        details = ", ".join(f"{k}: base {base_cfg.get(k)!r} vs {personal_cfg.get(k)!r}" for k in diff)
        raise ValueError(
            f"the DreamBooth UNet in {where} has another architecture than the base model "
            f"(mismatched config keys: {details}). Pass the base model it was fine-tuned from as base=...")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def check_lora(unet, file: Path) -> None:
    """Every PEFT-format `unet.<module>.lora_A/B.weight` must name a layer of this UNet with
    matching width; anything else means the LoRA was trained on another base model."""
    modules = dict(unet.named_modules())
    bad = []
    for key, w in load_state_dict(file).items():
        name, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        if not key.startswith("unet.") or kind not in ("A.weight", "B.weight"):
            continue  # text-encoder LoRA / other formats: left to the loader
        layer = modules.get(name)
        if layer is None:
            bad.append(f"{name} (no such layer)")
        elif isinstance(layer, torch.nn.Linear):
            want, got = ((layer.in_features, w.shape[1]) if kind == "A.weight"
                         else (layer.out_features, w.shape[0]))
            if want != got:
                bad.append(f"{name}.lora_{kind} (width {got}, layer has {want})")
    if bad:
        raise ValueError(other_base(file, f"{len(bad)} mismatches, e.g. " + "; ".join(bad[:3])))


def other_base(file: Path, detail: str) -> str:
    return (f"the LoRA {file} was made for another base model: it does not fit this base UNet "
            f"({detail}). Load it with the base it was trained on (base=...), or retrain it on this one.")
