"""Evaluation plots, drawn with matplotlib's object API (no pyplot, no global backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def evaluation_plots(m: dict, out: Path) -> list[str]:
    """accuracy_vs_alpha.png and accuracy_by_frequency.png from evaluate's metrics."""
    from matplotlib.figure import Figure
    cal = m["calibration"]
    pts = sorted((g["alpha"], g["accuracy"]) for g in m["grid"]
                 if g["k"] == cal["k"] and g["tau"] == cal["tau"] and g["beta"] == cal["beta"])
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(*zip(*pts, strict=True), marker="o", label=f"fused (k={cal['k']}, tau={cal['tau']})")
    ax.axhline(m["head_accuracy"], ls="--", c="gray", label="head only")
    ax.set_xlabel("alpha (weight of the head)")
    ax.set_ylabel("product accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_alpha.png", dpi=80)
    names = list(m["by_frequency"])
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for i, key in enumerate(("head", "knn", "fused")):
        ax.bar(np.arange(len(names)) + 0.27 * (i - 1), [m["by_frequency"][n][key] for n in names], 0.27, label=key)
    ax.set_xticks(range(len(names)), [f"{n}\n({m['by_frequency'][n]['products']})" for n in names])
    ax.set_xlabel("indexed products in the category")
    ax.set_ylabel("product accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_frequency.png", dpi=80)
    return [str(out / "accuracy_vs_alpha.png"), str(out / "accuracy_by_frequency.png")]
