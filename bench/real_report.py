"""bench_real's plot and its table by category size (with 95% Wilson intervals, and accuracy re-weighted to the
training skew where the test set does not follow it, as on bench/grocery_tail.py's set)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import harness
import numpy as np

import retrieval.infer.scoring.calibrate as calibrate_module
from retrieval.data.offsets import load_offsets
from retrieval.infer.evaluate import BUCKETS

KEYS = (("head", "head"), ("knn", "kNN"), ("ncm", "nearest class mean"), ("crt", "cRT"),
        ("knn_p05", "kNN / size^0.5"), ("knn_p1", "kNN / size"),
        ("fused_noproto", "fused, no peers, no prototype vote"), ("fused_np", "fused, no peers"), ("fused", "fused"))


@contextmanager
def grid_gammas(values: tuple[float, ...]):
    """The grid's prototype vote weights ``evaluate`` chooses among, for an ablation only (put back on exit)."""
    shipped = calibrate_module.GAMMAS
    calibrate_module.GAMMAS = values
    try:
        yield
    finally:
        calibrate_module.GAMMAS = shipped


def plot(work: Path, runs: dict[int, dict], base: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [runs[e]["minutes"] for e in sorted(runs)]
    for key, label in (("head", "head"), ("knn", "kNN"), ("fused_np", "fused, no peers"), ("fused", "fused")):
        ax.plot(xs, [runs[e][key].mean() for e in sorted(runs)], "o-", label=f"fine-tuned {label}")
    for key, label, style in (("lp", "linear probe (frozen)", "--"), ("knn", "kNN (frozen)", ":")):
        ax.axhline(base[key].mean(), color="grey", linestyle=style, label=label)
    for e, x in zip(sorted(runs), xs, strict=True):
        ax.annotate(f"{e} ep", (x, runs[e]["fused"].mean()), textcoords="offset points", xytext=(0, 6), fontsize=8)
    ax.set(xlabel="training minutes (2 CPU cores)", ylabel="test product accuracy", title="Grocery Store, real photos")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = work / "accuracy_vs_minutes.png"
    fig.savefig(out, dpi=110)
    return out


def by_size_table(data: Path, qy: np.ndarray, base: dict, runs: dict[int, dict], budgets: list[int]) -> None:
    """Test accuracy by the number of training products of the true category, each with its 95% Wilson
    interval: the frozen probe, then every classifier per budget; a first block over all test products weighted
    to the training skew (each product by its class's share of train.bson over its share of test.bson: 1 where
    test follows the training skew); and the fusion rule evaluate chose."""
    ids, n = np.unique(load_offsets(data / "train.bson", progress=False)["category_id"], return_counts=True)
    size = dict(zip(ids.tolist(), n.tolist(), strict=True))
    counts = np.array([size.get(int(c), 0) for c in qy])
    t_ids, t_n = np.unique(qy, return_counts=True)
    test_share = dict(zip(t_ids.tolist(), (t_n / len(qy)).tolist(), strict=True))
    skew = np.array([size.get(int(c), 0) / n.sum() / test_share[int(c)] for c in qy])
    cells = [("probe", base["lp"])] + [(f"{label} {e} ep", runs[e][key]) for e in budgets for key, label in KEYS
                                       if key in runs[e]]
    rows = [("all, at the training skew", len(qy), what, round(float(np.average(c, weights=skew)), 4),
             harness.interval(*harness.wilson_weighted(c, skew))) for what, c in cells]
    for lo, hi, name in BUCKETS:
        m = (counts >= lo) & (counts < hi)
        if m.any():
            rows += [(name, int(m.sum()), what, round(float(c[m].mean()), 4),
                      harness.interval(*harness.proportion(c[m])[1:])) for what, c in cells]
    harness.table(rows, ("training products in category", "test products", "what", "accuracy",
                              "95% interval"))
    for e in budgets:
        fu = runs[e]["fusion"]
        print(f"  {e} epochs: fusion chosen on val.bson: {fu.get('chosen', fu['rule'])} "
              f"(cross-validated {json.dumps({k: round(v, 4) for k, v in fu.get('cv', {}).items()})})")
