"""Evaluation on held-out products: head, kNN and fused accuracy over a grid; saves the calibration."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from index import fuse, knn_vote

from .offsets import RecordReader, file_fingerprint, load_offsets
from .embed import embed_products
from .images import DecodeStats
from .indexing import open_index
from .predict import fallback_class, neighbour_labels

log = logging.getLogger(__name__)
ALPHAS = tuple(round(a, 2) for a in np.linspace(0, 1, 11))
KS = (5, 10, 20, 50)
TAUS = (0.02, 0.05, 0.07, 0.1)
BUCKETS = ((1, 10, "1-9"), (10, 100, "10-99"), (100, 1000, "100-999"), (1000, 10 ** 12, "1000+"))


def _eval_rows(bundle, val_path: str | Path | None) -> tuple[Path, np.ndarray, np.ndarray]:
    """(data file, offset table, rows to score); refuses rows whose products are in the index."""
    if val_path is None:
        run = Path(bundle.manifest["run_dir"])
        if bundle.manifest["split"] != "train":
            raise ValueError(f"{bundle.folder} was built with --split {bundle.manifest['split']}: it contains the "
                             "validation products. Build an evaluation index with --split train")
        path = Path(json.loads((run / "run_config.json").read_text())["train_path"])
        if file_fingerprint(path) != bundle.manifest["sources"][0]["fingerprint"]:
            raise ValueError(f"{path} changed since the index was built; rebuild the index")
        table = load_offsets(path)
        rows = np.load(run / "split.npz")["val_rows"]
    else:
        path = Path(val_path)
        table = load_offsets(path)
        rows = np.flatnonzero(table["category_id"] >= 0)
    if len(rows) == 0:
        raise ValueError(f"{path}: no labelled products to evaluate")
    overlap = np.isin(table["product_id"][rows], bundle.product_ids)
    if overlap.any():
        raise ValueError(f"the index {bundle.folder} contains {int(overlap.sum())} of the products being scored "
                         f"(e.g. _id {int(table['product_id'][rows][overlap][0])}); evaluate with an index of "
                         "training products only (build-index --split train)")
    return path, table, rows


def evaluate(index_dir: str | Path, val_path: str | Path | None = None, out_dir: str | Path | None = None,
             batch_size: int = 256, workers: int = 2, max_products: int = 20_000, seed: int = 0) -> dict:
    """Score the run's validation split (or a labelled file); write metrics.json, plots and calibration.json."""
    bundle = open_index(index_dir)
    net, cats, _ = bundle.model
    path, table, rows = _eval_rows(bundle, val_path)
    if len(rows) > max_products:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_products, replace=False))
    y = cats.encode(table["category_id"][rows])
    embs, probs, n_img, img_ok = [], [], [], []
    stats = DecodeStats()
    start = 0
    for o in embed_products(net, RecordReader(path, table), rows, batch_size, workers, stats=stats):
        embs.append(o.emb), probs.append(o.probs), n_img.append(o.n_images)
        img_ok.append(o.image_pred == y[start + o.image_owner])
        start += len(o.rows)
    emb, p_head, n_img = np.concatenate(embs), np.concatenate(probs), np.concatenate(n_img)
    has = n_img > 0
    default = fallback_class(bundle)
    sims, labels = neighbour_labels(bundle, emb, max(KS), has)

    def acc(p: np.ndarray) -> float:
        return float((np.where(has, p.argmax(1), default) == y).mean())

    grid, best = [], (-1.0, None)
    knn_cache = {(k, t): knn_vote(sims, labels, len(cats), t, k) for k in KS for t in TAUS}
    for (k, t), p_knn in knn_cache.items():
        for a in ALPHAS:
            r = acc(fuse(p_head, p_knn, a))
            grid.append({"alpha": a, "k": k, "tau": t, "accuracy": r})
            if r > best[0]:
                best = (r, {"alpha": float(a), "k": k, "tau": t})
    cal = best[1]
    p_best = fuse(p_head, knn_cache[(cal["k"], cal["tau"])], cal["alpha"])
    pred = np.where(has, p_best.argmax(1), default)
    top5 = np.argsort(-p_best, 1)[:, :5]
    l1, l2 = cats.parents()
    knn_only = max((g for g in grid if g["alpha"] == 0), key=lambda g: g["accuracy"])
    head_pred = np.where(has, p_head.argmax(1), default)
    counts = np.bincount(bundle.index.labels[bundle.index.labels >= 0], minlength=len(cats))[y]
    buckets = {}
    for lo, hi, name in BUCKETS:
        m = (counts >= lo) & (counts < hi)
        if m.any():
            buckets[name] = {"products": int(m.sum()), "head": float((head_pred == y)[m].mean()),
                             "knn": float((knn_cache[(knn_only["k"], knn_only["tau"])].argmax(1) == y)[m].mean()),
                             "fused": float((pred == y)[m].mean())}
    img_ok = np.concatenate(img_ok)
    metrics = {
        "products": int(len(rows)), "images": int(n_img.sum()), "source": str(path),
        "head_accuracy": acc(p_head), "knn_accuracy": knn_only["accuracy"],
        "knn_best": {"k": knn_only["k"], "tau": knn_only["tau"]}, "fused_accuracy": best[0], "calibration": cal,
        "fused_top5_accuracy": float((top5 == y[:, None]).any(1).mean()),
        "level1_accuracy": float((l1[pred] == l1[y]).mean()), "level2_accuracy": float((l2[pred] == l2[y]).mean()),
        "image_accuracy": float(img_ok.mean()) if len(img_ok) else 0.0, "by_frequency": buckets,
        "decode": stats.summary(), "grid": grid}
    run = Path(bundle.manifest["run_dir"])
    (run / "calibration.json").write_text(json.dumps({**cal, "val_fused_accuracy": best[0]}))
    out = Path(out_dir) if out_dir else run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    metrics["plots"] = _plots(metrics, out)
    log.info("head %.4f, kNN %.4f, fused %.4f (alpha=%s, k=%s, tau=%s)", metrics["head_accuracy"],
             metrics["knn_accuracy"], best[0], cal["alpha"], cal["k"], cal["tau"])
    return metrics


def _plots(m: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cal = m["calibration"]
    pts = sorted((g["alpha"], g["accuracy"]) for g in m["grid"] if g["k"] == cal["k"] and g["tau"] == cal["tau"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*pts), marker="o", label=f"fused (k={cal['k']}, tau={cal['tau']})")
    ax.axhline(m["head_accuracy"], ls="--", c="gray", label="head only")
    ax.set_xlabel("alpha (weight of the head)")
    ax.set_ylabel("product accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_alpha.png", dpi=80)
    plt.close(fig)
    names = list(m["by_frequency"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, key in enumerate(("head", "knn", "fused")):
        ax.bar(np.arange(len(names)) + 0.27 * (i - 1), [m["by_frequency"][n][key] for n in names], 0.27, label=key)
    ax.set_xticks(range(len(names)), [f"{n}\n({m['by_frequency'][n]['products']})" for n in names])
    ax.set_xlabel("indexed products in the category")
    ax.set_ylabel("product accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_frequency.png", dpi=80)
    plt.close(fig)
    return [str(out / "accuracy_vs_alpha.png"), str(out / "accuracy_by_frequency.png")]
