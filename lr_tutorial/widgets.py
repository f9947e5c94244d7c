"""Notebook explorers on core ipywidgets, each with a static fallback (`to_figure`).

TimestepScrubber(result, bundle): a step slider with a Play button; for the chosen step and for
every branch (reference, context, target) it shows the latent preview, the predicted x0, the
class-token cross-attention overlay (layer resolution or mean, head or mean) and the mask; for
the target also the blended latent. Every frame is precomputed as PNG bytes (or cached on first
view), so moving the slider only swaps images.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from . import sampling
from .preview import linear_preview
from .viz import overlay

BRANCHES = ("reference", "context", "target")
KINDS = ("latent", "x0", "attention", "mask")


def png(img: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image
    im = Image.fromarray(img)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


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
        return cls(n, lat, x0, att, masks, layers, start, tokens, default, rs)

    tokens: list[str] = None
    default_token: int = 0
    reference_start: int = 0  # the reference branch's first step (its inversion's stop)

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


class TimestepScrubber:
    """`TimestepScrubber(result, bundle).widget()` in a live notebook; `.to_figure()` elsewhere."""

    def __init__(self, result, bundle, index: int = 0, scale: int = 3):
        self.data = ScrubData.from_result(result, bundle, index)
        self.bundle, self.scale = bundle, scale
        self.prompt = result.prompts[index]

    @lru_cache(maxsize=4096)
    def frame(self, branch: str, kind: str, step: int, layer: str = "mean", token: int | None = None,
              head: str | int = "mean") -> np.ndarray:
        d = self.data
        if branch == "reference" and step < d.reference_start:  # not inverted this far
            return d.x0[branch][step]  # the grey frame
        if kind == "latent":
            img = linear_preview(self.bundle, d.latents[branch][step:step + 1],
                                 upscale=d.x0[branch].shape[1] // d.latents[branch].shape[-1])[0]
        elif kind == "x0":
            img = d.x0[branch][step]
        elif kind == "attention":
            a = d.attention_map(branch, step, layer, token, head)
            base = d.x0[branch][step]
            img = base if a is None else overlay(base, a, (255, 200, 0), 0.6)
        elif kind == "mask":
            base = d.x0[branch][step]
            img = overlay(base, d.masks[step]) if branch == "target" else base
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return img

    def widget(self):
        import ipywidgets as W

        d = self.data
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
        images = {(br, kd): W.Image(format="png") for br in BRANCHES for kd in KINDS}
        # stable DOM hooks for browser tests and custom CSS: .lr-scrubber, .lr-step, .lr-target-x0
        slider.add_class("lr-step")
        for (br, kd), im in images.items():
            im.add_class(f"lr-{br}-{kd}")

        def update(*_):
            for (br, kd), im in images.items():
                im.value = png(self.frame(br, kd, slider.value, layer.value, token.value,
                                          head.value), self.scale)

        for w in (slider, layer, token, head):
            w.observe(update, "value")
        update()
        header = [W.HTML(f"<b>{k}</b>") for k in ("", *KINDS)]
        cells = header + [c for br in BRANCHES for c in
                          [W.HTML(f"<b>{br}</b>")] + [images[(br, kd)] for kd in KINDS]]
        grid = W.GridBox(cells, layout=W.Layout(grid_template_columns="90px repeat(4, auto)"))
        self._controls = dict(play=play, slider=slider, layer=layer, token=token, head=head,
                              images=images)
        box = W.VBox([W.HTML(f"<code>{self.prompt}</code>"), W.HBox([play, slider]),
                      W.HBox([layer, token, head]), grid])
        box.add_class("lr-scrubber")
        return box

    def to_figure(self, steps=None):
        """Static fallback: rows = branch x kind, columns = a few steps."""
        from .viz import image_grid
        d = self.data
        steps = steps if steps is not None else np.linspace(0, d.steps - 1, 6).round().astype(int)
        imgs, titles = [], []
        for br in BRANCHES:
            for kd in KINDS:
                for s in steps:
                    imgs.append(self.frame(br, kd, int(s)))
                    titles.append(f"{br} {kd} k={s}")
        return image_grid(imgs, titles, ncols=len(steps), scale=1.2, suptitle=self.prompt)


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
