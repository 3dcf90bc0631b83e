"""Index benchmark: Flat vs `auto` on 1M clustered vectors; build-index throughput vs forward-only; instance
retrieval on generated data.

    python bench/bench_index.py [--n 1000000] [--queries 10000] [--workdir bench_out/index] [--quick]
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import harness
import numpy as np

from index import VectorIndex, choose_factory, exact_topk, recall_at_k


def clustered(n: int, d: int, centres: int, seed: int, noise: float = 1.15) -> np.ndarray:
    """Unit vectors around ``centres`` Gaussian centres (shared across seeds); ``noise`` is the per-dimension
    spread relative to the centres' (1.0: clusters still separate; 1.5: mostly overlapping)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(12345).normal(size=(centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def index_rows(n: int, nq: int, per_cluster: int, noise: float, d: int = 256) -> list[tuple]:
    centres = max(10, n // per_cluster)
    x = clustered(n, d, centres, 0, noise)
    q = clustered(nq, d, centres, 1, noise)
    tune_q = clustered(1000, d, centres, 2, noise)  # tuning queries, distinct from the measured ones
    rows = []
    t = time.perf_counter()
    flat = VectorIndex.create(d, "Flat")
    flat.add(x, np.zeros(n, np.int64))
    t_build_flat = time.perf_counter() - t
    t = time.perf_counter()
    _, truth = flat.search(q, 10)
    qps_flat = nq / (time.perf_counter() - t)
    factory = choose_factory(n, d)
    t = time.perf_counter()
    auto = VectorIndex.create(d, factory)
    auto.train(x[np.random.default_rng(0).choice(n, min(n, 200_000), replace=False)])
    auto.add(x, np.zeros(n, np.int64))
    _, tune_truth = exact_topk(tune_q, [x], 10)
    auto.tune(tune_q, tune_truth, 0.95)
    t_build_auto = time.perf_counter() - t
    t = time.perf_counter()
    _, found = auto.search(q, 10)
    qps_auto = nq / (time.perf_counter() - t)
    rec = recall_at_k(found, truth, 10)
    with tempfile.TemporaryDirectory() as tmp:
        flat.save(tmp)
        bpv_flat = os.path.getsize(Path(tmp) / "index.faiss") / n
        auto.save(tmp)
        bpv_auto = os.path.getsize(Path(tmp) / "index.faiss") / n
    rows.append(("Flat (exact)", f"{t_build_flat:.1f}", f"{bpv_flat:.0f}", f"{qps_flat:,.0f}", "1.000", "1.0x", ""))
    ok = rec >= 0.95 and qps_auto >= 10 * qps_flat
    rows.append((f"auto: {factory}, nprobe={auto.nprobe}", f"{t_build_auto:.1f}", f"{bpv_auto:.0f}", f"{qps_auto:,.0f}",
                 f"{rec:.3f}", f"{qps_auto / qps_flat:.1f}x", "ok" if ok else "MISS (goal recall>=0.95 at >=10x)"))
    # the next lower nprobe, to show the trade-off
    if auto.ivf is not None and auto.nprobe > 1:
        auto.nprobe //= 2
        auto._apply()
        t = time.perf_counter()
        _, found = auto.search(q, 10)
        qps2 = nq / (time.perf_counter() - t)
        rows.append((f"  same, nprobe={auto.nprobe}", "", "", f"{qps2:,.0f}", f"{recall_at_k(found, truth, 10):.3f}",
                     f"{qps2 / qps_flat:.1f}x", ""))
    return rows


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/index")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--skip-vectors", action="store_true")
    ap.add_argument("--products", type=int, default=4000, help="generated products of the tiny-tower run")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--convnext-products", type=int, default=300)
    a = harness.start(ap, quick={"n": 20_000, "queries": 200, "products": 200, "epochs": 1, "convnext_products": 12})
    if not a.skip_vectors:
        # Learned product embeddings cluster by category (hundreds to thousands of products each); the second
        # regime, many 50-point clusters as noisy as they are far apart, is close to random data for IVF.
        for regime, per_cluster, noise in (("category-sized clusters", 1000, 1.0), ("small clusters", 50, 1.0)):
            print(f"## FAISS, {regime}: {a.n:,} vectors of 256-d, {per_cluster:,} per cluster "
                  f"({a.n // per_cluster:,} Gaussian centres, noise {noise}); {a.queries:,} queries, k=10, "
                  f"{os.cpu_count()} cores\n")
            harness.table(index_rows(a.n, a.queries, per_cluster, noise),
                        ("index", "build s", "bytes/vector", "QPS", "recall@10", "QPS vs Flat", ""))
            print()
    from pipeline_common import embedding_rows
    print("\n## build-index embedding and instance retrieval (tiny tower, generated data)\n")
    harness.table(embedding_rows(Path(a.workdir), a.products, a.epochs, a.convnext_products),
                  ("measure", "value", "ratio", "goal", ""))


if __name__ == "__main__":
    main()
