"""Prediction: head probabilities fused with a kNN vote over the index, streamed into a Kaggle submission."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index import fuse, knn_vote

from .offsets import RecordReader, file_fingerprint, load_offsets
from .embed import ChunkStore, Timer, embed_products
from .images import DecodeStats
from .indexing import IndexBundle, open_index

log = logging.getLogger(__name__)
DEFAULTS = {"alpha": 0.5, "k": 20, "tau": 0.07}  # documented defaults when no calibration exists
SEARCH_BATCH = 2048  # faiss uses BLAS only for large query batches (~500+ at d=256)


@dataclass
class PredictReport:
    """What a prediction run did."""

    products: int = 0
    images: int = 0
    without_image: int = 0
    seconds: float = 0.0
    params: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    decode: str = ""


def calibration(bundle: IndexBundle) -> dict:
    """alpha, k, tau saved by ``evaluate`` in the run folder, else :data:`DEFAULTS`."""
    p = Path(bundle.manifest["run_dir"]) / "calibration.json"
    return {**DEFAULTS, **json.loads(p.read_text())} if p.exists() else dict(DEFAULTS)


def neighbour_labels(bundle: IndexBundle, emb: np.ndarray, k: int, has_image: np.ndarray) -> tuple[np.ndarray, ...]:
    """Top-k ``(sims [P, k], class labels [P, k])``; products without image get no neighbour (-1)."""
    sims, pos = bundle.index.search(emb, k)
    labels = np.where(pos >= 0, bundle.index.labels[np.maximum(pos, 0)], -1)
    labels[~has_image] = -1
    return sims, labels


def fallback_class(bundle: IndexBundle) -> int:
    """The most frequent category among indexed products (for products with no decodable image)."""
    lab = bundle.index.labels[bundle.index.labels >= 0]
    return int(np.bincount(lab).argmax()) if len(lab) else 0


def predict(test_path: str | Path, index_dir: str | Path, out_csv: str | Path, alpha: float | None = None,
            k: int | None = None, tau: float | None = None, tta_flip: bool = False, top: int = 0,
            scores_out: str | Path | None = None, batch_size: int = 256, workers: int = 2,
            chunk_products: int = 20_000) -> PredictReport:
    """Write ``_id,category_id`` for every product of ``test_path`` in file order.

    Work is saved per chunk of products in ``<out_csv>.parts/``; running again after an interruption
    resumes from the last finished chunk.
    """
    t_start = time.perf_counter()
    bundle = open_index(index_dir)
    params = calibration(bundle)
    params.update({n: v for n, v in (("alpha", alpha), ("k", k), ("tau", tau)) if v is not None})
    net, cats, _ = bundle.model
    test_path, out_csv = Path(test_path), Path(out_csv)
    table = load_offsets(test_path)
    reader = RecordReader(test_path, table)
    key = {"test": file_fingerprint(test_path), "index": bundle.manifest["checkpoint_sha256"],
           "count": len(bundle.index), "params": params, "tta_flip": tta_flip, "top": top, "chunk": chunk_products}
    store = ChunkStore(out_csv.with_name(out_csv.name + ".parts"), key)
    default = fallback_class(bundle)
    ids_of = np.asarray(cats.ids, np.int64)
    report, stats, timer = PredictReport(params=params), DecodeStats(), Timer()
    bar = tqdm(total=len(table), unit="products", desc="predict")
    n_parts = (len(table) + chunk_products - 1) // chunk_products
    for part in range(n_parts):
        rows = np.arange(part * chunk_products, min(len(table), (part + 1) * chunk_products))
        if not store.done(part):
            arrays = _predict_rows(bundle, net, reader, rows, params, default, top, batch_size, workers, tta_flip,
                                   stats, timer)
            store.write(part, **arrays)
        bar.update(len(rows))
    bar.close()
    n_written = _assemble(store, n_parts, table["product_id"], ids_of, out_csv, top, scores_out)
    if n_written != len(table):
        raise RuntimeError(f"wrote {n_written} rows for {len(table)} products")
    shutil.rmtree(store.folder)
    report.products, report.images = len(table), int(table["n_images"].sum())
    report.without_image = stats.products_without_image
    report.stages, report.decode = timer.seconds, stats.summary()
    report.seconds = time.perf_counter() - t_start
    if report.without_image:
        log.warning("%d products had no decodable image and were given the most frequent category %d",
                    report.without_image, ids_of[default])
    log.info("predicted %d products in %.1f s; %s", len(table), report.seconds, stats.summary())
    return report


def _decide(bundle: IndexBundle, outs: list, params: dict, n_classes: int, default: int, top: int,
            timer: Timer) -> dict[str, np.ndarray]:
    """Fused argmax (and top-N classes with scores) for a list of embedded batches, with one search."""
    t = time.perf_counter()
    emb, probs = np.concatenate([o.emb for o in outs]), np.concatenate([o.probs for o in outs])
    has = np.concatenate([o.n_images for o in outs]) > 0
    sims, labels = neighbour_labels(bundle, emb, int(params["k"]), has)
    t = timer.add("search", t)
    p = fuse(probs, knn_vote(sims, labels, n_classes, params["tau"]), params["alpha"])
    out = {"pred": np.where(has, p.argmax(1), default)}
    if top:
        order = np.argsort(-p, axis=1)[:, :top]
        out.update(top=order, scores=np.take_along_axis(p, order, 1))
    timer.add("fusion", t)
    return out


def _predict_rows(bundle: IndexBundle, net, reader: RecordReader, rows: np.ndarray, params: dict, default: int,
                  top: int, batch_size: int, workers: int, tta_flip: bool, stats: DecodeStats,
                  timer: Timer) -> dict[str, np.ndarray]:
    """Predictions for ``rows``; searches are buffered to >= SEARCH_BATCH products (FAISS's BLAS path)."""
    results, pending = [], []
    for o in embed_products(net, reader, rows, batch_size, workers, tta_flip, stats, timer):
        pending.append(o)
        if sum(len(x.rows) for x in pending) >= SEARCH_BATCH:
            results.append(_decide(bundle, pending, params, net.cfg.n_classes, default, top, timer))
            pending = []
    if pending:
        results.append(_decide(bundle, pending, params, net.cfg.n_classes, default, top, timer))
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def _assemble(store: ChunkStore, n_parts: int, product_ids: np.ndarray, ids_of: np.ndarray, out_csv: Path,
              top: int, scores_out: str | Path | None) -> int:
    tmp = out_csv.with_name(out_csv.name + ".tmp")
    n = 0
    with open(tmp, "w", newline="") as f:
        f.write("_id,category_id\n")
        sf = open(scores_out, "w") if scores_out and top else None
        for part in range(n_parts):
            z = store.read(part)
            pid = product_ids[n:n + len(z["pred"])]
            f.writelines(f"{i},{c}\n" for i, c in zip(pid.tolist(), ids_of[z["pred"]].tolist()))
            if sf:
                for i, t, s in zip(pid.tolist(), z["top"], z["scores"]):
                    sf.write(json.dumps({"_id": i, "top": [{"category_id": int(ids_of[c]), "score": round(float(v), 6)}
                                                            for c, v in zip(t, s)]}) + "\n")
            n += len(z["pred"])
        if sf:
            sf.close()
    tmp.replace(out_csv)
    return n


def read_submission(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(_id, category_id)`` arrays of a submission or labels CSV, checking its header."""
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r, None)
        if header != ["_id", "category_id"]:
            raise ValueError(f"{path}: header must be _id,category_id, got {header}")
        rows = np.array([(int(a), int(b)) for a, b in r], np.int64).reshape(-1, 2)
    return rows[:, 0], rows[:, 1]


def score_submission(submission: str | Path, labels: str | Path) -> float:
    """Product accuracy of a submission against a labels CSV with the same ids in the same order."""
    sid, scat = read_submission(submission)
    lid, lcat = read_submission(labels)
    if not np.array_equal(sid, lid):
        raise ValueError(f"{submission} and {labels} list different product ids")
    return float((scat == lcat).mean())
