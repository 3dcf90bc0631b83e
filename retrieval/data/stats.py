"""Exploration of a BSON file: counts per level and log-scale histograms, streamed from the offset scan."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .categories import CategoryTable
from .offsets import load_offsets

log = logging.getLogger(__name__)


@dataclass
class FileStats:
    """Counts describing one BSON file."""

    products: int
    images: int
    images_per_product: dict[int, int]
    categories: dict[str, int]
    largest: list[tuple[int, int, str]] = field(default_factory=list)
    smallest: list[tuple[int, int, str]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"products: {self.products:,}", f"images:   {self.images:,}",
                 "images per product: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.images_per_product.items()))]
        lines += [f"distinct categories ({k}): {v:,}" for k, v in self.categories.items()]
        for title, rows in (("largest", self.largest), ("smallest", self.smallest)):
            lines.append(f"{title} categories:")
            lines += [f"  {cid}  {n:>8,}  {name}" for cid, n, name in rows]
        lines += [f"plot: {p}" for p in self.plots]
        return "\n".join(lines)


def _hist(counts: np.ndarray, title: str, xlabel: str, path: Path) -> Path:
    """A log-log histogram (log-spaced bins, plain-number ticks)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    bins = np.logspace(0, np.log10(counts.max() + 1), 30) if counts.max() > 1 else np.array([0.5, 1.5])
    ax.hist(counts, bins=bins)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_title(title)
    ax.set_xlabel(xlabel + " (log scale)")
    ax.set_ylabel("number of categories (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def _bars(per: dict[int, int], path: Path) -> Path:
    """Images per product as a plain bar chart."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    keys = sorted(per)
    ax.bar(keys, [per[k] for k in keys])
    ax.set_xticks(keys)
    ax.set_title("images per product")
    ax.set_xlabel("images in the product")
    ax.set_ylabel("products")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def file_stats(path: str | Path, categories: CategoryTable | None = None, out_dir: str | Path | None = None,
               top: int = 5, progress: bool = True) -> FileStats:
    """Count products, images and categories of ``path``; write PNG plots into ``out_dir``."""
    table = load_offsets(path, progress=progress)
    n_img = table["n_images"].astype(np.int64)
    per = Counter(n_img.tolist())
    labelled = table["category_id"] >= 0
    cat_counts = Counter(table["category_id"][labelled].tolist())
    levels: dict[str, Counter] = {"id": cat_counts}
    names: dict[int, str] = {}
    if categories is not None and cat_counts:
        cls = categories.encode(list(cat_counts), source=str(path))
        for cid, c in zip(cat_counts, cls, strict=True):
            names[cid] = " > ".join(s.strip() for s in categories.names[c])
        levels["level1"], levels["level2"], levels["level3"] = Counter(), Counter(), Counter()
        for cid, c in zip(cat_counts, cls, strict=True):
            l1, l2, l3 = categories.names[c]
            levels["level1"][l1] += cat_counts[cid]
            levels["level2"][l2] += cat_counts[cid]
            levels["level3"][(l1, l2, l3)] += cat_counts[cid]
    ranked = cat_counts.most_common()
    st = FileStats(len(table), int(n_img.sum()), dict(per), {k: len(v) for k, v in levels.items()},
                   [(c, n, names.get(c, "")) for c, n in ranked[:top]],
                   [(c, n, names.get(c, "")) for c, n in ranked[::-1][:top]])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for k, v in levels.items():
            if v:
                st.plots.append(_hist(np.array(list(v.values())), f"products per category ({k})",
                                      "products in the category", out / f"products_per_category_{k}.png"))
        st.plots.append(_bars(dict(per), out / "images_per_product.png"))
    return st
