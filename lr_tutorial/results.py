"""Merge an evaluation folder's per-sample rows into tables (CSV, Markdown) and plots.

Table rows: one per variant and prompt category, plus category "all". Columns, means over the
samples (diversity: over the prompts, each computed among that prompt's seeds):
- ShapeWorld (toy.report.summarize): fidelity (per image, the share of stated attributes
  satisfied), fid_<attribute>, identity, found (share with an object), centroid_spread /
  area_spread (layout diversity per prompt, metrics.layout_diversity), centroid_spread_free (the same over prompts that state no
  position: where the layout is free and diversity is wanted), position_max_share (over those
  prompts, the share of the most frequent position read by the oracle: 1 = layout collapse).
- Real images: i_dino, i_clip, t_clip, dino_diversity (metrics.pairwise_diversity), and the
  layout spreads from the methods' subject masks.
Plots: plots/metrics_by_method.png (each metric per method) and plots/lambda1_tradeoff.png
(fidelity vs identity along the lambda1 sweep).
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import metrics
from .files import atomic_file, write_bytes_atomic

ATTRS = ("shape", "colour", "size", "position", "background")
TOY_COLUMNS = ("fidelity", *(f"fid_{a}" for a in ATTRS), "identity", "found", "centroid_spread",
               "area_spread", "centroid_spread_free", "position_max_share")
REAL_COLUMNS = ("i_dino", "i_clip", "t_clip", "dino_diversity", "centroid_spread", "area_spread")


def load_rows(out: str | Path, variants: list[str] | None = None) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(Path(out).glob("samples/**/*.json"))]
    if variants is not None:
        order = {v: i for i, v in enumerate(variants)}
        rows = sorted((r for r in rows if r["variant"] in order),
                      key=lambda r: (order[r["variant"]], r["subject"], r["prompt_index"], r["seed"]))
    return rows


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.mean(v)), 4) if v else None


def _per_prompt(rows: list[dict]) -> list[list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["subject"], r["prompt_index"])].append(r)
    return list(groups.values())


def summarize(rows: list[dict]) -> dict:
    """The table's columns for one group of rows."""
    out = {"images": len(rows), "prompts": len(_per_prompt(rows))}
    if rows and "match" in rows[0]:  # ShapeWorld oracle rows: toy.report's summary
        s = metrics.toy_summary(rows)
        out["fidelity"] = _mean(r["fidelity"] for r in rows)
        out.update({f"fid_{a}": s["fidelity"].get(a) for a in ATTRS})
        out["identity"], out["found"] = s["identity"], s["found"]
        out["position_max_share"] = s["position_max_share"]
    for k in ("i_dino", "i_clip", "t_clip"):
        if rows and k in rows[0]:
            out[k] = _mean(r[k] for r in rows)
    groups = _per_prompt(rows)
    if rows and "dino" in rows[0]:
        out["dino_diversity"] = _mean(metrics.pairwise_diversity([r["dino"] for r in g])
                                      for g in groups)
    if rows and "layout" in rows[0]:
        div = [metrics.layout_diversity([r["layout"] for r in g]) for g in groups]
        out["centroid_spread"] = _mean(d["centroid_spread"] for d in div)
        out["area_spread"] = _mean(d["area_spread"] for d in div)
        if "stated" in rows[0]:
            free = [d for d, g in zip(div, groups) if g[0]["stated"]["position"] is None]
            out["centroid_spread_free"] = _mean(d["centroid_spread"] for d in free)
    out["seconds_per_image"] = _mean(r.get("elapsed_s") for r in rows)
    return out


def table(rows: list[dict]) -> list[dict]:
    """One row per (variant, category), plus category "all", in the rows' variant order."""
    by = defaultdict(list)
    order = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
        by[(r["variant"], r["category"])].append(r)
        by[(r["variant"], "all")].append(r)
    cats = sorted({c for _, c in by if c != "all"})
    out = []
    for v in order:
        for c in ["all", *cats] if len(cats) > 1 else ["all"]:
            g = by.get((v, c))
            if g:
                out.append({"variant": v, "method": g[0]["method"], "lambda1": g[0]["lambda1"],
                            "category": c, **summarize(g)})
    return out


def _columns(tab: list[dict]) -> list[str]:
    keys = ["variant", "method", "lambda1", "category", "images", "prompts"]
    for c in (*TOY_COLUMNS, *REAL_COLUMNS, "seconds_per_image"):
        if any(c in t for t in tab) and c not in keys:
            keys.append(c)
    return keys


def markdown(tab: list[dict]) -> str:
    cols = _columns(tab)
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(t.get(c)) for c in cols) + " |" for t in tab]
    return "\n".join(lines) + "\n"


def write(out: str | Path, spec=None, variants: list[str] | None = None) -> list[dict]:
    """results.csv, results.md, rows.csv (one line per sample) and plots/ in `out`."""
    out = Path(out)
    rows = load_rows(out, variants)
    tab = table(rows)
    cols = _columns(tab)
    _write_csv(out / "results.csv", cols, tab)
    flat = ["key", "variant", "method", "lambda1", "subject", "prompt_index", "category", "prompt",
            "seed", "fidelity", "identity", "i_dino", "i_clip", "t_clip", "elapsed_s"]
    _write_csv(out / "rows.csv", [c for c in flat if any(c in r for r in rows)], rows)
    title = f"# {spec.name if spec else out.name}: {len(rows)} samples\n\n"
    write_bytes_atomic(out / "results.md", (title + markdown(tab)).encode("utf-8"))
    if tab:
        plot(tab, out / "plots")
    return tab


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """A CSV file written whole or not at all (files.write_bytes_atomic)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


def plot(tab: list[dict], folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    toy = "fidelity" in tab[0]
    keys = (["fidelity", "identity", "centroid_spread_free", "area_spread"] if toy
            else ["i_dino", "i_clip", "t_clip", "dino_diversity"])
    keys = [k for k in keys if any(t.get(k) is not None for t in tab)]
    main = [t for t in tab if "@" not in t["variant"]]
    cats = sorted({t["category"] for t in main}, key=lambda c: (c != "all", c))
    names = list(dict.fromkeys(t["variant"] for t in main))
    paths = []
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        width = 0.8 / len(cats)
        for j, c in enumerate(cats):
            vals = [next((t.get(k) for t in main if t["variant"] == n and t["category"] == c), None)
                    for n in names]
            ax.bar(np.arange(len(names)) + j * width, [np.nan if v is None else v for v in vals],
                   width, label=c)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(k)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "metrics_by_method.png")
    with atomic_file(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    tradeoff(tab, ax)
    fig.tight_layout()
    paths.append(folder / "lambda1_tradeoff.png")
    with atomic_file(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return paths


def tradeoff(tab: list[dict], ax, x: str | None = None, y: str | None = None) -> None:
    """Draw prompt fidelity (x) against identity (y) along the lambda1 sweep on `ax`: one line
    per swept method (stage1, layout_and_retouch), points labelled lambda1 / N, and the
    vanilla and personalized models as stars. Defaults: fidelity / identity (ShapeWorld),
    t_clip / i_dino (real images)."""
    toy = "fidelity" in tab[0]
    x = x or ("fidelity" if toy else "t_clip")
    y = y or ("identity" if toy else "i_dino")
    allc = [t for t in tab if t["category"] == "all" and t.get(x) is not None]
    for m in ("stage1", "layout_and_retouch"):
        pts = sorted({t["lambda1"]: t for t in allc if t["method"] == m}.values(),
                     key=lambda t: t["lambda1"])  # the default variant repeats a sweep point
        if len(pts) > 1:
            ax.plot([t[x] for t in pts], [t[y] for t in pts], "o-", label=m)
            for t in pts:
                ax.annotate(f"{t['lambda1']:g}", (t[x], t[y]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    for t in allc:
        if t["method"] in ("vanilla", "personalized"):
            ax.plot(t[x], t[y], "*", ms=12, label=t["method"])
    ax.set_xlabel(f"{x} (prompt fidelity)")
    ax.set_ylabel(f"{y} (identity)")
    ax.set_title("trade-off along lambda1 (labels: lambda1 / N)")
    ax.legend(fontsize=7)


def read_table(path: str | Path) -> list[dict]:
    """A results.csv written by `write`, back as table rows (numbers parsed, empty cells None)."""
    def parse(v: str):
        if v == "":
            return None
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v
    with open(path, newline="") as f:
        return [{k: (v if k in ("variant", "method", "category") else parse(v))
                 for k, v in r.items()} for r in csv.DictReader(f)]
