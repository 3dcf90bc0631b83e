"""What a changing catalogue costs: removals, queries over a generation with removed rows, compaction and check.

Synthetic, like bench_add: N clustered unit vectors (dim --dim) with random ids and 1,000 classes, one base
segment made by the one segment builder (the index type chosen within --index-memory and tuned to recall@10
0.95, as build-index does); the model load is stubbed (the same at any size). Measured per size:
- remove 1,000 products (``changes.remove_products``: id lookup in the id maps, the deletion set written aside,
  one generation commit), median of --repeat, and the reader's reopen after it;
- single queries (by id: id map, stored vector, search; by picture: a search with a new vector; the forward pass
  is the same with or without removals and is left out), queries/s with 10% of the products removed against the
  same folder's generation with none, alternating rounds;
- recall@10 of the served results against exact search over the live products, beside the build's;
- compaction with 10% removed (seconds; peak RSS of a child process that runs it alone, against the RSS of a
  child that only opens the folder); ``check`` (every byte) in GB/s against a plain read of the same files.
Usage: python bench/bench_catalogue.py [--sizes 100000 1000000] [--dim 64] [--quick]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import harness
import numpy as np

from index import DuplicateTable, recall_at_k
from retrieval.infer.indexdir import bundle as bundle_mod
from retrieval.infer.indexdir.builder import SegmentSpec, build_segment
from retrieval.infer.indexdir.changes import remove_products
from retrieval.infer.indexdir.compact import check_index, commit_manifest
from retrieval.infer.indexdir.folder import IndexFolder
from retrieval.infer.indexdir.manifest import IndexManifest, Source
from retrieval.infer.indexdir.segments import SegmentData

ROUNDS = 12  # timed query rounds per generation, alternating (the ratio: median over the round pairs)
RECALL_QUERIES = 3000  # queries whose served top 10 is scored against exact search


class _Model:  # a reader's model, loaded once per server: the same at any size, so stubbed here
    sha256 = "0" * 64


def _stub() -> None:
    bundle_mod.load_index_model = lambda *a, **k: _Model()
    bundle_mod.query_tower = lambda bundle, runtime: None


def _vectors(rng, n: int, d: int, centres: int = 2000) -> np.ndarray:
    """Clustered unit vectors ``[n, d]`` (products come in families, as catalogue embeddings do)."""
    c = rng.normal(size=(centres, d)).astype(np.float32)
    v = c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_folder(root: Path, n: int, d: int, memory: float) -> tuple[IndexFolder, np.ndarray, np.ndarray, float]:
    """A one-segment index of ``n`` synthetic products; returns (folder, ids, vectors, build recall@10)."""
    folder = IndexFolder(root / f"idx_{n}")
    shutil.rmtree(folder.path, ignore_errors=True)
    rng = np.random.default_rng(n)
    ids = rng.choice(10 * n, n, replace=False).astype(np.int64)
    v = _vectors(rng, n, d)
    with folder.writer():
        (folder.path / "base").touch()
        emb = folder.work / "bench" / "emb.npy"
        emb.parent.mkdir(parents=True)
        np.save(emb, v)
        labels = rng.integers(0, 1000, n)
        arrays = {"product_ids": ids, "category_ids": labels, "offsets": np.zeros(n, np.int64),
                  "lengths": np.ones(n, np.int64), "sources": np.zeros(n, np.int32)}
        dups = DuplicateTable(rng.integers(0, 2 ** 62, n), np.arange(n))
        sid, factory, recall = build_segment(folder, d, SegmentSpec("auto", memory),
                                             SegmentData(labels, arrays, dups, [(0, n)], [emb]))
        man = IndexManifest(model_file="none", model_sha256="0" * 64, run_dir=".", backbone="synthetic",
                            image_size=0, dim=d, factory=factory, count=n, split="all", mirror=False, store_key={},
                            parts=((0, n),), sources=(Source("base", {}),), segments=((sid, n),),
                            tuned_recall_at_10=recall, index_memory=memory)
        commit_manifest(folder, replace(man))
    return folder, ids, v, recall


def _qps(bundle, ids: np.ndarray, vecs: np.ndarray) -> tuple[float, float]:
    """(by id, by picture) single queries per second over ``ids`` / ``vecs`` (k = 10, one at a time)."""
    t = time.perf_counter()
    for pid in ids.tolist():
        pos = bundle.position_of(pid)
        bundle.vectors.search(bundle.vector(pos)[None], 11)
    by_id = len(ids) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in vecs:
        bundle.vectors.search(q[None], 10)
    return by_id, len(vecs) / (time.perf_counter() - t)


def _child_rss(code: str) -> tuple[float, float]:
    """(seconds, peak RSS MB) of ``code`` run alone in a child process."""
    env = {**os.environ, "PYTHONPATH": f"{harness.ROOT}:{harness.ROOT / 'bench'}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


CHILD = """
import json, time
import bench_catalogue as b
from harness import status_mb
from retrieval.infer.indexdir.compact import compact
b._stub()
t = time.perf_counter()
{op}
print(json.dumps([time.perf_counter() - t, status_mb("VmHWM")]))  # this image's peak (VmHWM starts afresh at exec)
"""


def bench(root: Path, n: int, d: int, memory: float, repeat: int, queries: int) -> dict:
    folder, ids, v, build_recall = make_folder(root, n, d, memory)
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    none = bundle_mod.open_index(folder.path)
    removes, reopens, at = [], [], 0
    reader = none
    for i in range(repeat + 1):  # the first is a warm-up
        gone = ids[order[at:at + 1000]]
        at += 1000
        t = time.perf_counter()
        remove_products(folder.path, gone)
        took = time.perf_counter() - t
        t = time.perf_counter()
        reader = bundle_mod.open_index(folder.path, reuse=reader)
        if i:
            removes.append(took)
            reopens.append(time.perf_counter() - t)
    if at < n // 10:
        remove_products(folder.path, ids[order[at:n // 10]])  # 10% removed in all
    tenth = bundle_mod.open_index(folder.path, reuse=reader)
    live = order[n // 10:]
    q_ids = ids[live[rng.integers(0, len(live), queries)]]
    q_vecs = v[live[rng.integers(0, len(live), queries)]] + 0.03 * rng.normal(size=(queries, d)).astype(np.float32)
    q_vecs /= np.linalg.norm(q_vecs, axis=1, keepdims=True)  # new pictures of products like indexed ones
    rounds = {"none": [], "tenth": []}
    for r in range(ROUNDS):  # alternating rounds, each on other queries: a busy moment hits both
        part = slice(r * len(q_ids) // ROUNDS, (r + 1) * len(q_ids) // ROUNDS)
        for name, b in (("none", none), ("tenth", tenth)) if r % 2 else (("tenth", tenth), ("none", none)):
            rounds[name].append(_qps(b, q_ids[part], q_vecs[part]))
    med = {k: np.median(np.array(r), 0) for k, r in rounds.items()}
    per_round = np.array(rounds["tenth"]) / np.array(rounds["none"])  # [rounds, 2]: each round pair's ratio
    q = harness.percentiles(per_round, (50, 25, 75))
    med["ratio"], med["ratio_q"] = q[50], np.array([q[25], q[75]])
    # recall@10 of what is served, against exact search over the live products only
    import faiss
    flat = faiss.IndexFlatIP(d)
    flat.add(v[live])
    rq = q_vecs[:RECALL_QUERIES]
    truth = live[flat.search(rq, 10)[1]]
    served = tenth.vectors.search(rq, 10)[1]
    recall = recall_at_k(served, truth, 10)
    flat = faiss.IndexFlatIP(d)
    flat.add(v)
    truth0, served0 = flat.search(rq, 10)[1], none.vectors.search(rq, 10)[1]
    recall0 = recall_at_k(served0, truth0, 10)
    base_code = CHILD.format(op=f"b.bundle_mod.open_index({str(folder.path)!r})")
    _, open_rss = _child_rss(base_code)
    compact_s, compact_rss = _child_rss(CHILD.format(op=f"compact({str(folder.path)!r})"))
    files = [p for p in folder.path.rglob("*") if p.is_file() and "work" not in p.parts]
    size = sum(p.stat().st_size for p in files)

    def plain():
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass
    plain()  # warm: both read from the page cache
    plain_s = harness.best_time(plain, 3)
    check_s = harness.best_time(lambda: check_index(folder.path), 3)
    assert check_index(folder.path).damaged == ()
    shutil.rmtree(folder.path, ignore_errors=True)
    return {"n": n, "factory": none.manifest.factory, "remove": float(np.median(removes)),
            "reopen": float(np.median(reopens)), "qps": med, "recall": recall, "recall0": recall0,
            "build_recall": build_recall,
            "compact_s": compact_s, "compact_rss": compact_rss, "open_rss": open_rss, "gb": size / 1e9,
            "check_gbs": size / 1e9 / check_s, "plain_gbs": size / 1e9 / plain_s}


def _ratio(r: dict, col: int) -> str:
    q = r["qps"]["ratio_q"][:, col]
    return f"{r['qps']['ratio'][col]:.2f}x [{q[0]:.2f}, {q[1]:.2f}]"


def main() -> None:
    ap = harness.parser(__doc__, workdir="bench_out/catalogue")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--index-memory", type=float, default=8e9, help="bytes the index type is chosen within")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--queries", type=int, default=30000)
    a = harness.start(ap, quick={"sizes": [30_000, 60_000], "repeat": 1, "queries": 3000})
    a.workdir.mkdir(parents=True, exist_ok=True)
    _stub()
    rows = [bench(a.workdir, n, a.dim, a.index_memory, a.repeat, a.queries) for n in a.sizes]
    base = rows[0]["remove"]
    harness.table([(f"{r['n']:,}", r["factory"], f"{r['remove'] * 1e3:.1f}", f"{r['remove'] / base:.2f}x",
                         f"{r['reopen'] * 1e3:.1f}") for r in rows],
                       ("catalogue (products)", "index", "remove 1,000 (ms, median)", "vs smallest",
                        "reader reopen (ms)"))
    print()
    harness.table([(f"{r['n']:,}", f"{r['qps']['none'][0]:.0f}", f"{r['qps']['tenth'][0]:.0f}",
                         _ratio(r, 0), f"{r['qps']['none'][1]:.0f}",
                         f"{r['qps']['tenth'][1]:.0f}", _ratio(r, 1),
                         f"{r['recall0']:.3f}", f"{r['recall']:.3f}", f"{r['build_recall']:.3f}") for r in rows],
                       ("catalogue", "by id q/s (none removed)", "by id q/s (10% removed)",
                        "ratio [quartiles of rounds]", "by picture q/s (none)", "by picture q/s (10%)",
                        "ratio [quartiles]", "served recall@10 (none removed)",
                        "served recall@10 (10% removed, vs live)", "build recall@10"))
    print()
    harness.table([(f"{r['n']:,}", f"{r['compact_s']:.1f}", f"{r['compact_rss']:.0f}", f"{r['open_rss']:.0f}",
                         f"{r['gb']:.2f}", f"{r['check_gbs']:.2f}", f"{r['plain_gbs']:.2f}",
                         f"{r['check_gbs'] / r['plain_gbs']:.2f}x") for r in rows],
                       ("catalogue", "compact 10% removed (s)", "its peak RSS (MB)", "open only: peak RSS (MB)",
                        "folder (GB)", "check (GB/s)", "plain read (GB/s)", "check / read"))
    print(f"\nmachine: {os.cpu_count()} cores; this process's peak RSS {harness.status_mb('VmHWM'):.0f} MB")
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
