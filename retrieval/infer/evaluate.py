"""Evaluation on held-out products: head, kNN and fused accuracy over a grid; saves the calibration.

Streams: each product keeps only its candidate classes (:class:`Candidates`), never a dense ``[N, C]`` row,
so the whole validation split can be scored at 5,270 classes.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import DecodeStats
from ..data.offsets import RecordReader, file_fingerprint, load_offsets
from ..durable import write_json
from ..errors import UserError
from ..model.runtime import is_first_rank
from ..model.runtimes import check_runtime
from .held_out import CANDIDATE_FIELDS, GROUP, has_head_inputs, held_out_segment, score_part, stored_parts
from .indexdir.bundle import IndexBundle, check_source, open_index
from .pipeline.embed import LoaderSettings
from .pipeline.parts import PartWork, numbered, run_parts
from .pipeline.store import PartStore
from .plots import evaluation_plots
from .scoring.calibrate import calibrate
from .scoring.candidates import Candidates
from .scoring.fused import FusedClassifier
from .scoring.peers import PEER_KS, PeerSettings, choose_peers, peer_graph, propagate
from .scoring.sample import sample_rows
from .scoring.streamed import gather, score_parts

log = logging.getLogger(__name__)
BUCKETS = ((1, 10, "1-9"), (10, 100, "10-99"), (100, 1000, "100-999"), (1000, 10 ** 12, "1000+"))


def _eval_rows(bundle: IndexBundle, val_path: str | Path | None) -> tuple[Path, np.ndarray, np.ndarray]:
    """(data file, offset table, rows to score); refuses rows whose products are in the index."""
    if val_path is None:
        if bundle.manifest.split != "train" and \
                bundle.loaded.info.get("train_file") != bundle.manifest.sources[0].fingerprint:
            raise UserError(f"{bundle.folder} does not index the run's training file; evaluate a labelled file "
                            "(evaluate --index IDX VAL.bson) or build an index with --split train")
        path = check_source(bundle, 0)  # the indexed training file (resolved from the folder, unchanged)
        table, rows = load_offsets(path), bundle.run.split().val_rows
    else:
        path = Path(val_path)
        table = load_offsets(path)
        rows = np.flatnonzero(table["category_id"] >= 0)
    if len(rows) == 0:
        raise UserError(f"{path}: no labelled products to evaluate")
    overlap = np.isin(table["product_id"][rows], bundle.live_product_ids)  # removed ones are not in the index
    if overlap.any() and val_path is None:
        raise UserError(f"{bundle.folder} was built before one build served evaluate: it contains the run's "
                        f"validation products ({int(overlap.sum())} of {len(rows)}) among the others. Rebuild it with "
                        "build-index --restart (they then form a held-out segment evaluate leaves out, and nothing is "
                        "embedded twice), or build one with --split train")
    if overlap.any():
        raise UserError(f"the index {bundle.folder} contains {int(overlap.sum())} of the products being scored "
                        f"(e.g. _id {int(table['product_id'][rows][overlap][0])}); evaluate with an index of "
                        "training products only (build-index --split train)")
    return path, table, rows


def _embed_parts(bundle: IndexBundle, path: Path, table: np.ndarray, rows: np.ndarray, loader: LoaderSettings,
                 scratch: Path, part_products: int
                 ) -> tuple[PartStore, list[int], DecodeStats, np.ndarray] | None:
    """Embed ``rows`` part by part through the part driver into ``scratch`` (each part: its candidates, head
    argmax, per-image correctness and embeddings); returns the store, the products per part, the decode counts
    and the products' classes, or None on a rank other than 0 of a distributed run."""
    parts = numbered(rows, part_products)
    y = bundle.categories.encode(table["category_id"][rows])
    cls_of = {int(r): int(v) for r, v in zip(rows, y, strict=True)}
    key = {"model": bundle.manifest.model_sha256, "count": len(bundle.vectors), "data": file_fingerprint(path),
           "rows": hashlib.sha1(rows.tobytes()).hexdigest(), "mirror": bundle.manifest.mirror,
           "with": "emb+size+proto+only",
           "runtime": bundle.runtime}
    store = PartStore(scratch, key, restart=is_first_rank())
    work = PartWork(lambda outs: score_part(bundle, outs, np.array([cls_of[int(r)] for o in outs for r in o.rows])),
                    group=GROUP, desc="evaluate")
    stats = run_parts(bundle.net, bundle.manifest.mirror, RecordReader(path, table), parts, store, work, loader)
    return None if stats is None else (store, [len(r) for _, r in parts], stats, y)


def _read_candidates(store: PartStore, part: int) -> Candidates:
    g = store.read(part, CANDIDATE_FIELDS)
    return Candidates(**{k: g[k] for k in CANDIDATE_FIELDS})


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an accuracy of ``hits`` out of ``n``."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - half) / (1 + z * z / n)), float((centre + half) / (1 + z * z / n))


def _buckets(counts: np.ndarray, y: np.ndarray, preds: dict[str, np.ndarray]) -> dict:
    """Accuracy of each predictor in ``preds`` by the number of indexed products of the true category, each with
    its 95% Wilson interval (``<name>_interval``): the small buckets hold few products."""
    out = {}
    for lo, hi, name in BUCKETS:
        m = (counts >= lo) & (counts < hi)
        if m.any():
            out[name] = {"products": int(m.sum())}
            for k, p in preds.items():
                hits = int((p == y)[m].sum())
                out[name][k], out[name][f"{k}_interval"] = hits / int(m.sum()), wilson(hits, int(m.sum()))
    return out


@dataclass(frozen=True)
class EvaluateSettings:
    """How evaluate runs: ``part_products`` per scored part, an optional random sample of ``max_products``
    (``seed``), and the ``runtime`` that embeds pictures where they are embedded (default: the index's own)."""

    part_products: int = 16_384
    max_products: int | None = None
    seed: int = 0
    runtime: str | None = None

    def __post_init__(self) -> None:
        if self.part_products < 1 or (self.max_products is not None and self.max_products < 1):
            raise UserError("part size and max products must be at least 1")
        check_runtime(self.runtime)


def evaluate(index_dir: str | Path, val_path: str | Path | None = None, out_dir: str | Path | None = None,
             loader: LoaderSettings = LoaderSettings(), settings: EvaluateSettings = EvaluateSettings()
             ) -> dict | None:
    """Score the run's validation split (or a labelled file); write metrics.json, plots and calibration.json.
    Streamed: parts are scored one at a time and the fusion is calibrated on a random sample of at most
    :data:`~.scoring.sample.SAMPLE_CAP` products, so memory holds a few numbers per product at any size.
    With ``loader.where`` over several devices/nodes, rank 0 scores and returns the metrics, other ranks None."""
    part_products, max_products, seed, runtime = (settings.part_products, settings.max_products, settings.seed,
                                                  settings.runtime)
    bundle = open_index(index_dir, mmap=True, runtime=runtime, hold_out=val_path is None)
    bundle.refuse_runtime_on(loader.distributed)
    frozen = bundle.run.read_frozen_baseline()  # read before any work: a damaged one is refused at once
    cats = bundle.categories
    out = Path(out_dir) if out_dir else bundle.run.path / "eval"
    held = held_out_segment(bundle) if val_path is None else None
    path_embedded = held is None or not has_head_inputs(held)
    if not path_embedded:  # the build stored what is needed: no picture is read, no network runs but the head
        if not is_first_rank():
            return None
        path, (store, sizes, stats, y) = bundle.manifest.sources[0].path, stored_parts(bundle, held, out / "parts",
                                                                                         max_products, seed)
    else:  # pictures embedded here: a labelled file, or an index without stored head inputs
        path, table, rows = _eval_rows(bundle, val_path)
        if max_products is not None and len(rows) > max_products:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_products, replace=False))
        found = _embed_parts(bundle, path, table, rows, loader, out / "parts", part_products)
        if found is None:
            return None
        store, sizes, stats, y = found
    fallback = bundle.fallback_class
    small = [store.read(p, ("head_pred", "img_ok", "n_images")) for p in range(len(sizes))]
    has_image = np.concatenate([g["n_images"] for g in small]) > 0
    head_pred = np.where(has_image, np.concatenate([g["head_pred"] for g in small]), fallback)
    img_ok = np.concatenate([g["img_ok"] for g in small])
    del small
    sample = sample_rows(len(y), seed)
    counts = np.bincount(bundle.vectors.labels[bundle.vectors.labels >= 0], minlength=len(cats))[y]
    cal = calibrate(gather(lambda p: _read_candidates(store, p), sizes, sample), y[sample], fallback, seed)
    clf, grid = cal.classifier, cal.grid
    knn_only, no_dup = cal.best(alpha=0.0, beta=0.0, gamma=0.0), cal.best(beta=0.0)
    knn_clf = FusedClassifier(0.0, knn_only["k"], knn_only["tau"], 0.0, fallback)
    no_dup_clf = FusedClassifier(no_dup["alpha"], no_dup["k"], no_dup["tau"], 0.0, fallback, cal.temperature,
                                 gamma=no_dup["gamma"])
    sc = score_parts(lambda p: _read_candidates(store, p), len(sizes), clf, knn_clf, no_dup_clf, PeerSettings().keep)
    blocks = [np.load(PartStore.embeddings_file(store.folder, p), mmap_mode="r") for p in range(len(sizes))]
    graph = peer_graph(blocks, has_image, max(PEER_KS))
    peers, peer_grid = choose_peers(sc.classes, sc.probs, graph, blocks, has_image, y, seed)
    plain = propagate(sc.classes, sc.probs, graph, PeerSettings())[0]  # mu 0: the first stage, as predict writes it
    without_peers = float((plain[:, 0] == y).mean())
    top5 = (propagate(sc.classes, sc.probs, graph, peers)[0] if peers.on else plain)[:, :5]
    del blocks
    shutil.rmtree(store.folder)
    pred = top5[:, 0]
    fused_acc = float((pred == y).mean())
    l1, l2 = cats.parents()
    metrics = {
        "products": int(len(y)), "images": int(stats.decoded), "source": str(path),
        "embedded": "by evaluate" if path_embedded else "stored by build-index (no forward pass)",
        "calibration_products": int(len(sample)),
        "head_accuracy": float((head_pred == y).mean()), "knn_accuracy": float((sc.knn == y).mean()),
        "knn_best": {"k": knn_only["k"], "tau": knn_only["tau"]}, "fused_accuracy": fused_acc,
        "fusion": {"rule": clf.rule, "chosen": cal.chosen, "cv": cal.cv, "cv_grid": cal.cv_grid,
                   "cv_learnt": cal.cv_learnt, "temperature": cal.temperature,
                   "cv_by_frequency": _buckets(counts[sample], y[sample], cal.oof)},
        "peers": {**peers.params(), "fused_without_peers_accuracy": without_peers, "grid": peer_grid,
                  "graph": graph.cost},
        "frozen_baseline": frozen,
        "fused_without_duplicates_accuracy": float((sc.no_dup == y).mean()),
        "duplicate_coverage": float(sc.has_dup.mean()),
        "calibration": clf.params(), "fused_top5_accuracy": float((top5 == y[:, None]).any(1).mean()),
        "level1_accuracy": float((l1[pred] == l1[y]).mean()), "level2_accuracy": float((l2[pred] == l2[y]).mean()),
        "image_accuracy": float(img_ok.mean()) if len(img_ok) else 0.0,
        "by_frequency": _buckets(counts, y, {"head": head_pred, "knn": sc.knn, "fused": pred}),
        "mirror": bundle.manifest.mirror, "decode": stats.summary(), "grid": grid}
    bundle.run.write_calibration({**clf.params(), "peers": peers.params(), "val_fused_accuracy": fused_acc})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics, indent=1)
    metrics["plots"] = evaluation_plots(metrics, out)
    log.info("head %.4f, kNN %.4f, fused %.4f (%s rule, k=%s, tau=%s; peer weight %s, %.4f without peers)",
             metrics["head_accuracy"], metrics["knn_accuracy"], fused_acc, clf.rule, clf.k, clf.tau, peers.mu,
             without_peers)
    return metrics


def _peer_line(p: dict | None) -> str:
    if not p:
        return "not measured"
    if not p["mu"]:
        return (f"off (no setting beat {p['fused_without_peers_accuracy']:.4f} without it by 0.5% and two products; "
                "predict --peer-weight turns it on)")
    return (f"mu={p['mu']}, k={p['k']}, tau={p['tau']}: fused {p['fused_without_peers_accuracy']:.4f} without it "
            "(the products scored together smooth their classes over their nearest neighbours among themselves)")


def metrics_table(m: dict) -> str:
    """The headline metrics as an aligned text table."""
    cal = m["calibration"]
    fu, fb = m["fusion"], m.get("frozen_baseline") or {}
    rows = [("products", f"{m['products']:,}")]
    if fb.get("knn") is not None:
        rows += [("frozen backbone", f"kNN {fb['knn']:.4f}, linear probe {fb['linear_probe']:.4f}  (before training, "
                                     f"{fb['val_products']:,} of the run's validation products)")]
    rows += [("head accuracy", f"{m['head_accuracy']:.4f}"),
             ("kNN accuracy", f"{m['knn_accuracy']:.4f}  (k={m['knn_best']['k']}, tau={m['knn_best']['tau']})"),
             ("fused accuracy", f"{m['fused_accuracy']:.4f}  ({fu['rule']} rule; k={cal['k']}, tau={cal['tau']}, "
                                f"head temperature {fu['temperature']:.3g}"
                                + (f", alpha={cal['alpha']}, beta={cal['beta']}, prototype vote "
                                   f"{cal.get('gamma', 0.0)})" if fu["rule"] == "grid" else ")")),
             ("fusion choice", f"{fu.get('chosen', fu['rule'])}: cross-validated accuracy "
                               + (", ".join(f"{r} {v:.4f}" for r, v in fu["cv"].items()) if "cv" in fu else
                                  f"grid {fu['cv_grid']:.4f}, learnt {fu['cv_learnt']:.4f}")),
            ("peer propagation", _peer_line(m.get("peers"))),
            ("fused, no dup vote", f"{m['fused_without_duplicates_accuracy']:.4f}  (exact duplicate in the index "
                                   f"for {m['duplicate_coverage']:.1%} of products)"),
            ("fused top-5", f"{m['fused_top5_accuracy']:.4f}"), ("level-1 accuracy", f"{m['level1_accuracy']:.4f}"),
            ("level-2 accuracy", f"{m['level2_accuracy']:.4f}"), ("per-image (head)", f"{m['image_accuracy']:.4f}")]
    lines = [f"{k:<18} {v}" for k, v in rows]
    lines += ["", f"{'products in category':<22}{'products':>9}{'head':>8}{'kNN':>8}{'fused':>8}  fused 95% interval"]
    for name, b in m["by_frequency"].items():
        lo, hi = b.get("fused_interval", (float("nan"), float("nan")))
        lines.append(f"{name:<22}{b['products']:>9,}{b['head']:>8.3f}{b['knn']:>8.3f}{b['fused']:>8.3f}  "
                     f"[{lo:.3f}, {hi:.3f}]")
    by_rule = fu.get("cv_by_frequency")
    if by_rule:
        rules = [r for r in fu["cv"]]
        lines += ["", "fusion rules, out of fold on the calibration products (the choice above):",
                  f"{'products in category':<22}{'products':>9}" + "".join(f"{r:>13}" for r in rules)]
        lines += [f"{name:<22}{b['products']:>9,}" + "".join(f"{b[r]:>13.3f}" for r in rules)
                  for name, b in by_rule.items()]
    return "\n".join(lines)
