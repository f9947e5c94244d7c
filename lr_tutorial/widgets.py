"""Notebook explorers on core ipywidgets, each with a static fallback (`to_figure`).

TimestepScrubber(result, bundle): a step slider with a Play button; for the chosen step and for
every branch (reference, context, target) it shows the latent preview, the predicted x0, the
cross-attention overlay of any token (layer resolution or mean, head or mean) and the branch's
mask (M^r, M^c, and the target's M_k of that step). Recorded with `record_self_attention`, it
also shows the self-attention of a chosen query pixel in each branch and, for the target, what
that pixel reads from the context and from the reference, with the target's per-pixel source
map (which of its queries read the reference at that step). Every frame is computed on first
view and cached, so moving the slider only swaps images.

LambdaControls(bundle, prompt): sliders for the three step boundaries (lambda1, lambda2,
lambda3) of one prompt and seed, showing the stage-1 layout, the mask used and the
Layout-and-Retouch image of each setting, run on demand and cached; `precompute` and
`to_figure` give the static version. LambdaExplorer, MaskExplorer and SwapExplorer look at one
stage each.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch

from . import sampling
from .preview import linear_preview
from .viz import overlay

BRANCHES = ("reference", "context", "target")
KINDS = ("latent", "x0", "attention", "mask")
SELF_KINDS = ("self", "source")  # with a SelfAttentionRecord
READS_CONTEXT, READS_REFERENCE, QUERY = (0, 120, 255), (255, 140, 0), (255, 0, 255)


def png(img: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image
    im = Image.fromarray(img)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SelfAttentionRecord:
    """Queries and keys of stage 2's batch [reference (1); context (B); target (B)] at one
    self-attention layer the swap runs on, one entry per stage-2 step (both CFG halves as the
    UNet saw them; CPU, fp16). Made by `record_self_attention`."""
    layer: str
    side: int
    calls: list = field(default_factory=list)  # [(q, k)], each (rows, heads, HW, d)

    def attention(self, i: int, row: int, keys_row: int, query: int,
                  key_mask: np.ndarray | None = None) -> np.ndarray:
        """softmax(q . K / sqrt(d)) of one query pixel of `row` over the keys of `keys_row`
        (keys outside `key_mask`, a boolean (HW,), get no weight), heads averaged: (side, side)."""
        q, k = self.calls[i]
        q, k = q[row, :, query].float(), k[keys_row].float()  # (heads, d), (heads, HW, d)
        logits = torch.einsum("hd,hnd->hn", q, k) * q.shape[-1] ** -0.5
        if key_mask is not None and key_mask.any():
            logits = logits.masked_fill(~torch.as_tensor(key_mask)[None], float("-inf"))
        return logits.softmax(-1).mean(0).view(self.side, self.side).numpy()


def default_self_layer(unet, latent_size: int | None = None, retouch_layers="up_blocks.*attn1") -> str:
    """The decoder self-attention layer (where the retouch swaps) at the largest side <= 16."""
    from .attention import layer_resolution, select_layers
    layers = select_layers(unet, retouch_layers, "self")
    if not layers:
        raise ValueError(f"no self-attention layer matches {retouch_layers!r}")
    side = {p: layer_resolution(unet, p, latent_size) for p in layers}
    small = [p for p in layers if side[p] <= 16] or layers
    return max(small, key=lambda p: (side[p] if side[p] <= 16 else -side[p], p))


@contextlib.contextmanager
def record_self_attention(bundle, layer: str | None = None):
    """`with record_self_attention(bundle) as rec: result = lr(...)` records the queries and
    keys of every stage-2 step at `layer` (default: default_self_layer), for
    TimestepScrubber(result, bundle, self_attention=rec). One run, on the reference engine
    (LRConfig(engine="reference"), the default); the swap computes them, the record keeps them."""
    from . import swap
    from .attention import layer_resolution
    layer = layer or default_self_layer(bundle.unet, bundle.latent_size)
    modules = {id(u.get_submodule(layer)) for u in bundle.unets}
    rec = SelfAttentionRecord(layer, layer_resolution(bundle.unet, layer, bundle.latent_size))
    project = swap.project_qkv

    def recording(attn, hidden_states, *args, **kwargs):
        q, k, v = project(attn, hidden_states, *args, **kwargs)
        if id(attn) in modules:
            rec.calls.append((q.detach().to("cpu", torch.float16), k.detach().to("cpu", torch.float16)))
        return q, k, v

    from .exercises import _IN_USE
    swap.project_qkv = recording
    _IN_USE.append("record_self_attention")
    try:
        yield rec
    finally:
        swap.project_qkv = project
        _IN_USE.remove("record_self_attention")


@dataclass
class ScrubData:
    """Per-branch, per-step arrays for one image of a Result. latents/x0: (N+1 or N, C, h, w)."""
    steps: int
    latents: dict[str, torch.Tensor]
    x0: dict[str, np.ndarray]  # decoded (N, H, W, 3) uint8
    attention: dict[str, dict[tuple[int, str], np.ndarray]]  # branch -> (step, layer) -> (hw)
    masks: np.ndarray  # (N, h, w) target mask per step
    layers: list[str]
    start: int

    @classmethod
    def from_result(cls, result, bundle, index: int = 0, decode_x0: bool | None = None):
        b = len(result.prompts)
        n = len(result.layout.trajectory.x0)
        start = n - len(result.target.x0)
        ref, ctx, tgt = result.reference.trajectory, result.layout.trajectory, result.target
        # the reference's UNet call at step k reads z^r_{k+1}, the inversion's input at t_k
        # (lr_tutorial.retouch), whose predicted x0 is the inversion's x0 at step k; it was
        # inverted down to step ref.start (0; with LRConfig(reference_inversion="start") the
        # target's first step): before it, grey frames
        rs = ref.start
        blank = torch.zeros_like(ref.latents[0][:1])
        lat = {"reference": torch.cat([blank] * rs + [ref.latent(k + 1)[:1] for k in range(rs, n)]),
               "context": torch.cat([z[index:index + 1] for z in ctx.latents[:n]]),
               "target": torch.cat([z[index:index + 1] for z in
                                    ctx.latents[:start] + tgt.latents[:n - start]])}
        x0s = {"reference": torch.cat([z[:1] for z in ref.x0]),
               "context": torch.cat([z[index:index + 1] for z in ctx.x0]),
               "target": torch.cat([z[index:index + 1] for z in ctx.x0[:start] + tgt.x0])}
        decode_x0 = bundle.backend == "toy" if decode_x0 is None else decode_x0
        fit = x0s["context"][-4:]
        if decode_x0:
            x0 = {k: sampling.decode(bundle, v) for k, v in x0s.items()}
        else:
            x0 = {k: linear_preview(bundle, v, fit, upscale=8) for k, v in x0s.items()}
        if rs:  # the steps the reference was not inverted to: a grey frame
            x0["reference"] = np.concatenate([np.full((rs, *x0["reference"].shape[1:]), 128,
                                                      np.uint8), x0["reference"]])
        linear_preview(bundle, fit[:1], fit)  # make sure the latent preview map is fitted
        # the caller's full capture (all tokens, maybe heads) when present, else the class token
        store = result.capture if result.capture is not None else result.attention
        att: dict[str, dict] = {k: {} for k in BRANCHES}

        def take(st, rows):
            for (layer, step), m in st.maps.items():
                if layer.endswith("attn2"):
                    m = m.float()
                    m = m[:, None] if m.ndim == 3 else m  # (rows, heads, HW, tokens)
                    for br, r in rows.items():
                        att[br][(step, layer)] = m[r].numpy()
        if any(m.shape[0] == 2 * b + 1 for m in store.maps.values()):  # batched stage 2:
            # rows [reference (one, shared); context (B); target (B)]
            take(store, {"reference": 0, "context": 1 + index, "target": 1 + b + index})
        else:  # cached stage 2 ran the target alone: the context's maps come from stage 1
            take(result.layout.store, {"context": index})
            take(store, {"target": index})
        # before `start` the target is the context
        att["target"].update({k: v for k, v in att["context"].items() if k[0] < start})
        masks = np.concatenate([np.repeat(result.masks.per_step[:1, index], start, 0),
                                result.masks.per_step[:, index]]) if start else \
            result.masks.per_step[:, index]
        from .prompts import token_index
        if result.capture is not None and result.capture.spec.tokens is None:
            tokens = bundle.tokenizer.convert_ids_to_tokens(bundle.tokenizer(
                result.prompts[index]).input_ids)
            default = token_index(bundle.tokenizer, result.prompts[index], bundle.class_noun)
        else:
            tokens, default = [bundle.class_noun], 0
        layers = [ly for ly in store.layers() if ly.endswith("attn2")]
        branch_masks = {"reference": np.asarray(result.masks.reference.mask, np.float32),
                        "context": np.asarray(result.masks.context[index].mask, np.float32)}
        return cls(n, lat, x0, att, masks, layers, start, tokens, default, rs, branch_masks,
                   batch=b, index=index, swap_config=dict(result.config.get("swap", {})))

    tokens: list[str] = None
    default_token: int = 0
    reference_start: int = 0  # the reference branch's first step (its inversion's stop)
    branch_masks: dict = None  # M^r and M^c (h, w); the target's are `masks`, per step
    batch: int = 1
    index: int = 0
    swap_config: dict = None
    self_attention: SelfAttentionRecord | None = None
    actions: list = None  # the swap's action at the recorded layer, per step

    def mask(self, branch: str, step: int) -> np.ndarray:
        return self.masks[step] if branch == "target" else self.branch_masks[branch]

    def attach(self, record: SelfAttentionRecord, unet) -> None:
        """Use a SelfAttentionRecord of this result's run (one call per stage-2 step)."""
        from .config import SwapConfig
        from .swap import SwapController
        if len(record.calls) != self.steps - self.start:
            raise ValueError(f"the self-attention record holds {len(record.calls)} calls for "
                             f"{self.steps - self.start} stage-2 steps: record exactly the run of "
                             "this result, on the reference engine")
        ctl = SwapController(unet, SwapConfig(**self.swap_config), self.steps)
        acts = []
        for k in range(self.steps):
            ctl.step = k
            acts.append(ctl.action(record.layer) if k >= self.start else None)
        self.self_attention, self.actions = record, acts

    def reads(self, branch: str, step: int, query: tuple[int, int]) -> dict | None:
        """Where the query pixel (y, x) of `branch` looks at `step` (recorded layer, heads
        averaged): {source branch: (side, side) attention weights}, the weights of all sources
        summing to 1 (the target's retouch reads M^t of the reference and 1 - M^t of the
        context). None before stage 2 or without a record."""
        rec = self.self_attention
        if rec is None or step < self.start:
            return None
        i, s = step - self.start, rec.side
        rows = 1 + 2 * self.batch
        off = rec.calls[i][0].shape[0] - rows  # the conditional half
        row = {"reference": off, "context": off + 1 + self.index,
               "target": off + 1 + self.batch + self.index}
        qi = int(query[0]) * s + int(query[1])
        if branch != "target":
            return {branch: rec.attention(i, row[branch], row[branch], qi)}
        act = self.actions[step]
        if act is None:
            return {"target": rec.attention(i, row["target"], row["target"], qi)}
        if act in ("structure", "reference"):
            src = "context" if act == "structure" else "reference"
            return {src: rec.attention(i, row["target"], row[src], qi)}
        m_t = float(_as_swap_sees(self.masks[step], s)[qi])
        m_r = _as_swap_sees(self.branch_masks["reference"], s) > 0.5
        return {"reference": m_t * rec.attention(i, row["target"], row["reference"], qi, m_r),
                "context": (1 - m_t) * rec.attention(i, row["target"], row["context"], qi)}

    def source_map(self, step: int) -> np.ndarray | None:
        """(h, w) share of each target query's reading that comes from the reference at `step`
        (the recorded layer's action): M^t when retouching, 1 for the single-source ablation,
        0 when reading the context (or itself)."""
        if self.actions is None or step < self.start:
            return None
        act = self.actions[step]
        m = self.masks[step]
        return m if act == "retouch" else np.full_like(m, 1.0 if act == "reference" else 0.0)

    @property
    def heads(self) -> int:
        return max((m.shape[0] for maps in self.attention.values() for m in maps.values()), default=1)

    def attention_map(self, branch: str, step: int, layer: str = "mean", token: int | None = None,
                      head: str | int = "mean") -> np.ndarray | None:
        """Normalized cross-attention map of one token at `step`, for one layer or the mean of
        all (each resized to the largest captured side), one head or their mean."""
        from .masks import normalize, resize
        token = self.default_token if token is None else token
        maps = self.attention[branch]
        layers = self.layers if layer == "mean" else [layer]
        got = []
        for ly in layers:
            m = maps.get((step, ly))
            if m is None:
                continue
            m = m.mean(0) if head == "mean" or m.shape[0] == 1 else m[int(head)]  # (HW, T)
            got.append(m[:, token])
        if not got:
            return None
        side = max(int(np.sqrt(g.size)) for g in got)
        acc = np.mean([resize(g.reshape(int(np.sqrt(g.size)), -1), side) for g in got], axis=0)
        return normalize(acc)


def mark(img: np.ndarray, query: tuple[int, int], side: int, colour=QUERY) -> np.ndarray:
    """The query pixel (y, x) of a side x side grid, outlined on an image."""
    img = img.copy()
    c = img.shape[0] / side
    y0, x0 = int(query[0] * c), int(query[1] * c)
    y1, x1 = max(y0 + 1, int((query[0] + 1) * c)), max(x0 + 1, int((query[1] + 1) * c))
    y0, x0 = max(0, y0 - 1), max(0, x0 - 1)
    y1, x1 = min(img.shape[0], y1 + 1), min(img.shape[1], x1 + 1)
    for sl in ((slice(y0, y1), x0), (slice(y0, y1), x1 - 1), (y0, slice(x0, x1)), (y1 - 1, slice(x0, x1))):
        img[sl] = colour
    return img


class TimestepScrubber:
    """`TimestepScrubber(result, bundle).widget()` in a live notebook; `.to_figure()` elsewhere.

    With `self_attention=` a SelfAttentionRecord of the same run (record_self_attention), two
    more columns: "self", the chosen query pixel's self-attention within each branch, and
    "source", what the target's query pixel reads: in the reference and context rows, its
    attention over that branch's keys weighted by that source's share; in the target row, which
    source each target pixel reads (orange: the reference, blue: the context)."""

    def __init__(self, result, bundle, index: int = 0, scale: int = 3, self_attention=None):
        self.data = ScrubData.from_result(result, bundle, index)
        if self_attention is not None:
            self.data.attach(self_attention, bundle.unet)
        self.bundle, self.scale = bundle, scale
        self.prompt = result.prompts[index]

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS + (SELF_KINDS if self.data.self_attention is not None else ())

    def default_query(self) -> tuple[int, int]:
        """The query pixel on the subject: where the target's last mask peaks."""
        from .masks import resize
        rec = self.data.self_attention
        side = rec.side if rec is not None else self.data.masks.shape[-1]
        m = resize(self.data.masks[-1], side)
        return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))

    def reading(self, step: int, query: tuple[int, int] | None = None) -> dict | None:
        """{source: share} of what the target's query pixel reads at `step` (None before
        stage 2 or without a record)."""
        r = self.data.reads("target", step, query or self.default_query())
        return None if r is None else {k: float(v.sum()) for k, v in r.items()}

    @lru_cache(maxsize=4096)
    def frame(self, branch: str, kind: str, step: int, layer: str = "mean", token: int | None = None,
              head: str | int = "mean", query: tuple[int, int] | None = None) -> np.ndarray:
        d = self.data
        if branch == "reference" and step < d.reference_start:  # not inverted this far
            return d.x0[branch][step]  # the grey frame
        base = d.x0[branch][step]
        if kind == "latent":
            img = linear_preview(self.bundle, d.latents[branch][step:step + 1],
                                 upscale=d.x0[branch].shape[1] // d.latents[branch].shape[-1])[0]
        elif kind == "x0":
            img = base
        elif kind == "attention":
            a = d.attention_map(branch, step, layer, token, head)
            img = base if a is None else overlay(base, a, (255, 200, 0), 0.6)
        elif kind == "mask":
            img = overlay(base, d.mask(branch, step))
        elif kind in SELF_KINDS:
            img = self._self_frame(branch, kind, step, query or self.default_query())
        else:
            raise ValueError(f"kind must be one of {self.kinds}, got {kind!r}")
        return img

    def _self_frame(self, branch: str, kind: str, step: int, query: tuple[int, int]) -> np.ndarray:
        d = self.data
        if d.self_attention is None:
            raise ValueError("no self-attention record: TimestepScrubber(..., self_attention=rec) "
                             "with rec from record_self_attention around the run")
        side, base = d.self_attention.side, d.x0[branch][step]
        if kind == "self":
            r = d.reads(branch, step, query)[branch] if branch != "target" and step >= d.start \
                else self._own_target(step, query)
            img = base if r is None else overlay(base, _peak(r), READS_CONTEXT, 0.8)
            return mark(img, query, side) if branch != "reference" else img
        if branch == "target":  # which source each target pixel reads
            m = d.source_map(step)
            if m is None:
                return mark(base, query, side)
            img = overlay(overlay(base, 1 - m, READS_CONTEXT, 0.45), m, READS_REFERENCE, 0.6)
            return mark(img, query, side)
        r = d.reads("target", step, query)
        if r is None or branch not in r:
            return base
        peak = max(float(v.max()) for v in r.values()) or 1.0
        colour = READS_REFERENCE if branch == "reference" else READS_CONTEXT
        img = overlay(base, np.clip(r[branch] / peak, 0, 1), colour, 0.8)
        return mark(img, query, side) if branch == "context" else img

    def _own_target(self, step: int, query):
        """The target's attention over its own keys (what the swap replaces on this layer)."""
        d = self.data
        if d.self_attention is None or step < d.start:
            return None
        rows = 1 + 2 * d.batch
        i = step - d.start
        row = d.self_attention.calls[i][0].shape[0] - rows + 1 + d.batch + d.index
        s = d.self_attention.side
        return d.self_attention.attention(i, row, row, int(query[0]) * s + int(query[1]))

    def widget(self):
        import ipywidgets as W

        d = self.data
        kinds = self.kinds
        # the same start value as the slider: jslink copies play -> slider when a browser renders
        play = W.Play(min=0, max=d.steps - 1, value=d.steps - 1, step=1, interval=150,
                      description="play")
        slider = W.IntSlider(min=0, max=d.steps - 1, value=d.steps - 1, description="step k",
                             continuous_update=True)
        W.jslink((play, "value"), (slider, "value"))
        layer = W.Dropdown(options=["mean"] + d.layers, value="mean", description="layer")
        token = W.Dropdown(options=[(t, i) for i, t in enumerate(d.tokens)], value=d.default_token,
                           description="token")
        head = W.Dropdown(options=["mean"] + list(range(d.heads)), value="mean", description="head")
        controls = [layer, token, head]
        qy = qx = readout = None
        if d.self_attention is not None:
            y, x = self.default_query()
            side = d.self_attention.side
            qy = W.IntSlider(min=0, max=side - 1, value=y, description="query y")
            qx = W.IntSlider(min=0, max=side - 1, value=x, description="query x")
            readout = W.HTML()
        images = {(br, kd): W.Image(format="png") for br in BRANCHES for kd in kinds}
        # stable DOM hooks for browser tests and custom CSS: .lr-scrubber, .lr-step, .lr-target-x0
        slider.add_class("lr-step")
        for (br, kd), im in images.items():
            im.add_class(f"lr-{br}-{kd}")

        def update(*_):
            query = (qy.value, qx.value) if qy is not None else None
            for (br, kd), im in images.items():
                im.value = png(self.frame(br, kd, slider.value, layer.value, token.value,
                                          head.value, query if kd in SELF_KINDS else None), self.scale)
            if readout is not None:
                readout.value = self._reading_text(slider.value, query)

        for w in (slider, layer, token, head) + ((qy, qx) if qy is not None else ()):
            w.observe(update, "value")
        update()
        header = [W.HTML(f"<b>{k}</b>") for k in ("", *kinds)]
        cells = header + [c for br in BRANCHES for c in
                          [W.HTML(f"<b>{br}</b>")] + [images[(br, kd)] for kd in kinds]]
        grid = W.GridBox(cells, layout=W.Layout(grid_template_columns=f"90px repeat({len(kinds)}, auto)"))
        self._controls = dict(play=play, slider=slider, layer=layer, token=token, head=head,
                              images=images, query_y=qy, query_x=qx, reading=readout)
        rows = [W.HTML(f"<code>{self.prompt}</code>"), W.HBox([play, slider]), W.HBox(controls)]
        if qy is not None:
            rows += [W.HBox([qy, qx]), readout]
        box = W.VBox(rows + [grid])
        box.add_class("lr-scrubber")
        return box

    def _reading_text(self, step: int, query) -> str:
        r = self.reading(step, query)
        layer = self.data.self_attention.layer
        if r is None:
            return f"step {step}: stage 1 (the target is the context); the swap starts at step {self.data.start}"
        shares = ", ".join(f"the {k} {v:.2f}" for k, v in r.items())
        return f"step {step}, <code>{layer}</code>: the target's query pixel reads {shares}"

    def to_figure(self, steps=None, query: tuple[int, int] | None = None, kinds=None):
        """Static fallback: rows = branch x kind (default: every kind), columns = a few steps."""
        from .viz import image_grid
        d = self.data
        kinds = tuple(kinds) if kinds is not None else self.kinds
        bad = [k for k in kinds if k not in self.kinds]
        if bad:
            raise ValueError(f"kinds {bad} are not among {self.kinds}")
        steps = steps if steps is not None else np.linspace(0, d.steps - 1, 6).round().astype(int)
        query = query or (self.default_query() if d.self_attention is not None else None)
        imgs, titles = [], []
        for br in BRANCHES:
            for kd in kinds:
                for s in steps:
                    imgs.append(self.frame(br, kd, int(s), query=query if kd in SELF_KINDS else None))
                    titles.append(f"{br} {kd} k={s}")
        return image_grid(imgs, titles, ncols=len(steps), scale=1.2, suptitle=self.prompt)


def _as_swap_sees(mask: np.ndarray, side: int) -> np.ndarray:
    """A (h, w) mask at a layer's side, flattened, resized as swap.SwapController.mask_at does."""
    import torch.nn.functional as F
    m = torch.as_tensor(np.asarray(mask, np.float32))[None, None]
    return F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False).reshape(-1).numpy()


def _peak(a: np.ndarray) -> np.ndarray:
    return np.clip(a / (float(a.max()) or 1.0), 0, 1)


class LambdaExplorer:
    """A lambda1 slider over precomputed stage-1 layouts, with the oracle's readout (toy) of
    prompt fidelity and identity for each lambda1. `scores(images, prompts)` -> (fidelity,
    identity) may be given for other backends."""

    def __init__(self, bundle, prompts: list[str], seeds: list[int], lambdas, steps: int = 25,
                 guidance: float | None = None, scores=None):
        from .layout import LayoutConfig, step_blended
        self.lambdas = list(lambdas)
        self.prompts = [p for p in prompts for _ in seeds]
        seeds_all = [s for _ in prompts for s in seeds]
        self.images = {lam: step_blended(bundle, self.prompts, seeds_all,
                                         LayoutConfig(lambda1=lam, steps=steps, guidance=guidance)).images
                       for lam in self.lambdas}
        scores = scores or _toy_scores
        self.readout = {lam: scores(imgs, self.prompts) for lam, imgs in self.images.items()}

    def widget(self):
        import ipywidgets as W
        slider = W.SelectionSlider(options=self.lambdas, value=self.lambdas[0], description="lambda1")
        strip = W.Image(format="png")
        text = W.HTML()

        def update(*_):
            lam = slider.value
            strip.value = png(np.concatenate(list(self.images[lam]), axis=1), 2)
            f, i = self.readout[lam]
            text.value = f"<b>lambda1 = {lam}</b>: prompt fidelity {f:.2f}, identity {i:.2f}"

        slider.observe(update, "value")
        update()
        self._controls = dict(slider=slider, image=strip, text=text)
        return W.VBox([slider, text, strip])

    def to_figure(self):
        import matplotlib.pyplot as plt
        lams = self.lambdas
        f = [self.readout[lam][0] for lam in lams]
        i = [self.readout[lam][1] for lam in lams]
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.plot(lams, f, "o-", label="prompt fidelity")
        ax.plot(lams, i, "s-", label="identity")
        ax.set_xlabel("lambda1 (vanilla steps)"), ax.set_ylim(0, 1.05), ax.legend(fontsize=7)
        ax.set_title("stage 1 trade-off", fontsize=9)
        fig.tight_layout()
        return fig


def _toy_scores(images, prompts) -> tuple[float, float]:
    from .toy.report import score, summarize
    s = summarize(score(images, prompts))
    return s["fidelity_mean"], s["identity"]


class MaskExplorer:
    """Attention vs segmenter vs fused mask of a context image, with live thresholds/feather."""

    def __init__(self, image: np.ndarray, attn: np.ndarray, segmenter=None, config=None):
        from .masks import MaskConfig, normalize, segment
        self.image, self.attn = image, normalize(attn)
        self.config = config or MaskConfig()
        self.seg = (segment(segmenter, image, self.attn, self.config) if segmenter is not None
                    else None)

    def panels(self, tau_lo: float, tau_hi: float, feather: float):
        from dataclasses import replace

        from .masks import fuse
        cfg = replace(self.config, tau_lo=tau_lo, tau_hi=max(tau_lo, tau_hi), feather=feather)
        seg = self.seg if self.seg is not None else np.ones(self.image.shape[:2], bool)
        fm = fuse(self.attn, seg, cfg)
        imgs = [self.image, overlay(self.image, fm.attention, (255, 200, 0), 0.7),
                overlay(self.image, fm.segmenter), overlay(self.image, fm.support, (0, 160, 255)),
                overlay(self.image, fm.mask, (40, 220, 40), 0.7)]
        return imgs, ["image", "attention A", "segmenter S", "support (A>=lo)&S", "fused M"]

    def widget(self):
        import ipywidgets as W
        lo = W.FloatSlider(value=self.config.tau_lo, min=0, max=1, step=0.05, description="tau_lo")
        hi = W.FloatSlider(value=self.config.tau_hi, min=0, max=1, step=0.05, description="tau_hi")
        fe = W.FloatSlider(value=self.config.feather, min=0, max=4, step=0.25, description="feather")
        ims = [W.Image(format="png") for _ in range(5)]

        def update(*_):
            for w, img in zip(ims, self.panels(lo.value, hi.value, fe.value)[0]):
                w.value = png(img, 3)

        for w in (lo, hi, fe):
            w.observe(update, "value")
        update()
        self._controls = dict(tau_lo=lo, tau_hi=hi, feather=fe, images=ims)
        return W.VBox([W.HBox([lo, hi, fe]), W.HBox(ims)])

    def to_figure(self):
        from .viz import image_grid
        imgs, titles = self.panels(self.config.tau_lo, self.config.tau_hi, self.config.feather)
        return image_grid(imgs, titles, scale=1.5)


class SwapExplorer:
    """Precomputed Layout-and-Retouch results for several swap settings (e.g. single- vs
    multi-source, lambda2 values), picked with a dropdown; `to_figure` shows them side by side."""

    def __init__(self, results: dict):
        self.results = results  # label -> Result

    def widget(self):
        import ipywidgets as W
        dd = W.Dropdown(options=list(self.results), description="setting")
        im = W.Image(format="png")

        def update(*_):
            r = self.results[dd.value]
            im.value = png(np.concatenate([r.layout.images[0], r.images[0]], axis=1), 3)

        dd.observe(update, "value")
        update()
        self._controls = dict(dropdown=dd, image=im)
        return W.VBox([dd, W.HTML("layout x^c | result"), im])

    def to_figure(self):
        from .viz import image_grid
        first = next(iter(self.results.values()))
        imgs = [first.reference.image, first.layout.images[0]] + [r.images[0] for r in self.results.values()]
        return image_grid(imgs, ["reference", "layout x^c"] + list(self.results), scale=1.5)


KNOBS = {  # knob -> what it does, in one phrase (the sliders' labels)
    "lambda1": "stage 1: vanilla steps before the personalized model takes over",
    "lambda2": "stage 2: the target copies the layout's self-attention until this step",
    "lambda3": "stage 2: outside the mask the latent is the layout's until this step (0: off)",
}
LAMBDA_PRESETS = {"default": {}, "early hand-over": {"lambda1": 0.1},
                  "no latent blending": {"lambda3": 0}}


@dataclass
class LambdaPanel:
    """One computed setting of LambdaControls: the stage-1 layout, the last target mask the
    retouch used (latent resolution), the Layout-and-Retouch image, and their readings."""
    setting: tuple[int, int, int]  # (lambda1, lambda2, lambda3) in steps
    layout: np.ndarray
    mask: np.ndarray
    image: np.ndarray
    readings: dict  # "layout" / "mask" / "image" -> text ("" when no reader)
    note: str = ""  # a warning the run raised (e.g. a stage that does nothing)

    def images(self) -> list[np.ndarray]:
        return [self.layout, overlay(self.layout, self.mask, (40, 220, 40), 0.6), self.image]


class LambdaControls:
    """The three step boundaries of the method on one prompt and seed: sliders for lambda1,
    lambda2 and lambda3 (step counts of `steps`), a run button, and for the chosen setting the
    stage-1 layout, the mask used and the Layout-and-Retouch image, each with the oracle's
    reading on the toy backend (toy.contact.label; `reading(image, prompt) -> str` for others).

    Every setting is computed once and cached (`self.runs` counts pipeline calls); a setting
    the config classes refuse shows their message. `precompute(settings)` fills the cache, and
    `to_figure()` draws the precomputed settings side by side without running anything.
    A setting is a dict of knobs ({"lambda3": 0}; missing ones keep `config`'s values, lambda1
    the models' own hand-over), a (lambda1, lambda2, lambda3) tuple, fractions of `steps` or
    step counts; `presets` (label -> setting) fill the widget's preset menu."""

    def __init__(self, bundle, prompt: str, seed: int = 0, steps: int = 25, config=None,
                 reference_images=None, presets: dict | None = None, reading="auto"):
        from .config import LRConfig
        from .pipeline import LayoutAndRetouch
        base = config or LRConfig()
        self.config = replace(base, layout=replace(base.layout, steps=steps))
        self.config.validate()
        self.bundle, self.prompt, self.seed, self.steps = bundle, prompt, seed, steps
        self.reference_images = reference_images
        self.presets = dict(LAMBDA_PRESETS if presets is None else presets)
        for s in self.presets.values():
            self.setting(s)  # a bad preset fails here, naming the knob
        if reading == "auto":
            reading = _toy_label if bundle.backend == "toy" else None
        self.reading = reading
        self.cache: dict[tuple[int, int, int], LambdaPanel] = {}
        self.shown: list[tuple[str, tuple[int, int, int]]] = []  # precomputed: (label, setting)
        self.runs = 0
        self._lr = LayoutAndRetouch(bundle, self.config)  # keeps the reference inversions

    # ------------------------------------------------------------------ settings
    def default_setting(self) -> tuple[int, int, int]:
        return self.setting({})

    def lr_config(self, setting):
        """The LRConfig of a setting; the config classes raise, naming the knob, if it is bad."""
        from .config import resolve_lambda1
        knobs = self._knobs(setting)
        cfg = self.config
        lambda1 = resolve_lambda1(self.bundle, knobs.get("lambda1", cfg.layout.lambda1))
        return replace(cfg, layout=replace(cfg.layout, lambda1=lambda1),
                       swap=replace(cfg.swap, lambda2=knobs.get("lambda2", cfg.swap.lambda2)),
                       mask=replace(cfg.mask, lambda3=knobs.get("lambda3", cfg.mask.lambda3)))

    def setting(self, setting) -> tuple[int, int, int]:
        """(lambda1, lambda2, lambda3) in steps, checked by the config classes: the cache key
        (0.4 and 10 of 25 steps are the same setting)."""
        from .config import resolve_steps
        cfg = self.lr_config(setting)
        n = self.steps
        return (resolve_steps(cfg.layout.lambda1, n, "lambda1"),
                resolve_steps(cfg.swap.lambda2, n, "lambda2"),
                resolve_steps(cfg.mask.lambda3, n, "lambda3"))

    @staticmethod
    def _knobs(setting) -> dict:
        if isinstance(setting, dict):
            bad = set(setting) - set(KNOBS)
            if bad:
                raise ValueError(f"a setting names lambda1, lambda2 and lambda3, got {sorted(bad)}")
            return dict(setting)
        values = tuple(setting)
        if len(values) != 3:
            raise ValueError(f"a setting is (lambda1, lambda2, lambda3) or a dict of them, "
                             f"got {setting!r}")
        return dict(zip(KNOBS, values))

    # ------------------------------------------------------------------ compute
    def run(self, setting) -> LambdaPanel:
        """The panel of a setting: from the cache, or one Layout-and-Retouch run (then cached)."""
        import warnings

        from .validate import NoOpWarning
        key = self.setting(setting)
        if key in self.cache:
            return self.cache[key]
        self._lr.config = self.lr_config(dict(zip(KNOBS, key)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = self._lr(self.prompt, self.reference_images, seed=self.seed)
        self.runs += 1
        used = res.masks.per_step
        mask = used[-1, 0] if len(used) else res.masks.context[0].mask  # no retouch step: M^c
        layout, image = res.layout.images[0], res.images[0]
        area = float(np.asarray(mask).mean())
        blend = f"blends until step {key[2]}" if key[2] else "no latent blending"
        read = self.reading or (lambda img, prompt: "")
        panel = LambdaPanel(key, layout, np.asarray(mask, np.float32), image,
                            {"layout": read(layout, self.prompt),
                             "mask": f"covers {area:.0%}; {blend}",
                             "image": read(image, self.prompt)},
                            " ".join(str(w.message).split(";")[0] for w in caught
                                     if isinstance(w.message, NoOpWarning)))
        self.cache[key] = panel
        return panel

    def precompute(self, settings=None) -> "LambdaControls":
        """Compute (or take from the cache) each setting, for the widget and `to_figure`:
        a dict label -> setting, or a list of settings (default: the presets)."""
        settings = self.presets if settings is None else settings
        items = settings.items() if isinstance(settings, dict) else \
            [(None, s) for s in settings]
        for label, s in items:
            key = self.run(s).setting
            label = label or self.describe(key)
            self.shown = [(lb, k) for lb, k in self.shown if k != key] + [(label, key)]
        return self

    def describe(self, key) -> str:
        return "lambda1 {} / lambda2 {} / lambda3 {} of {}".format(*key, self.steps)

    # ------------------------------------------------------------------ display
    def widget(self):
        import html

        import ipywidgets as W
        default = self.default_setting()
        sliders = {name: W.IntSlider(value=v, min=0, max=self.steps, description=name,
                                     continuous_update=False)
                   for name, v in zip(KNOBS, default)}
        rows = [W.HBox([s, W.HTML(f"<small>{KNOBS[name]}</small>")]) for name, s in sliders.items()]
        presets = {**{lb: self.setting(s) for lb, s in self.presets.items()},
                   **{lb: k for lb, k in self.shown}}
        menu = W.Dropdown(options=["(sliders)"] + list(presets), description="preset")
        button = W.Button(description="run", button_style="primary")
        message = W.HTML()
        images = [W.Image(format="png") for _ in range(3)]
        texts = [W.HTML() for _ in range(3)]
        heads = ["stage 1 layout", "mask used (last step)", "Layout-and-Retouch"]
        for s in sliders.values():
            s.add_class("lr-lambda")
        busy = [False]

        def current():
            return tuple(s.value for s in sliders.values())

        def draw(panel):
            for im, tx, img, part in zip(images, texts, panel.images(), ("layout", "mask", "image")):
                im.value = png(img, 3)
                tx.value = "<br>".join(html.escape(t) for t in panel.readings[part].splitlines())
            message.value = f"<b>{html.escape(self.describe(panel.setting))}</b>" + (
                f"<br><i>{html.escape(panel.note)}</i>" if panel.note else "")

        def show(run: bool, setting=None):
            try:
                key = self.setting(current() if setting is None else setting)
                if setting is not None:  # move the sliders there, without running twice
                    busy[0] = True
                    try:
                        for s, v in zip(sliders.values(), key):
                            s.value = v
                    finally:
                        busy[0] = False
                if key in self.cache or run:
                    return draw(self.run(key))
            except (ValueError, TypeError) as e:  # the config's own message, no traceback
                message.value = f"<span style='color:#b00020'>{html.escape(str(e))}</span>"
                return
            message.value = (f"{html.escape(self.describe(key))}: not computed yet, "
                             "press <b>run</b>")

        def on_slider(_):
            if not busy[0]:
                show(run=False)

        def on_preset(change):
            if change["new"] in presets:
                show(False, presets[change["new"]])

        for s in sliders.values():
            s.observe(on_slider, "value")
        menu.observe(on_preset, "value")
        button.on_click(lambda _: show(run=True))
        first = default if default in self.cache or not self.shown else self.shown[0][1]
        show(False, first)
        self._controls = dict(sliders=sliders, button=button, message=message, images=images,
                              readings=texts, preset=menu, show=show)
        columns = [W.VBox([W.HTML(f"<b>{h}</b>"), im, tx]) for h, im, tx in zip(heads, images, texts)]
        box = W.VBox([W.HTML(f"<code>{html.escape(self.prompt)}</code>, seed {self.seed}, "
                             f"{self.steps} steps"), *rows, W.HBox([menu, button]), message,
                      W.HBox(columns)])
        box.add_class("lr-lambda-controls")
        return box

    def show(self, setting, run: bool = True) -> None:
        """Show a setting in the widget (made by `widget()`), as if the sliders were moved
        there and run pressed; a setting the config classes refuse shows their message."""
        if not hasattr(self, "_controls"):
            raise RuntimeError("no widget yet: display controls.widget() first")
        self._controls["show"](run, setting)

    def to_figure(self, settings=None):
        """Static fallback: one row per precomputed setting (or the given ones, if cached):
        layout | mask used | Layout-and-Retouch, each with its reading under it."""
        from .viz import image_grid
        if settings is not None:
            shown = [(self.describe(k), k) for k in map(self.setting, settings)]
        else:
            shown = self.shown or [(self.describe(k), k) for k in self.cache]
        missing = [k for _, k in shown if k not in self.cache]
        if not shown or missing:
            raise ValueError(f"settings {missing or 'none'} not computed: precompute([...]) "
                             "first (to_figure runs nothing)")
        panels = [self.cache[k] for _, k in shown]
        heads = ["stage 1 layout", "mask used", "Layout-and-Retouch"]
        titles = [h if r == 0 else "" for r in range(len(panels)) for h in heads]
        fig = image_grid([im for p in panels for im in p.images()], titles, ncols=3, scale=1.9,
                         row_labels=[f"{lb}\n" + "{}/{}/{}".format(*k) for lb, k in shown],
                         suptitle=f"{self.prompt} (seed {self.seed}): lambda1 / lambda2 / "
                                  f"lambda3 of {self.steps} steps")
        for ax, (p, part) in zip(fig.axes, [(p, part) for p in panels
                                            for part in ("layout", "mask", "image")]):
            ax.set_xlabel(p.readings[part], fontsize=6)
        fig.tight_layout()
        return fig


def _toy_label(image: np.ndarray, prompt: str) -> str:
    from .toy.contact import label
    return label(image, prompt)
